"""flash_attention with any pattern: score_mod, mask_mod, block_mask, and dense attn_mask / attn_bias.

The plain options (causal, window, softcap, ALiBi, sinks, dropout) are
switches of the flash kernels and go through kernels/flash_attention.py's
op. Mods are the kernels' other switches: a user's @triton.jit functions
compiled in, with their tensors passed alongside (kernels/block_mask.py says
how they are written). This file turns a call with mods into kernel
launches and gives it a backward pass:

    score_mod   a ScoreMod (or a bare jit function): its derivative runs in the backward, and the
                tensors it reads that require grad get their gradients (a learned bias)
    mask_mod    a MaskMod (or a bare jit function): applied on every key block, unless
    block_mask  a BlockMask (create_block_mask) says which key blocks are wholly visible
                (no mask) or wholly hidden (never loaded)
    attn_mask   a dense bool mask broadcastable to (B, Hq, Nq, Nk), True = visible, as SDPA takes
                it: read by a mask_mod, its all-False blocks skipped
    attn_bias   a dense additive bias broadcastable to (B, Hq, Nq, Nk), with a gradient: read by a
                score_mod whose derivative writes each dS once (no atomics), summed over the
                broadcast dimensions afterwards

Mods run eagerly through a torch.autograd.Function; under torch.compile the
call is left out of the graph (torch.compiler.disable), since a Triton
function is not a value a graph can hold.
"""
import math

import torch
import triton
import triton.language as tl

from .block_mask import (NO_MODS, BlockMask, MaskMod, Mods, ScoreMod, as_mask_mod, as_score_mod,
                         block_mask_from_dense, check_mod_args, check_mod_shapes)
from reference.fp8 import FP8_DTYPES

from .flash_attention import _flash_bwd, _flash_fwd, check_flash_inputs, check_flash_options
from .fp8 import check_fp8_call, check_no_descales, fp8_forward
from .ops import _dropout_seed, _op_options, _op_window
from .ops import flash_attention as _plain_flash_attention
from .runtime import accumulator_dtype, check_flag


# ----------------------------------------------------------------------------
# Dense masks and biases, as mods
# ----------------------------------------------------------------------------
@triton.jit
def _dense_mask(b, h, q_idx, kv_idx, args):
    """args = (mask, stride_b, stride_h, stride_q, stride_k): a bool tensor read through its (broadcast) strides."""
    MASK = args[0]
    return tl.load(MASK + b * args[1] + h * args[2] + q_idx * args[3] + kv_idx * args[4]) != 0


@triton.jit
def _dense_bias(score, b, h, q_idx, kv_idx, args):
    """args = (bias, stride_b, stride_h, stride_q, stride_k, n_heads, n_q, n_k): the score plus bias[b, h, q, kv]."""
    BIAS = args[0]
    return score + tl.load(BIAS + b * args[1] + h * args[2] + q_idx * args[3] + kv_idx * args[4]).to(tl.float32)


@triton.jit
def _dense_bias_bwd(grad, score, b, h, q_idx, kv_idx, args, grad_args, ACCUMULATE: tl.constexpr):
    """d(score + bias)/d score = 1; d/d bias[b, h, q, kv] = grad, into the full (B, H, Nq, Nk) buffer.

    Each (b, h, q, kv) gets its one grad, plus zeros where a padding row or key was clamped onto it:
    adding zeros leaves the sum exact in any order, so atomics here are still bitwise reproducible.
    """
    if ACCUMULATE:
        n_heads, n_q, n_k = args[5], args[6], args[7]
        row = (b * n_heads + h) * n_q + q_idx
        tl.atomic_add(grad_args[0] + row.to(tl.int64) * n_k + kv_idx, grad, sem="relaxed")
    return grad


def _broadcast_strides(t, shape, name):
    """t's strides as a view broadcast to `shape` (B, H, Nq, Nk): 0 along its dimensions of size 1."""
    if t.dim() > 4:
        raise ValueError(f"{name} must have at most 4 dimensions, broadcastable to {tuple(shape)}, got {tuple(t.shape)}")
    try:
        view = t.expand(shape) if t.dim() == 4 else t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)).expand(shape)
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to (B, Hq, Nq, Nk) = "
                         f"{tuple(shape)}") from None
    return view, view.stride()


