"""The torch.library ops, their autograd, and the public `flash_attention` and `flash_attention_varlen`.

kernels/flash_attention.py holds the launchers (check, allocate, choose a
config, launch); this file makes them differentiable (a custom op pair for
torch.compile, an autograd.Function for eager calls) and is where a call
enters: its options checked in the caller's words, then the cheapest path
that serves it (_attention). fp8 q, k and v take kernels/fp8.py's forward.
"""
import math

import torch

from reference.fp8 import FP8_DTYPES

from .flash_attention import (_flash_bwd, _flash_fwd, _window_bounds, check_flash_inputs, check_flash_options)
from .fp8 import check_fp8_call, check_no_descales, fp8_forward
from .runtime import accumulator_dtype, check_flag
from .tiles import UNLIMITED


# ----------------------------------------------------------------------------
# The torch.library ops and their autograd, and the eager autograd.Function
#
# Registering the kernels as custom ops, each with a fake (shape-only)
# implementation, lets torch.compile trace a model that calls them without a
# graph break; register_autograd makes the forward op differentiable through
# the backward op (torch builds the autograd.Function from these two pieces).
# The options travel packed in two lists, since the dispatcher's cost per call
# grows with the number of arguments (its default filling above all):
#     ints    (causal, window_left, window_right, max_seqlen_q, max_seqlen_k, deterministic), -1 for an open side
#     floats  (sm_scale, softcap, dropout_p), softcap 0.0 when off
# In eager mode the ops' dispatch is pure host cost, paid on every call:
# `_attention` below goes around it.
# ----------------------------------------------------------------------------
def _op_options(window_left, window_right, softcap, alibi_slopes, sinks, dropout_p, seed, cu_seqlens_q,
                cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """The launchers' keyword options from the ops' (window bounds as ints, -1 for an open side; softcap 0.0 off)."""
    varlen = cu_seqlens_q is not None
    return dict(window_size=(window_left, window_right), softcap=softcap or None, alibi_slopes=alibi_slopes,
                sinks=sinks, dropout_p=dropout_p, seed=seed,
                cu_seqlens=(cu_seqlens_q, cu_seqlens_k) if varlen else None,
                max_seqlens=(max_seqlen_q, max_seqlen_k) if varlen else None)


def _unpack(ints, floats, alibi_slopes, sinks, seed, cu_seqlens_q, cu_seqlens_k):
    """(causal, sm_scale, the launchers' keyword options) from the ops' packed arguments."""
    causal, window_left, window_right, max_seqlen_q, max_seqlen_k, deterministic = ints
    sm_scale, softcap, dropout_p = floats
    options = _op_options(window_left, window_right, softcap, alibi_slopes, sinks, dropout_p, seed, cu_seqlens_q,
                          cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return bool(causal), sm_scale, dict(options, deterministic=bool(deterministic))


@torch.library.custom_op("attention_playground::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alibi_slopes: torch.Tensor | None,
                       sinks: torch.Tensor | None, seed: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None,
                       cu_seqlens_k: torch.Tensor | None, ints: list[int],
                       floats: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    causal, sm_scale, options = _unpack(ints, floats, alibi_slopes, sinks, seed, cu_seqlens_q, cu_seqlens_k)
    return _flash_fwd(q, k, v, causal, sm_scale, **options)


@_flash_attn_fwd_op.register_fake
def _(q, k, v, alibi_slopes, sinks, seed, cu_seqlens_q, cu_seqlens_k, ints, floats):
    lse_shape = q.shape[:3] if cu_seqlens_q is None else (q.shape[1], q.shape[0])
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(lse_shape, dtype=accumulator_dtype(q.dtype))


@torch.library.custom_op("attention_playground::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                       lse: torch.Tensor, dlse: torch.Tensor | None, alibi_slopes: torch.Tensor | None,
                       sinks: torch.Tensor | None, seed: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None,
                       cu_seqlens_k: torch.Tensor | None, ints: list[int], floats: list[float],
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    causal, sm_scale, options = _unpack(ints, floats, alibi_slopes, sinks, seed, cu_seqlens_q, cu_seqlens_k)
    dsinks = torch.empty(sinks.shape if sinks is not None else (0,), dtype=lse.dtype, device=q.device)
    dq, dk, dv = _flash_bwd(do, q, k, v, o, lse, causal, sm_scale, dlse=dlse, dsinks=dsinks, **options)
    return dq, dk, dv, dsinks


@_flash_attn_bwd_op.register_fake
def _(do, q, k, v, o, lse, dlse, alibi_slopes, sinks, seed, cu_seqlens_q, cu_seqlens_k, ints, floats):
    dsinks = lse.new_empty(sinks.shape if sinks is not None else (0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsinks


def _setup_context(ctx, inputs, output):
    q, k, v, alibi_slopes, sinks, seed, cu_seqlens_q, cu_seqlens_k, ints, floats = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, alibi_slopes, sinks, seed, cu_seqlens_q, cu_seqlens_k)
    ctx.ints, ctx.floats = ints, floats
    # An lse nobody uses gets no gradient: keep it None instead of a tensor of zeros.
    ctx.set_materialize_grads(False)


def _backward(ctx, do, dlse):
    q, k, v, o, lse, alibi_slopes, sinks, seed, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    if do is None:  # only the lse was used
        do = torch.zeros_like(o)
    dq, dk, dv, dsinks = _flash_attn_bwd_op(do, q, k, v, o, lse, dlse, alibi_slopes, sinks, seed, cu_seqlens_q,
                                            cu_seqlens_k, ctx.ints, ctx.floats)
    dsinks = dsinks.to(sinks.dtype) if sinks is not None else None
    return dq, dk, dv, None, dsinks, None, None, None, None, None


_flash_attn_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _FlashAttention(torch.autograd.Function):
    """The ops' autograd in eager mode, on the launchers directly: the same kernels, without the dispatch.

    forward(q, k, v, sinks, call) -> (o, lse), call being (causal, sm_scale, return_lse, options) with
    options _flash_fwd's keywords (one argument: apply's wrapper walks every argument of every call);
    lse is differentiable only when the caller returns it. torch.compile traces the custom ops
    instead (_attention).
    """

    @staticmethod
    def forward(ctx, q, k, v, sinks, call):
        causal, sm_scale, return_lse, options = call
        prepared = []  # the options' kernel arguments, worked out once for both passes
        o, lse = _flash_fwd(q, k, v, causal, sm_scale, sinks=sinks, _prepared=prepared, **options)
        if not return_lse:
            ctx.mark_non_differentiable(lse)  # nobody can use it: one output less for autograd to track
        ctx.save_for_backward(q, k, v, o, lse, sinks)
        ctx.call, ctx.prepared = call, (prepared[0] if prepared else None)
        ctx.set_materialize_grads(False)  # as _setup_context
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, sinks = ctx.saved_tensors
        if do is None:  # only the lse was used
            do = torch.zeros_like(o)
        dsinks = None if sinks is None else torch.empty(sinks.shape, dtype=lse.dtype, device=q.device)
        causal, sm_scale, _, options = ctx.call
        dq, dk, dv = _flash_bwd(do, q, k, v, o, lse, causal, sm_scale, dlse=dlse, sinks=sinks, dsinks=dsinks,
                                _prepared=ctx.prepared, **options)
        return dq, dk, dv, (dsinks.to(sinks.dtype) if sinks is not None else None), None


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------
def _dropout_seed(dropout_p, device):
    """A Philox seed drawn from torch's default generator: torch.manual_seed makes dropout repeatable."""
    if not dropout_p:
        return None
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def _op_window(window_size, causal):
    left, right = _window_bounds(window_size, causal)
    return (-1 if left >= UNLIMITED else left), (-1 if right >= UNLIMITED else right)


def _attention(q, k, v, causal, sm_scale, window, softcap, alibi_slopes, sinks, dropout_p, deterministic,
               return_lse, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0):
    """One checked call down the cheapest path that serves it; window: (left, right), -1 for an open side.

        torch.compile tracing, or a tensor subclass (FakeTensor, ...)  the custom op, which they dispatch
        eager, and q, k, v or sinks require grad                       _FlashAttention (autograd)
        eager, nothing to differentiate                                _flash_fwd, the launcher itself
    Every path runs the same launchers on the same arguments, so they give the same bits.
    """
    seed = _dropout_seed(dropout_p, q.device)
    if torch.compiler.is_compiling() or type(q) is not torch.Tensor or type(k) is not torch.Tensor or \
            type(v) is not torch.Tensor:
        return _flash_attn_fwd_op(q, k, v, alibi_slopes, sinks, seed, cu_seqlens_q, cu_seqlens_k,
                                  [int(causal), window[0], window[1], max_seqlen_q, max_seqlen_k, int(deterministic)],
                                  [sm_scale, float(softcap or 0.0), float(dropout_p)])
    cu_seqlens = None if cu_seqlens_q is None else (cu_seqlens_q, cu_seqlens_k)
    max_seqlens = None if cu_seqlens_q is None else (max_seqlen_q, max_seqlen_k)
    if window[0] == -1 and (window[1] == -1 or causal):
        window = None  # no window (causal's right bound comes from causal): no bounds to read again
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                    or (sinks is not None and sinks.requires_grad)):
        return _FlashAttention.apply(q, k, v, sinks, (causal, sm_scale, return_lse, dict(
            window_size=window, softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p, seed=seed,
            cu_seqlens=cu_seqlens, max_seqlens=max_seqlens, deterministic=deterministic)))
    return _flash_fwd(q, k, v, causal, sm_scale, window_size=window, softcap=softcap, alibi_slopes=alibi_slopes,
                      sinks=sinks, dropout_p=dropout_p, seed=seed, cu_seqlens=cu_seqlens, max_seqlens=max_seqlens,
                      deterministic=deterministic)


def flash_attention(q, k, v, causal=False, sm_scale=None, return_lse=False, window_size=None, softcap=None,
                    alibi_slopes=None, sinks=None, dropout_p=0.0, deterministic=True, *, q_descale=None,
                    k_descale=None, v_descale=None, out_dtype=None):
    """softmax(q k^T * sm_scale) v, fused in Triton, differentiable.

    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D), with Hq a multiple of Hkv (GQA/MQA)
    and 1 <= D <= 256; fp32, fp16 or bf16 (float64 too, for gradcheck); any strides. causal masks bottom-right
    (query i sees key j <= i + Nk - Nq). sm_scale defaults to 1/sqrt(D).
    Options (FlashAttention's names and conventions; `reference.naive_attention` spells each out):
      window_size   (left, right): query i sees keys i + Nk - Nq - left .. i + Nk - Nq + right;
                    None or -1 on a side = unlimited; causal sets right = 0. Blocks outside are skipped.
      softcap       scores become softcap * tanh(s / softcap); None or 0 = off
      alibi_slopes  (Hq,) or (B, Hq): the score gets -slope * |i + Nk - Nq - j|
      sinks         (Hq,): one logit per head in every row's normaliser, with no value (gpt-oss); trainable
      dropout_p     dropout on the probabilities, seeded from torch's default generator
      deterministic True: the backward sums in a fixed order (bitwise reproducible); False: one fused
                    backward kernel adds dQ with atomics (FlashAttention-2's scheme; faster, not reproducible)
    fp8 (kernels/fp8.py): q, k, v in float8_e4m3fn (or e5m2) with q_descale, k_descale, v_descale, fp32
    tensors of one element or (B, Hkv) (stored value * descale = value, FlashAttention-3's names);
    forward-only, on sm_89 and newer, o in out_dtype (bf16 by default, or fp16), no dropout.
    Returns o (B, Hq, Nq, D) in q's dtype, and with return_lse=True also the
    natural-log log-sum-exp of each row's scores (the sink included), lse (B, Hq, Nq) in fp32
    (float64 for float64 inputs; -inf for a row with no visible key and no sink, whose output is 0).
    Shapes only are read on the host: no host-device sync. Under torch.compile it is a custom op;
    in eager mode it calls the launcher directly (see _attention).
    """
    check_flash_inputs(q, k, v, sm_scale)
    check_flash_options(q, q.shape[0], softcap, alibi_slopes, sinks, dropout_p)
    return _checked_forward(q, k, v, causal, sm_scale, window_size, softcap, alibi_slopes, sinks, dropout_p,
                            deterministic, return_lse, (q_descale, k_descale, v_descale), out_dtype)


def _checked_forward(q, k, v, causal, sm_scale, window_size, softcap, alibi_slopes, sinks, dropout_p, deterministic,
                     return_lse, descales, out_dtype, packed=()):
    """The rest of flash_attention and flash_attention_varlen (packed: their offsets and maximum lengths):
    the flags checked, the default scale, then the fp8 forward or _attention."""
    causal = check_flag(causal, "causal")
    return_lse = check_flag(return_lse, "return_lse")
    deterministic = check_flag(deterministic, "deterministic")
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    window = _op_window(window_size, causal)
    if q.dtype in FP8_DTYPES:
        out_dtype = check_fp8_call(q, k, v, dropout_p, out_dtype, descales)
        o, lse = fp8_forward(q, k, v, causal, sm_scale, window, softcap, alibi_slopes, sinks, descales, out_dtype,
                             *packed)
    else:
        if out_dtype is not None or descales[0] is not None or descales[1] is not None or descales[2] is not None:
            check_no_descales(q, out_dtype, descales)
        o, lse = _attention(q, k, v, causal, sm_scale, window, softcap, alibi_slopes, sinks, dropout_p,
                            deterministic, return_lse, *packed)
    return (o, lse) if return_lse else o


def check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, sm_scale=None,
                        validate=False):
    """Raise a clear error, naming the argument, for packed inputs the kernels cannot take.

    Shapes, dtypes and devices always (no data read). validate=True also reads the offsets on the
    host (a device-to-host sync) and checks that they start at 0, never decrease, end at the packed
    token count and fit max_seqlen_*; skipped under torch.compile, where reading would break the graph.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must have rank 3 (total_tokens, heads, head_dim), got shape {tuple(t.shape)}")
    # The padded-layout checks apply to a (1, H, total, D) view of the same tensors.
    check_flash_inputs(*(t.transpose(0, 1)[None] for t in (q, k, v)), sm_scale)
    for name, cu, max_name, max_len in (("cu_seqlens_q", cu_seqlens_q, "max_seqlen_q", max_seqlen_q),
                                        ("cu_seqlens_k", cu_seqlens_k, "max_seqlen_k", max_seqlen_k)):
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
            described = f"{cu.dtype} of shape {tuple(cu.shape)}" if isinstance(cu, torch.Tensor) else type(cu).__name__
            raise TypeError(f"{name} must be a 1-D int32 tensor of B + 1 offsets, got {described}")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}")
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 0:
            raise TypeError(f"{max_name} must be a non-negative int, got {max_len!r}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")
    if validate and not torch.compiler.is_compiling():
        validate_varlen_offsets(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)


def validate_varlen_offsets(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """Read cu_seqlens on the host and raise, naming the argument, on offsets the kernels cannot take (a sync)."""
    for name, cu, total, max_name, max_len in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], "max_seqlen_q",
                                                max_seqlen_q),
                                               ("cu_seqlens_k", cu_seqlens_k, k.shape[0], "max_seqlen_k",
                                                max_seqlen_k)):
        offsets = cu.tolist()
        if offsets[0] != 0 or any(b < a for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"{name} must start at 0 and never decrease, got {offsets[:8]}...")
        if offsets[-1] != total:
            raise ValueError(f"{name} must end at the number of packed tokens ({total}), got {offsets[-1]}")
        longest = max(b - a for a, b in zip(offsets, offsets[1:]))
        if max_len < longest:
            raise ValueError(f"{max_name} ({max_len}) is shorter than the longest sequence in {name} ({longest})")


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False,
                           sm_scale=None, return_lse=False, window_size=None, softcap=None, alibi_slopes=None,
                           sinks=None, dropout_p=0.0, deterministic=True, validate=False, *, q_descale=None,
                           k_descale=None, v_descale=None, out_dtype=None):
    """Attention over packed sequences of different lengths, with no compute spent on padding.

    q: (total_q, Hq, D) and k, v: (total_k, Hkv, D) hold B sequences one after
    another; cu_seqlens_q and cu_seqlens_k are (B + 1,) int32 prefix sums from 0
    (sequence b owns rows cu_seqlens[b]:cu_seqlens[b + 1]); max_seqlen_* bound
    the lengths. A sequence never attends across its boundary, an empty one is
    allowed, and causal is bottom-right within each sequence. Options are
    `flash_attention`'s (alibi_slopes may be (B, Hq)), fp8 with its descales included
    ((B, Hkv) per sequence and kv head). Returns o (total_q, Hq, D),
    and with return_lse=True also lse (Hq, total_q).
    validate: read cu_seqlens on the host and check them first (one device-to-host sync; clear
    errors). Without it nothing is read on the host and the offsets are trusted, as FlashAttention's
    flash_attn_varlen_func trusts them: offsets that decrease or pass the packed tokens make the
    kernels read and write outside the sequences.
    """
    check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, sm_scale,
                        check_flag(validate, "validate"))
    check_flash_options(q, cu_seqlens_q.shape[0] - 1, softcap, alibi_slopes, sinks, dropout_p)
    return _checked_forward(q, k, v, causal, sm_scale, window_size, softcap, alibi_slopes, sinks, dropout_p,
                            deterministic, return_lse, (q_descale, k_descale, v_descale), out_dtype,
                            (cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k)))
