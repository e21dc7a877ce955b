"""Flash attention's launchers, its torch.library op with autograd, and `flash_attention`.

The kernels live one family per file, read in this order:
    kernels/tiles.py       tile loads and the causal key range, shared by every kernel
    kernels/flash_fwd.py   the forward kernel (the online softmax, derived in its docstring)
    kernels/flash_bwd.py   the backward kernels (delta, dK/dV, dQ)
    kernels/autotune.py    the GPU launch configurations and their pruning
    this file              launchers (check the contract, allocate, build the grid) ->
                           the torch.library op with its autograd -> `flash_attention`
"""
import math

import torch
import triton
import triton.language as tl

from reference.functional import check_attention_inputs

from .autotune import _PREPROCESS_BLOCK_M, _attn_bwd_dkdv_tuned, _attn_bwd_dq_tuned, _attn_fwd_tuned
from .flash_bwd import _attn_bwd_preprocess
from .runtime import accumulator_dtype, check_runnable, dot_precision, upcast_tiles
from .tiles import LOG2E

MAX_HEAD_DIM = 256


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _head_dim_pad(head_dim: int) -> int:
    """Tiles are powers of two and tl.dot needs K >= 16: pad D inside the kernel, with masked loads."""
    return max(16, triton.next_power_of_2(head_dim))


# ----------------------------------------------------------------------------
# Launchers: check the contract, allocate, build the grid
# ----------------------------------------------------------------------------
def check_flash_inputs(q, k, v, sm_scale=None):
    """Raise a clear error, naming the argument, for anything the kernels cannot take."""
    check_attention_inputs(q, k, v)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; q, k and v must share one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; q, k and v must share one device")
    head_dim = q.shape[-1]
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim (q.shape[-1]) must be between 1 and {MAX_HEAD_DIM}, got {head_dim}")
    if sm_scale is not None and not (isinstance(sm_scale, (int, float)) and math.isfinite(sm_scale)):
        raise TypeError(f"sm_scale must be a finite float or None, got {sm_scale!r}")
    check_runnable(q, "q")
    if q.dtype == torch.float64 and head_dim > 128 and q.device.type == "cuda":
        # Even the smallest float64 tiles of D > 128 exceed an H100's shared memory.
        raise ValueError(f"float64 inputs support head_dim up to 128 on a GPU, got {head_dim}")


def _flash_fwd(q, k, v, causal, sm_scale, o=None, lse=None):
    """Run the forward kernel. Returns o (B, Hq, Nq, D) in q's dtype and lse (B, Hq, Nq) in fp32.

    o and lse may be passed in (tests pass NaN-filled buffers to catch unwritten elements).
    """
    batch, h_q, n_q, head_dim = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device) if o is None else o
    lse = torch.empty((batch, h_q, n_q), dtype=accumulator_dtype(q.dtype), device=q.device) if lse is None else lse
    if q.numel() == 0:
        return o, lse
    qk_scale = sm_scale * LOG2E.value  # fold LOG2E into the scale: exp(x * s) == exp2(x * s * LOG2E)

    def grid(meta):
        return (triton.cdiv(n_q, meta["BLOCK_M"]), batch * h_q)

    _attn_fwd_tuned[grid](
        q, k, v, o, lse, qk_scale,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        h_q, h_q // h_kv, n_q, n_k,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=_head_dim_pad(head_dim), IS_CAUSAL=causal,
        UPCAST=upcast_tiles(q.dtype), DOT_PRECISION=dot_precision(q.dtype), ACC_DTYPE=_tl_dtype(lse.dtype),
    )
    return o, lse


def _flash_bwd(do, q, k, v, o, lse, causal, sm_scale, dlse=None, dq=None, dk=None, dv=None):
    """Run the three backward kernels. Returns dq, dk, dv in the dtypes of q, k, v.

    dlse, the gradient flowing into the returned lse (if any), enters through
    delta: d lse_i / d S_ij = P_ij, so it adds P_ij * dlse_i to dS_ij, which is
    the same as subtracting dlse_i from delta_i.
    """
    batch, h_q, n_q, head_dim = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if dq is None else dq
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if dk is None else dk
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if dv is None else dv
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    head_dim_pad = _head_dim_pad(head_dim)
    qk_scale = sm_scale * LOG2E.value

    delta = torch.empty((batch, h_q, n_q), dtype=lse.dtype, device=q.device)
    _attn_bwd_preprocess[(triton.cdiv(n_q, _PREPROCESS_BLOCK_M), batch * h_q)](
        o, do, delta, *o.stride(), *do.stride(), h_q, n_q,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_M=_PREPROCESS_BLOCK_M,
    )
    if dlse is not None:
        delta -= dlse

    flags = dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, IS_CAUSAL=causal,
                 UPCAST=upcast_tiles(q.dtype), DOT_PRECISION=dot_precision(q.dtype), ACC_DTYPE=_tl_dtype(lse.dtype))
    _attn_bwd_dkdv_tuned[lambda meta: (triton.cdiv(n_k, meta["BLOCK_N"]), batch * h_kv)](
        q, k, v, do, lse, delta, dk, dv, qk_scale, sm_scale,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        h_kv, h_q // h_kv, n_q, n_k, **flags,
    )
    _attn_bwd_dq_tuned[lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), batch * h_q)](
        q, k, v, do, lse, delta, dq, qk_scale, sm_scale,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        h_q, h_q // h_kv, n_q, n_k, **flags,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------
# The torch.library op and its autograd
#
# Registering the kernels as custom ops, each with a fake (shape-only)
# implementation, lets torch.compile trace a model that calls them without a
# graph break; register_autograd makes the forward op differentiable through
# the backward op (torch builds the autograd.Function from these two pieces).
# ----------------------------------------------------------------------------
@torch.library.custom_op("attention_playground::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       causal: bool, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _flash_fwd(q, k, v, causal, sm_scale)


@_flash_attn_fwd_op.register_fake
def _(q, k, v, causal, sm_scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=accumulator_dtype(q.dtype))


@torch.library.custom_op("attention_playground::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       o: torch.Tensor, lse: torch.Tensor, dlse: torch.Tensor | None,
                       causal: bool, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _flash_bwd(do, q, k, v, o, lse, causal, sm_scale, dlse=dlse)


@_flash_attn_bwd_op.register_fake
def _(do, q, k, v, o, lse, dlse, causal, sm_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, sm_scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal = causal
    ctx.sm_scale = sm_scale


def _backward(ctx, do, dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _flash_attn_bwd_op(do, q, k, v, o, lse, dlse, ctx.causal, ctx.sm_scale)
    return dq, dk, dv, None, None


_flash_attn_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------
def flash_attention(q, k, v, causal=False, sm_scale=None, return_lse=False):
    """softmax(q k^T * sm_scale) v, fused in Triton, differentiable.

    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D), with Hq a multiple of Hkv (GQA/MQA)
    and 1 <= D <= 256; fp32, fp16 or bf16 (float64 too, for gradcheck); any strides. causal masks bottom-right
    (query i sees key j <= i + Nk - Nq). sm_scale defaults to 1/sqrt(D).
    Returns o (B, Hq, Nq, D) in q's dtype, and with return_lse=True also the
    natural-log log-sum-exp of each row's scores, lse (B, Hq, Nq) in fp32
    (float64 for float64 inputs; -inf for a row with no visible key, whose output is 0).
    """
    check_flash_inputs(q, k, v, sm_scale)
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    o, lse = _flash_attn_fwd_op(q, k, v, bool(causal), sm_scale)
    return (o, lse) if return_lse else o
