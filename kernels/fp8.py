"""fp8 attention: the flash forward on e4m3 (or e5m2) q, k and v, as FlashAttention-3 runs it.

The kernel is kernels/flash_fwd.py's own, with its HAS_DESCALE switch on:

    s = (q8 . k8) * q_descale * k_descale * sm_scale     q.k on fp8 tensor cores, fp32 accumulators
    p = exp2(s - running max), rounded to v's fp8        so P.V runs on fp8 tensor cores too
    o = (p8 . v8) / l * v_descale                         in bf16 or fp16; the lse in fp32

Each descale is the factor that turns a stored fp8 value back into the real
one (reference/fp8.py: quantize_fp8), one per tensor or one per (sequence,
kv head), FlashAttention-3's (B, Hkv): q's heads share their kv head's. The
three are stacked into one small (3, B, Hkv) tensor (or (3,) when each is one
element, with zero strides across batch and heads), which the kernel reads
once per program. p needs no scale: under the running max every entry is at
most 1, the range where e4m3 is most precise; it is the tiny probabilities,
flushed to zero, that fp8 loses.

fp8 tensor cores are Ada's and Hopper's (sm_89, sm_90) and later; on an older
GPU the call is refused by name. The forward serves inference: fp8 inputs that
require grad are refused, and so is dropout. reference/fp8.py is this file's
plain twin: fp8_attention there computes the same quantized steps in PyTorch.
"""
import torch

from reference.fp8 import FP8_DTYPES, OUT_DTYPES

from .block_mask import NO_MODS
from .configs import chip_for
from .flash_attention import _flash_fwd

FP8_MIN_CAPABILITY = (8, 9)  # Ada (sm_89) and Hopper (sm_90) brought fp8 tensor cores
DESCALE_NAMES = ("q_descale", "k_descale", "v_descale")


# ----------------------------------------------------------------------------
# Checks: the chip, the call, the descales (shapes only: no sync)
# ----------------------------------------------------------------------------
def check_fp8_chip(device):
    """Refuse a GPU without fp8 tensor cores (and, under the interpreter, an emulated one: ATTN_CHIP)."""
    chip = chip_for(device)
    if chip is not None and chip.capability < FP8_MIN_CAPABILITY:
        raise RuntimeError(f"fp8 attention needs fp8 tensor cores (sm_89, Ada, or newer); q is on "
                           f"{chip.describe()}: dequantize to bf16 there")


def check_fp8_call(q, k, v, dropout_p, out_dtype, descales):
    """The options an fp8 forward takes, checked in the caller's words. Returns the output dtype."""
    missing = [name for name, d in zip(DESCALE_NAMES, descales) if d is None]
    if missing:
        raise ValueError(f"fp8 q, k and v ({q.dtype}) need q_descale, k_descale and v_descale (stored value * "
                         f"descale = value); missing {', '.join(missing)}")
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise ValueError("fp8 attention is forward-only (inference): call it under torch.no_grad(), or on "
                         "tensors that do not require grad")
    if dropout_p:
        raise ValueError(f"fp8 attention is forward-only: dropout_p must be 0, got {dropout_p}")
    out_dtype = torch.bfloat16 if out_dtype is None else out_dtype
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be torch.bfloat16 or torch.float16 for fp8 attention, got {out_dtype!r}")
    check_fp8_chip(q.device)
    return out_dtype


def check_no_descales(q, out_dtype, descales):
    """Descales and out_dtype belong to fp8 inputs: refuse them, by name, on any other."""
    given = [name for name, d in zip(DESCALE_NAMES, descales) if d is not None]
    if out_dtype is not None:
        given.append("out_dtype")
    if given:
        raise TypeError(f"{', '.join(given)} apply to fp8 q, k and v ({', '.join(map(str, FP8_DTYPES))}); "
                        f"q is {q.dtype}")


