"""fp8 attention in plain PyTorch: quantization with scales, and the forward as an fp8 kernel computes it.

The twin of kernels/fp8.py, with the same names. An fp8 tensor stores x / scale
in e4m3 (3 mantissa bits, largest value 448) or e5m2 (2 bits, 57344); its
`descale` (FlashAttention-3's word) is the factor that brings it back:
x ≈ x8.float() * descale. One descale per tensor, or per (sequence, kv head):
q's heads share their kv head's, so all three descales are (B, Hkv).

fp8_attention computes what the kernel computes, in fp32:
    s = (q8 . k8) * q_descale * k_descale * sm_scale     exact products, fp32 sums
    p = exp(s - row max), rounded to v's fp8               P.V runs on fp8 tensor cores too
    o = (p8 . v8) / sum(p) * v_descale                      the sum from the unrounded p
so its error against float64 attention on the dequantized inputs is PyTorch's
error for "the same quantized computation", the tolerance rule's yardstick
(tests/helpers.py). p needs no scale of its own: every entry is at most 1, where
e4m3 keeps 3 bits of mantissa down to 2**-6 and subnormals to 2**-9; the
smallest probabilities flush to 0, which is where fp8 attention loses precision.
"""
import math

import torch

from .functional import naive_attention, naive_attention_varlen

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
OUT_DTYPES = (torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------
# Quantization
# ----------------------------------------------------------------------------
def quantize_fp8(x, dtype=torch.float8_e4m3fn, group=1, cu_seqlens=None):
    """x -> (x8, descale): the largest |x| of each scale's block maps to the fp8 dtype's largest value.

    Padded x (B, H, N, D): descale (B, H // group), one per sequence and group of `group`
    adjacent heads (group = q's heads per kv head gives q_descale in FlashAttention-3's
    (B, Hkv)). Packed x (total, H, D) with cu_seqlens: descale (B, H // group) from each
    sequence's rows. Dequantized: dequantize_fp8(x8, descale[, cu_seqlens]).
    """
    if dtype not in FP8_DTYPES:
        raise TypeError(f"dtype must be one of {FP8_DTYPES}, got {dtype}")
    finite_max = torch.finfo(dtype).max
    if cu_seqlens is None:
        b, h = x.shape[:2]
        amax = x.float().reshape(b, h // group, -1).abs().amax(-1)  # the heads of one group are adjacent
    else:
        bounds = cu_seqlens.tolist()
        amax = torch.stack([x[start:end].float().reshape(end - start, x.shape[1] // group, -1).abs().amax((0, 2))
                            if end > start else x.new_zeros(x.shape[1] // group, dtype=torch.float32)
                            for start, end in zip(bounds, bounds[1:])])
    descale = amax.clamp(min=torch.finfo(torch.float32).tiny) / finite_max
    return (x.float() / _per_row(descale, x, cu_seqlens)).to(dtype), descale


def dequantize_fp8(x8, descale, cu_seqlens=None):
    """x8.float() * its descale (one element, or (B, Hkv) broadcast over each group's heads)."""
    return x8.float() * _per_row(descale, x8, cu_seqlens)


def _per_row(descale, x, cu_seqlens):
    """descale broadcast to x's layout: a scalar, or (B, G) spread over each sequence's rows and each group's heads."""
    if descale.numel() == 1:
        return descale.float().reshape(())
    heads = x.shape[1]
    per_head = descale.float().repeat_interleave(heads // descale.shape[1], dim=1)  # (B, H)
    if cu_seqlens is None:
        return per_head[:, :, None, None]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return per_head.repeat_interleave(lengths, dim=0)[:, :, None]  # (total, H, 1)


# ----------------------------------------------------------------------------
# fp8 KV caches: their scales, and new rows quantized on write (append_kv)
# ----------------------------------------------------------------------------
def check_scales(k_cache, v_cache, k_scale, v_scale, q_dtype):
    """An fp8 cache needs its dequantization scales, each (1,) or one per cache row and kv head, in fp32."""
    fp8 = k_cache.dtype in FP8_DTYPES
    if not fp8:
        if k_scale is not None or v_scale is not None:
            raise ValueError(f"k_scale and v_scale dequantize an fp8 cache; this one is {k_cache.dtype}")
        return
    if k_scale is None or v_scale is None:
        raise ValueError(f"an fp8 cache ({k_cache.dtype}) needs k_scale and v_scale (stored value * scale = value)")
    if q_dtype in FP8_DTYPES:
        raise TypeError("q must be a 16-bit or fp32 tensor with an fp8 cache (its keys are dequantized to q's dtype)")
    per_row = tuple(k_cache.shape[:3])
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            raise TypeError(f"{name} must be a float32 tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if tuple(t.shape) not in ((1,), per_row):
            raise ValueError(f"{name} must have shape (1,) (per tensor) or {per_row} (per cache row and kv head, "
                             f"like the cache's first three dims), got {tuple(t.shape)}")
        if t.device != k_cache.device:
            raise ValueError(f"{name} is on {t.device} but k_cache is on {k_cache.device}")
    if k_scale.shape != v_scale.shape or (k_scale.dim() == 3 and k_scale.stride() != v_scale.stride()):
        raise ValueError(f"k_scale and v_scale must have one shape and layout, got {tuple(k_scale.shape)} and "
                         f"{tuple(v_scale.shape)}")


def quantize_rows(rows, scale, dtype):
    """New cache rows (T, Hkv, D) in fp8: (stored rows, their scales (T, Hkv), or None for a per-tensor scale).

    A per-tensor scale (1,) is the cache's (calibrated, static: vLLM's default); values past the
    format's range saturate to its largest (no inf in e4m3fn). Per row and kv head, each new row
    gets its own scale, its largest |value| mapped to the largest fp8 value (vLLM's per-token-head
    scheme), so nothing saturates.
    """
    finite_max = torch.finfo(dtype).max
    rows = rows.float()
    if scale.dim() == 1:
        return (rows / scale).clamp(-finite_max, finite_max).to(dtype), None
    row_scale = rows.abs().amax(-1).clamp(min=torch.finfo(torch.float32).tiny) / finite_max
    return (rows / row_scale[..., None]).to(dtype), row_scale


# ----------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------
def fp8_attention(q, k, v, causal=False, sm_scale=None, *, q_descale=None, k_descale=None, v_descale=None,
                  out_dtype=torch.bfloat16, cu_seqlens_q=None, cu_seqlens_k=None, return_lse=False, **options):
    """Attention of fp8 q, k, v as the fp8 kernel computes it (see the module docstring), in fp32.

    Padded (B, H, N, D), or packed (total, H, D) with cu_seqlens_q and cu_seqlens_k. Descales:
    None (1), one element, or (B, Hkv). options: naive_attention's (window_size, softcap,
    alibi_slopes, sinks). Returns o in out_dtype, and with return_lse the fp32 lse.
    """
    ones = torch.ones((), device=q.device)
    cu, p_dtype = cu_seqlens_q, v.dtype  # P is rounded to v's fp8 dtype
    q, k = (dequantize_fp8(t, ones if d is None else d, c)
            for t, d, c in ((q, q_descale, cu), (k, k_descale, cu_seqlens_k)))
    v = dequantize_fp8(v, ones if v_descale is None else v_descale, cu_seqlens_k)
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    if cu is None:
        o, lse = naive_attention(q, k, v, causal, sm_scale, torch.float32, p_dtype=p_dtype, return_lse=True,
                                 **options)
    else:
        o, lse = naive_attention_varlen(q, k, v, cu, cu_seqlens_k, causal, sm_scale, torch.float32,
                                        p_dtype=p_dtype, return_lse=True, **options)
    return (o.to(out_dtype), lse) if return_lse else o.to(out_dtype)