def dense_mask_mods(attn_mask, shape, block_size):
    """A MaskMod reading attn_mask, and the BlockMask of its all-False and all-True blocks."""
    if attn_mask.dtype != torch.bool:
        raise TypeError(f"attn_mask must be a bool tensor (True = visible), got {attn_mask.dtype}; "
                        "an additive float mask is attn_bias")
    mask, strides = _broadcast_strides(attn_mask, shape, "attn_mask")
    return MaskMod(_dense_mask, (mask, *strides)), block_mask_from_dense(mask, block_size)


def dense_bias_mod(attn_bias, shape):
    """A ScoreMod adding attn_bias, with its gradient into a full-size buffer (summed to attn_bias's shape later)."""
    if not attn_bias.is_floating_point():
        raise TypeError(f"attn_bias must be a floating-point tensor, got {attn_bias.dtype}")
    view, strides = _broadcast_strides(attn_bias, shape, "attn_bias")
    return ScoreMod(_dense_bias, (view, *strides, shape[1], shape[2], shape[3]), bwd=_dense_bias_bwd)


# ----------------------------------------------------------------------------
# The autograd of a call with mods
# ----------------------------------------------------------------------------
class _FlashAttentionWithMods(torch.autograd.Function):
    """flash_attention's launchers with mods. Inputs after the options: the tensors the score_mod reads that
    get gradients (a dense bias, or its ScoreMod.differentiable), so autograd tracks them."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, options, mods, *grad_tensors):
        o, lse = _flash_fwd(q, k, v, options["causal"], options["sm_scale"], sinks=sinks, mods=mods,
                            **options["kernel"])
        ctx.save_for_backward(q, k, v, o, lse, sinks)
        ctx.options, ctx.mods = options, mods
        ctx.grad_shapes = [(t.shape, t.dtype) for t in grad_tensors]
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, sinks = ctx.saved_tensors
        options, mods = ctx.options, ctx.mods
        if do is None:  # only the lse was used
            do = torch.zeros_like(o)
        dense_bias = options["dense_bias"]
        # The score_mod's gradient buffers: a full (B, Hq, Nq, Nk) one for a dense bias, else one per tensor.
        full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        grad_args = tuple(torch.zeros(full if dense_bias else shape, dtype=torch.float32, device=q.device)
                          for shape, _ in ctx.grad_shapes)
        dsinks = torch.empty(sinks.shape, dtype=lse.dtype, device=q.device) if sinks is not None else None
        dq, dk, dv = _flash_bwd(do, q, k, v, o, lse, options["causal"], options["sm_scale"], dlse=dlse, sinks=sinks,
                                dsinks=dsinks, deterministic=options["deterministic"], mods=mods, grad_args=grad_args,
                                **options["kernel"])
        grads = []
        for buffer, (shape, dtype) in zip(grad_args, ctx.grad_shapes):
            if dense_bias:
                # Sum the full-size gradient over the dimensions the bias was broadcast along.
                padded = (1,) * (4 - len(shape)) + tuple(shape)
                dims = tuple(d for d in range(4) if padded[d] == 1 and full[d] != 1)
                buffer = (buffer.sum(dim=dims, keepdim=True) if dims else buffer).reshape(shape)
            grads.append(buffer.to(dtype))
        return dq, dk, dv, dsinks.to(sinks.dtype) if sinks is not None else None, None, None, *grads


def _call_mods(q, k, causal, window_size, score_mod, mask_mod, block_mask, attn_mask, attn_bias):
    """A call's Mods, checked (a dense attn_mask and attn_bias become mods), and its dense bias or None."""
    shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if (attn_bias is not None and score_mod is not None) or (attn_mask is not None and
                                                            (mask_mod is not None or block_mask is not None)):
        raise ValueError("pass a dense attn_bias or a score_mod, and a dense attn_mask or a mask_mod/block_mask, "
                         "not both of a pair")
    bias = None
    if attn_bias is not None:
        check_mod_args((attn_bias,), q.device, "attn_bias")
        score_mod, bias = dense_bias_mod(attn_bias, shape), attn_bias
    if attn_mask is not None:
        check_mod_args((attn_mask,), q.device, "attn_mask")
        mask_mod, block_mask = dense_mask_mods(attn_mask, shape, 128)
    score_mod, mask_mod = as_score_mod(score_mod), as_mask_mod(mask_mod)
    if block_mask is not None:
        check_block_mask(block_mask, q, k, causal, window_size)
        mask_mod = mask_mod if mask_mod is not None else block_mask.mask_mod
    for name, mod in (("score_mod", score_mod), ("mask_mod", mask_mod)):
        if mod is not None:
            check_mod_args(mod.args, q.device, name)
            check_mod_shapes(mod, *shape)
    return Mods(score_mod, mask_mod, block_mask), bias