def stack_descales(descales, batch, h_kv, device):
    """(DESCALE, its (kind, batch, kv head) strides): the three descales as the kernel reads them.

    Each descale: an fp32 tensor of one element (per tensor) or (B, Hkv) (per sequence and kv head).
    All per tensor -> one (3,) tensor with zero batch and head strides; else (3, B, Hkv).
    """
    per_head = (batch, h_kv)
    for name, d in zip(DESCALE_NAMES, descales):
        if not isinstance(d, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (fp32, one element or {per_head}), got "
                            f"{type(d).__name__}")
        if d.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {d.dtype}")
        if d.numel() != 1 and tuple(d.shape) != per_head:
            raise ValueError(f"{name} must have one element (per tensor) or shape (B, Hkv) = {per_head} (per "
                             f"sequence and kv head), got {tuple(d.shape)}")
        if d.device != device:
            raise ValueError(f"{name} is on {d.device} but q is on {device}")
    if all(d.numel() == 1 for d in descales):
        return torch.cat([d.reshape(1) for d in descales]), (1, 0, 0)
    stacked = torch.stack([d.reshape(1, 1).expand(per_head) if d.numel() == 1 else d for d in descales])
    return stacked, stacked.stride()


def _descale_strides(descale):
    return (1, 0, 0) if descale.dim() == 1 else descale.stride()


# ----------------------------------------------------------------------------
# The forward: eager on the launcher, under torch.compile a custom op
# ----------------------------------------------------------------------------
@torch.library.custom_op("attention_playground::flash_attn_fp8_fwd", mutates_args=())
def _flash_attn_fp8_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, descale: torch.Tensor,
                           alibi_slopes: torch.Tensor | None, sinks: torch.Tensor | None,
                           cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None, ints: list[int],
                           floats: list[float], out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    causal, window_left, window_right, max_seqlen_q, max_seqlen_k = ints
    sm_scale, softcap = floats
    varlen = cu_seqlens_q is not None
    return _flash_fwd(q, k, v, bool(causal), sm_scale, window_size=(window_left, window_right),
                      softcap=softcap or None, alibi_slopes=alibi_slopes, sinks=sinks,
                      cu_seqlens=(cu_seqlens_q, cu_seqlens_k) if varlen else None,
                      max_seqlens=(max_seqlen_q, max_seqlen_k) if varlen else None,
                      descale=(descale, _descale_strides(descale)), out_dtype=out_dtype)


@_flash_attn_fp8_fwd_op.register_fake
def _(q, k, v, descale, alibi_slopes, sinks, cu_seqlens_q, cu_seqlens_k, ints, floats, out_dtype):
    lse_shape = q.shape[:3] if cu_seqlens_q is None else (q.shape[1], q.shape[0])
    return (q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=out_dtype),
            q.new_empty(lse_shape, dtype=torch.float32))


def fp8_forward(q, k, v, causal, sm_scale, window, softcap, alibi_slopes, sinks, descales, out_dtype,
                cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, mods=NO_MODS):
    """(o, lse) of checked fp8 inputs; window: (left, right), -1 for an open side (ops._op_window's).

    descales: (q_descale, k_descale, v_descale). mods: the score_mod, mask_mod and block_mask
    kernels/flex.py built (eager only, as there).
    """
    batch = q.shape[0] if cu_seqlens_q is None else cu_seqlens_q.shape[0] - 1
    h_kv = k.shape[1]
    descale, strides = stack_descales(descales, batch, h_kv, q.device)
    if mods is NO_MODS and (torch.compiler.is_compiling() or type(q) is not torch.Tensor):
        return _flash_attn_fp8_fwd_op(q, k, v, descale, alibi_slopes, sinks, cu_seqlens_q, cu_seqlens_k,
                                      [int(causal), *window, max_seqlen_q, max_seqlen_k],
                                      [sm_scale, float(softcap or 0.0)], out_dtype)
    varlen = cu_seqlens_q is not None
    return _flash_fwd(q, k, v, causal, sm_scale, window_size=window, softcap=softcap, alibi_slopes=alibi_slopes,
                      sinks=sinks, cu_seqlens=(cu_seqlens_q, cu_seqlens_k) if varlen else None,
                      max_seqlens=(max_seqlen_q, max_seqlen_k) if varlen else None, mods=mods,
                      descale=(descale, strides), out_dtype=out_dtype)
