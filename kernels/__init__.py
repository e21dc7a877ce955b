"""Hand-written Triton kernels: flash attention (forward and backward, padded or packed), paged attention
for every serving step over a KV cache (contiguous or paged: prefill chunks, verification, decode), online
softmax, and context-parallel attention over torch.distributed built on the flash-attention launchers.

On a machine without a CUDA GPU, set TRITON_INTERPRET=1 before importing this
package to run the same kernels on the CPU (see kernels/runtime.py).

`kernels.flash_attention` is the function (kernels/flex.py's: the plain kernels, or with score_mod,
mask_mod, block_mask, attn_mask or attn_bias the same kernels with those compiled in; with fp8
inputs and their descales, kernels/fp8.py's forward); the module of the same name, the launchers,
is `importlib.import_module("kernels.flash_attention")` (or `from kernels.flash_attention import
_flash_fwd`), and kernels/ops.py holds the ops and the plain public functions.
"""
from reference.decode import append_kv

from . import mods
from .block_mask import BlockMask, MaskMod, ScoreMod, create_block_mask
from .context_parallel import context_parallel_attention, shard_sequence, unshard_sequence
from .ops import flash_attention_varlen
from .flex import flash_attention
from .paged import decode_attention, paged_attention
from .runtime import INTERPRET
from .softmax import softmax

__all__ = ["flash_attention", "flash_attention_varlen", "paged_attention", "decode_attention", "append_kv", "softmax",
           "ScoreMod", "MaskMod", "BlockMask", "create_block_mask", "context_parallel_attention", "shard_sequence",
           "unshard_sequence", "INTERPRET", "mods"]