@torch.compiler.disable
def _attention_with_mods(q, k, v, causal, sm_scale, window_size, softcap, alibi_slopes, sinks, dropout_p,
                         deterministic, score_mod, mask_mod, block_mask, attn_mask, attn_bias):
    mods, bias = _call_mods(q, k, causal, window_size, score_mod, mask_mod, block_mask, attn_mask, attn_bias)
    score_mod = mods.score_mod
    differentiable = () if score_mod is None or bias is not None else score_mod.differentiable
    needs_grad = torch.is_grad_enabled() and (any(t.requires_grad for t in (q, k, v)) or differentiable
                                              or (bias is not None and bias.requires_grad))
    if needs_grad and score_mod is not None and score_mod.bwd is None:
        raise ValueError("a gradient is asked for, but the score_mod has no derivative: give it one "
                         "(ScoreMod(fn, args, bwd=...)), or call under torch.no_grad()")
    window_left, window_right = _op_window(window_size, causal)
    kernel_options = _op_options(window_left, window_right, softcap, alibi_slopes, None, dropout_p,
                                 _dropout_seed(dropout_p, q.device), None, None, 0, 0)
    del kernel_options["sinks"]  # passed apart: it is an input with a gradient
    options = dict(causal=causal, sm_scale=sm_scale, deterministic=deterministic, kernel=kernel_options,
                   dense_bias=bias is not None)
    grad_tensors = differentiable if bias is None else ((bias,) if bias.requires_grad else ())
    return _FlashAttentionWithMods.apply(q, k, v, sinks, options, mods, *grad_tensors)


@torch.compiler.disable
def _fp8_with_mods(q, k, v, causal, sm_scale, window_size, softcap, alibi_slopes, sinks, descales, out_dtype,
                   score_mod, mask_mod, block_mask, attn_mask, attn_bias):
    """The fp8 forward (kernels/fp8.py) with mods: forward-only, so no autograd around it."""
    mods, _ = _call_mods(q, k, causal, window_size, score_mod, mask_mod, block_mask, attn_mask, attn_bias)
    return fp8_forward(q, k, v, causal, sm_scale, _op_window(window_size, causal), softcap, alibi_slopes, sinks,
                       descales, out_dtype, mods=mods)


def check_block_mask(block_mask, q, k, causal, window_size):
    """A block mask built for these lengths, heads and batch, on their device, without a built-in band."""
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be a BlockMask (create_block_mask), got {type(block_mask).__name__}")
    if tuple(block_mask.seq_lengths) != (q.shape[2], k.shape[2]):
        raise ValueError(f"block_mask was built for (Nq, Nk) = {tuple(block_mask.seq_lengths)}, but q and k have "
                         f"{(q.shape[2], k.shape[2])}")
    batch, heads = block_mask.kv.shape[1], block_mask.kv.shape[2]
    if batch not in (1, q.shape[0]) or heads not in (1, q.shape[1]):
        raise ValueError(f"block_mask was built for B = {batch}, H = {heads}; q has B = {q.shape[0]}, "
                         f"Hq = {q.shape[1]} (1 broadcasts)")
    if block_mask.kv.device != q.device:
        raise ValueError(f"block_mask is on {block_mask.kv.device} but q is on {q.device}")
    if causal or window_size is not None:
        raise ValueError("with a block_mask, spell causal and sliding windows as mask_mods (kernels.mods.causal, "
                         "kernels.mods.sliding_window): the block mask decides which key blocks are visited")


