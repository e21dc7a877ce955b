"""Hand-written Triton kernels: flash attention (forward and backward), flash-decoding over a KV cache
(contiguous or paged), and online softmax.

On a machine without a CUDA GPU, set TRITON_INTERPRET=1 before importing this
package to run the same kernels on the CPU (see kernels/runtime.py).

`kernels.flash_attention` is the function; the module of the same name is
`importlib.import_module("kernels.flash_attention")` (or `from
kernels.flash_attention import _flash_fwd` for its private pieces).
"""
from .decode import append_kv, decode_attention
from .flash_attention import flash_attention
from .runtime import INTERPRET
from .softmax import softmax

__all__ = ["flash_attention", "decode_attention", "append_kv", "softmax", "INTERPRET"]