def flash_attention(q, k, v, causal=False, sm_scale=None, return_lse=False, window_size=None, softcap=None,
                    alibi_slopes=None, sinks=None, dropout_p=0.0, deterministic=True, *, score_mod=None,
                    mask_mod=None, block_mask=None, attn_mask=None, attn_bias=None, q_descale=None, k_descale=None,
                    v_descale=None, out_dtype=None):
    """softmax(q k^T * sm_scale) v, fused in Triton, differentiable, with any attention pattern.

    Without score_mod, mask_mod, block_mask, attn_mask or attn_bias this is
    kernels/flash_attention.py's flash_attention (see it for q, k, v and the options).
    With them (FlexAttention's names; kernels/block_mask.py explains how a mod is written):
      score_mod   ScoreMod or @triton.jit fn(score, b, h, q_idx, kv_idx, args) -> score (natural units,
                  after softcap and ALiBi); its derivative runs in the backward
      mask_mod    MaskMod or @triton.jit fn(b, h, q_idx, kv_idx, args) -> bool, True = visible
      block_mask  BlockMask from create_block_mask: the key blocks each query block visits; its
                  mask_mod is applied on the partly visible ones (causal and window must then be mods)
      attn_mask   bool, broadcastable to (B, Hq, Nq, Nk), True = visible (SDPA's convention); all-False
                  blocks are skipped
      attn_bias   float, broadcastable to (B, Hq, Nq, Nk), added to the scaled scores; gets a gradient
    A row that sees no key outputs 0 (lse -inf). Mods run eagerly, outside torch.compile's graph.
    fp8 q, k, v take q_descale, k_descale, v_descale and out_dtype (kernels/ops.py's flash_attention says
    how), with mods too (a score_mod sees the dequantized scores); forward-only.
    """
    if score_mod is None and mask_mod is None and block_mask is None and attn_mask is None and attn_bias is None:
        return _plain_flash_attention(q, k, v, causal, sm_scale, return_lse, window_size, softcap, alibi_slopes,
                                      sinks, dropout_p, deterministic, q_descale=q_descale, k_descale=k_descale,
                                      v_descale=v_descale, out_dtype=out_dtype)
    check_flash_inputs(q, k, v, sm_scale)
    check_flash_options(q, q.shape[0], softcap, alibi_slopes, sinks, dropout_p)
    causal, return_lse, deterministic = (check_flag(value, name) for value, name in (
        (causal, "causal"), (return_lse, "return_lse"), (deterministic, "deterministic")))
    for name, t in (("attn_mask", attn_mask), ("attn_bias", attn_bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    descales = (q_descale, k_descale, v_descale)
    if q.dtype in FP8_DTYPES:
        out_dtype = check_fp8_call(q, k, v, dropout_p, out_dtype, descales)
        o, lse = _fp8_with_mods(q, k, v, causal, sm_scale, window_size, softcap, alibi_slopes, sinks, descales,
                                out_dtype, score_mod, mask_mod, block_mask, attn_mask, attn_bias)
        return (o, lse) if return_lse else o
    if q_descale is not None or k_descale is not None or v_descale is not None or out_dtype is not None:
        check_no_descales(q, out_dtype, descales)
    o, lse = _attention_with_mods(q, k, v, causal, sm_scale, window_size, softcap, alibi_slopes, sinks,
                                  float(dropout_p), deterministic, score_mod, mask_mod, block_mask, attn_mask,
                                  attn_bias)
    return (o, lse) if return_lse else o


__all__ = ["flash_attention", "ScoreMod", "MaskMod", "BlockMask", "NO_MODS", "accumulator_dtype"]
