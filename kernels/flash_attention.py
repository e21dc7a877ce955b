"""Flash attention's launchers, its torch.library op with autograd, and `flash_attention`.

The kernels live one family per file, read in this order:
    kernels/tiles.py       tile loads and the causal key range, shared by every kernel
    kernels/flash_fwd.py   the forward kernel (the online softmax, derived in its docstring)
    kernels/flash_bwd.py   the backward kernels (delta, dK/dV, dQ)
    kernels/configs.py     the launch configurations: which fit which GPU, and how one is chosen
    this file              option checks -> launchers (allocate, choose a config, launch on the inputs' device) ->
                           the torch.library ops with their autograd -> `flash_attention`,
                           `flash_attention_varlen`

Every option is a compile-time switch of the same three kernels: a call pays
only for what it asks for, and the forward and backward share one
description of each variant (kernels/tiles.py).
"""
import functools
import math

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation

from reference.functional import check_attention_inputs

from . import runtime
from .configs import KERNELS as CONFIGS
from .block_mask import DEFAULT_BLOCK_SIZE, NO_MODS
from .configs import launch
from .flash_bwd import _attn_bwd_dkdv, _attn_bwd_dq, _attn_bwd_preprocess
from .flash_fwd import _attn_fwd
from .runtime import accumulator_dtype, check_flag, check_runnable, dot_precision, has_tma, upcast_tiles
from .tiles import MAX_HEAD_DIM, UNLIMITED, _dropout_mask_kernel, _head_dim_pad

PREPROCESS_BLOCK_M = 64  # delta = rowsum(dO * O) is a streaming reduction: one fixed tile


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


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


# ----------------------------------------------------------------------------
# Options: checked once, in the caller's words, then turned into kernel arguments
# ----------------------------------------------------------------------------
INT32_MAX = 2**31 - 1


def _window_bounds(window_size, causal):
    """(left, right) as kernel ints, UNLIMITED for an open side; causal sets right = 0."""
    left = right = UNLIMITED
    if window_size is not None:
        if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2):
            raise TypeError(f"window_size must be a pair (left, right) or None, got {window_size!r}")
        bounds = []
        for side, value in zip(("left", "right"), window_size):
            if value is None or value == -1:  # -1 is FlashAttention's spelling of "unlimited"
                bounds.append(UNLIMITED)
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"window_size {side} must be an int, -1 or None, got {value!r}")
            if value < 0:
                raise ValueError(f"window_size {side} must be >= 0 (or -1 / None for unlimited), got {value}")
            bounds.append(min(value, UNLIMITED))
        left, right = bounds
    if causal:
        right = 0
    return left, right


def check_flash_options(q, batch, softcap=None, alibi_slopes=None, sinks=None, dropout_p=0.0):
    """Raise a clear error, naming the argument, for an option the kernels cannot take."""
    h_q = q.shape[-3] if q.dim() == 4 else q.shape[-2]
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap):
            raise TypeError(f"softcap must be a finite float or None, got {softcap!r}")
        if softcap < 0:
            raise ValueError(f"softcap must be >= 0 (0 or None turns it off), got {softcap}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {dropout_p!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    for name, t, shapes in (("alibi_slopes", alibi_slopes, [(h_q,), (batch, h_q)]), ("sinks", sinks, [(h_q,)])):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if tuple(t.shape) not in shapes:
            expected = " or ".join(str(s) for s in shapes)
            raise ValueError(f"{name} must have shape {expected} for {h_q} query heads, got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")


def _check_tile_offsets(**tensors):
    """Offsets inside a tile are 32-bit (block starts are 64-bit): refuse strides that would overflow them."""
    for name, (t, dims) in tensors.items():
        for dim in dims:
            if t.stride(dim) * MAX_HEAD_DIM > INT32_MAX:
                raise ValueError(f"{name}.stride({dim}) = {t.stride(dim)} is too large: offsets within one tile "
                                 f"would pass 2**31 elements; make {name} contiguous")


TMA_ALIGNMENT = 16  # bytes: a TMA descriptor's start address and its row strides are multiples of this


def _descriptor_loads_allowed(*tensors):
    """Whether the forward may read these tensors through TMA descriptors (kernels/tiles.py, _row_descriptor).

    TMA wants a unit last stride, and the start and every other stride 16-byte
    aligned. Anything else (a strided view, a head dim of 4 fp16 values) takes
    the pointer path: the chooser offers descriptor configs only when this holds.
    """
    return all(t.stride(-1) == 1 and t.data_ptr() % TMA_ALIGNMENT == 0
               and all(stride * t.element_size() % TMA_ALIGNMENT == 0 for stride in t.stride()[:-1])
               for t in tensors)


def _descriptor_scratch(size, alignment, stream):
    """Global memory for the descriptors the forward builds on the device: 128 bytes per descriptor and program.

    On the current device, which the launcher has made the inputs' (runtime.on_device).
    """
    return torch.empty(size, dtype=torch.int8, device=torch.cuda.current_device())


def _ensure_descriptor_allocator():
    """Give Triton an allocator for descriptor scratch, unless the program has set its own.

    A kernel that builds tensor descriptors on the device asks Triton's
    allocator (triton.set_allocator) for their global scratch at launch, and
    fails without one. Set here, only when a descriptor config can run (a GPU
    with TMA): the setting is per thread (a context variable), so every thread
    that calls the forward passes here once.
    """
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_descriptor_scratch)


def _variant_arguments(q, causal, sm_scale, window, softcap, alibi_slopes, sinks, dropout_p, seed, cu_seqlens,
                       lse):
    """The pointers, scalars, strides and switches every attention kernel takes after its own tensors."""
    placeholder = lse  # any tensor: a switched-off option's pointer is never read
    window_left, window_right = window
    has_window = window_left < UNLIMITED or (window_right < UNLIMITED and not causal)
    # The kernels index cu_seqlens, the slopes and the sinks as contiguous vectors.
    cu_q, cu_k = (c.contiguous() for c in cu_seqlens) if cu_seqlens is not None else (placeholder, placeholder)
    alibi = alibi_slopes.float().contiguous() if alibi_slopes is not None else placeholder
    # ALiBi slopes (Hq,) are shared by the batch: batch stride 0.
    alibi_strides = (0, 0) if alibi_slopes is None else (
        (0, alibi.stride(0)) if alibi.dim() == 1 else (alibi.stride(0), alibi.stride(1)))
    # lse is (B, Hq, Nq) for padded batches and (Hq, total_q) for packed ones.
    lse_strides = (lse.stride(0), lse.stride(1)) if lse.dim() == 3 else (0, lse.stride(0))
    pointers = (cu_q, cu_k, alibi, seed if dropout_p > 0 else placeholder)
    scalars = (sm_scale, float(softcap or 0.0), float(dropout_p), window_left, window_right)
    flags = dict(IS_CAUSAL=bool(causal), HAS_WINDOW=has_window, HAS_SOFTCAP=bool(softcap),
                 HAS_ALIBI=alibi_slopes is not None, HAS_DROPOUT=dropout_p > 0, IS_VARLEN=cu_seqlens is not None,
                 UPCAST=upcast_tiles(q.dtype), DOT_PRECISION=dot_precision(q.dtype), ACC_DTYPE=_tl_dtype(lse.dtype))
    sinks = sinks.to(lse.dtype).contiguous() if sinks is not None else placeholder  # float64 for gradcheck
    return pointers, sinks, scalars, (*lse_strides, *alibi_strides), flags


# The compile-time switches that change which config is best; the tuned tables name a variant by them.
_SWITCHES = ("IS_CAUSAL", "HAS_WINDOW", "HAS_SOFTCAP", "HAS_ALIBI", "HAS_SINKS", "HAS_DROPOUT", "IS_VARLEN", "FUSED_DQ")


def _switches(flags, gqa, mods=NO_MODS):
    return (*((name, flags[name]) for name in _SWITCHES if name in flags), ("IS_GQA", gqa), ("HAS_MODS", bool(mods)))


def _value_dims(v):
    """The value head dim, and its padded tile width: MLA's values are narrower than its queries and keys."""
    return dict(HEAD_DIM_V=v.shape[-1], HEAD_DIM_V_PAD=_head_dim_pad(v.shape[-1]))


def _fits_block_mask(config, block_mask, kernel):
    """A block mask's blocks must hold whole tiles: refuse, naming both, a config whose tiles are larger."""
    if block_mask is None:
        return
    block_m, block_n = block_mask.block_size
    if config.kwargs["BLOCK_M"] > block_m or config.kwargs["BLOCK_N"] > block_n:
        raise ValueError(f"block_mask's blocks ({block_m} x {block_n}) are smaller than the {kernel} kernel's tiles "
                         f"here ({config.kwargs['BLOCK_M']} x {config.kwargs['BLOCK_N']}): build it with a larger "
                         f"BLOCK_SIZE (the default, {DEFAULT_BLOCK_SIZE}, fits every chip)")


def _check_hopper_options(config, flags, descriptors):
    """Refuse, with the reason, a forced config (only_config) whose Hopper options cannot run this call."""
    if config.kwargs.get("USE_TMA", False) and not descriptors:
        raise ValueError(f"config {{{config}}} loads through tensor descriptors, which need q, k and v with a unit "
                         "last stride and a 16-byte aligned start and other strides; these inputs are not")
    if config.kwargs.get("WARP_SPECIALIZE", False) and flags["IS_VARLEN"]:
        raise ValueError(f"config {{{config}}} is warp-specialized, which Triton 3.6 cannot compile for packed "
                         "sequences")


def _layout(q, k, cu_seqlens, max_seqlens):
    """(batch, h_q, h_kv, n_q, n_k, strides of a 4-D (z, h, token, d) view) for padded or packed inputs."""
    if cu_seqlens is None:
        batch, h_q, n_q, _ = q.shape
        return batch, h_q, k.shape[1], n_q, k.shape[2], lambda t: t.stride()
    # Packed (total, H, D): the batch offset comes from cu_seqlens, so its stride is 0.
    return (cu_seqlens[0].numel() - 1, q.shape[1], k.shape[1], *max_seqlens,
            lambda t: (0, t.stride(1), t.stride(0), t.stride(2)))


def _flash_fwd(q, k, v, causal, sm_scale, o=None, lse=None, *, window_size=None, softcap=None, alibi_slopes=None,
               sinks=None, dropout_p=0.0, seed=None, cu_seqlens=None, max_seqlens=None, deterministic=True,
               mods=NO_MODS):
    """Run the forward kernel. Returns o in q's layout and dtype, and lse in fp32 (float64 for float64).

    Padded: q (B, Hq, Nq, D) -> lse (B, Hq, Nq). Packed: q (total_q, Hq, D) with
    cu_seqlens = (cu_seqlens_q, cu_seqlens_k) and max_seqlens = (max_q, max_k) -> lse (Hq, total_q).
    o and lse may be passed in (tests pass NaN-filled buffers to catch unwritten elements).
    seed is a one-element int64 tensor, needed when dropout_p > 0. deterministic=False lets opt-in
    autotuning (kernels/configs.py) time the candidates for a new shape. mods: the call's
    score_mod, mask_mod and block_mask (kernels/block_mask.py).
    """
    batch, h_q, h_kv, n_q, n_k, strides = _layout(q, k, cu_seqlens, max_seqlens)
    head_dim = q.shape[-1]
    lse_shape = (batch, h_q, n_q) if cu_seqlens is None else (h_q, q.shape[0])
    o = torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device) if o is None else o
    lse = torch.empty(lse_shape, dtype=accumulator_dtype(q.dtype), device=q.device) if lse is None else lse
    if q.numel() == 0:
        return o, lse
    if k.numel() == 0:  # no key at all: every row outputs 0 (and a sink's row has lse = the sink)
        o.zero_()
        if sinks is None:
            lse.fill_(float("-inf"))
        else:
            lse.copy_(sinks.to(lse.dtype)[:, None].expand(h_q, lse.shape[-1]).reshape(lse.shape)
                      if lse.dim() == 2 else sinks.to(lse.dtype)[None, :, None].expand(lse.shape))
        return o, lse
    rows = (-2, -1) if cu_seqlens is None else (0, -1)  # the token and head-dim strides
    _check_tile_offsets(q=(q, rows), k=(k, rows), v=(v, rows), o=(o, rows))
    pointers, sinks_arg, scalars, strides_lse_alibi, flags = _variant_arguments(
        q, causal, sm_scale, _window_bounds(window_size, causal), softcap, alibi_slopes, sinks, dropout_p, seed,
        cu_seqlens, lse)

    # Descriptor (TMA) loads of q, k, v are a config option when their layout allows them.
    descriptors = _descriptor_loads_allowed(q, k, v)
    if descriptors and has_tma(q.device):
        _ensure_descriptor_allocator()
    flags["HAS_SINKS"] = sinks is not None
    head_dim_pad = _head_dim_pad(head_dim)
    # Warp specialization is for the plain key loop: not for causal or windowed calls (their masked
    # diagonal blocks), nor packed sequences (with their early exit Triton 3.6 cannot compile the
    # kernel), nor mods (their block lists are more loops).
    warp_specialize = not (flags["IS_CAUSAL"] or flags["HAS_WINDOW"] or flags["IS_VARLEN"] or mods)
    block_mask, bm_strides, score_args, mask_args, mod_constexprs = mods.kernel_arguments(lse)
    args = (q, k, v, o, lse, pointers[0], pointers[1], sinks_arg, pointers[2], pointers[3], block_mask, lse,
            *scalars, *strides(q), *strides(k), *strides(v), *strides(o), *strides_lse_alibi, *bm_strides, 0, 0, 0,
            h_q, h_q // h_kv, n_q, n_k, score_args, mask_args)
    tiles_limit = mods.block_mask.block_size if mods.block_mask is not None else (n_q, n_k)
    with runtime.on_device(q.device):
        config = launch(CONFIGS["fwd"], _attn_fwd, lambda c: (triton.cdiv(n_q, c.kwargs["BLOCK_M"]) * batch * h_q,),
                        args, dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, **_value_dims(v), **flags,
                                   **mod_constexprs),
                        dtype=q.dtype, n_q=min(n_q, tiles_limit[0]), n_k=min(n_k, tiles_limit[1]),
                        switches=_switches(flags, h_q != h_kv, mods), tma=descriptors,
                        warp_specialize=warp_specialize, deterministic=deterministic,
                        check=lambda c: _check_hopper_options(c, flags, descriptors),
                        scratch=lambda: (*args[:3], torch.empty_like(o), torch.empty_like(lse), *args[5:]),
                        fits=lambda c: _fits_block_mask(c, mods.block_mask, "forward"))
    return o, lse


@functools.lru_cache(maxsize=None)
def _sm_count(device) -> int:
    """The GPU's SM count, asked once per device. The interpreter runs one program at a time: to it, one "SM"."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _gqa_splits(programs, group, device) -> int:
    """How many programs share one kv head's query heads in dK/dV: enough to fill the GPU, dividing the group."""
    wanted = triton.cdiv(_sm_count(device), max(programs, 1))
    return next((d for d in range(1, group + 1) if group % d == 0 and d >= wanted), group)


def _flash_bwd(do, q, k, v, o, lse, causal, sm_scale, dlse=None, dq=None, dk=None, dv=None, *, window_size=None,
               softcap=None, alibi_slopes=None, sinks=None, dsinks=None, dropout_p=0.0, seed=None,
               cu_seqlens=None, max_seqlens=None, deterministic=True, gqa_splits=None, mods=NO_MODS, grad_args=()):
    """Run the backward kernels. Returns dq, dk, dv in the dtypes of q, k, v.

    dlse, the gradient flowing into the returned lse (if any), enters through
    delta: d lse_i / d S_ij = P_ij, so it adds P_ij * dlse_i to dS_ij, which is
    the same as subtracting dlse_i from delta_i. With sinks, their gradient is
    written into dsinks (a (Hq,) buffer) when one is given.
    deterministic=False fuses dQ into the dK/dV kernel with atomic adds (faster,
    not bitwise reproducible). gqa_splits: how many programs share a GQA group's
    query heads in dK/dV (None: enough to fill the GPU); their fp32 partial sums
    are added in a fixed order. mods: the forward's; grad_args: zeroed fp32 buffers, one per
    tensor of the score_mod's args that requires grad, into which its derivative adds.
    """
    batch, h_q, h_kv, n_q, n_k, strides = _layout(q, k, cu_seqlens, max_seqlens)
    head_dim = q.shape[-1]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if dq is None else dq
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if dk is None else dk
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if dv is None else dv
    if dsinks is not None:
        dsinks.zero_()
    if q.numel() == 0 or k.numel() == 0:
        if k.numel() == 0 and sinks is not None and dsinks is not None and dlse is not None:
            # No key: each row's lse is its sink, so d sink is the sum of the gradient into lse.
            dsinks.copy_(dlse.sum(dim=(0, 2) if dlse.dim() == 3 else 1))
        return dq.zero_(), dk.zero_(), dv.zero_()
    head_dim_pad = _head_dim_pad(head_dim)
    rows = (-2, -1) if cu_seqlens is None else (0, -1)  # the token and head-dim strides
    _check_tile_offsets(q=(q, rows), k=(k, rows), v=(v, rows), o=(o, rows), do=(do, rows), dq=(dq, rows),
                        dk=(dk, rows), dv=(dv, rows))

    delta = torch.empty_like(lse)
    # delta is per row: packed sequences go through as one batch of total_q rows.
    rows, pre_batch = (n_q, batch) if cu_seqlens is None else (q.shape[0], 1)
    lse_strides = (lse.stride(0), lse.stride(1)) if lse.dim() == 3 else (0, lse.stride(0))
    with runtime.on_device(q.device):
        _attn_bwd_preprocess[(triton.cdiv(rows, PREPROCESS_BLOCK_M) * pre_batch * h_q,)](
            o, do, delta, *strides(o), *strides(do), *lse_strides, h_q, rows,
            HEAD_DIM=v.shape[-1], HEAD_DIM_PAD=_head_dim_pad(v.shape[-1]), BLOCK_M=PREPROCESS_BLOCK_M,
        )
    if dlse is not None:
        delta -= dlse
    if sinks is not None and dsinks is not None:
        # d sink = -sum_i P_sink,i * delta_i, with P_sink,i = exp(sink - lse_i): one reduction, no kernel.
        sink = sinks.to(lse.dtype)[None, :, None] if lse.dim() == 3 else sinks.to(lse.dtype)[:, None]
        p_sink = torch.exp(sink - lse)
        dsinks.copy_(-(p_sink * delta).sum(dim=(0, 2) if lse.dim() == 3 else 1))

    pointers, _, scalars, strides_lse_alibi, flags = _variant_arguments(
        q, causal, sm_scale, _window_bounds(window_size, causal), softcap, alibi_slopes, sinks, dropout_p, seed,
        cu_seqlens, lse)
    group = h_q // h_kv
    # The largest key block (128) gives the fewest programs: split whenever even that leaves SMs idle.
    splits = _gqa_splits(triton.cdiv(n_k, 128) * batch * h_kv, group, q.device) if gqa_splits is None else gqa_splits
    if group % splits:
        raise ValueError(f"gqa_splits ({splits}) must divide the query heads per kv head ({group})")
    # Split groups write fp32 partial sums, one slice per split; otherwise dK and dV go straight out.
    dk_out, dv_out = (dk, dv) if splits == 1 else (
        torch.empty((splits, *t.shape), dtype=lse.dtype, device=t.device) for t in (k, v))
    stride_split = 0 if splits == 1 else dk_out.stride(0)
    dk_view, dv_view = (dk_out, dv_out) if splits == 1 else (dk_out[0], dv_out[0])
    fused_dq = not deterministic
    flags["FUSED_DQ"] = fused_dq
    dq_acc = torch.zeros(q.shape, dtype=lse.dtype, device=q.device) if fused_dq else dq
    switches = _switches(flags, group > 1, mods)
    grad_args = tuple(grad_args)
    lists_t, bm_strides_t, score_args, mask_args, mod_constexprs = mods.kernel_arguments(lse, transposed=True,
                                                                                          backward=True)
    constexprs = dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, **_value_dims(v), **flags, **mod_constexprs)
    dkdv_constexprs = dict(constexprs, MOD_GRADS=bool(grad_args)) if grad_args else constexprs
    dkdv_args = (q, k, v, do, lse, delta, dk_view, dv_view, dq_acc, *pointers, lists_t, *scalars,
                 *strides(q), *strides(k), *strides(v), *strides(do), *strides(dk_view), *strides(dv_view),
                 *strides(dq_acc), *strides_lse_alibi, stride_split, *bm_strides_t, h_kv, group, group // splits,
                 n_q, n_k, score_args, mask_args, grad_args)

    def dkdv_scratch():
        """Fresh dK, dV (all split slices), dQ and mod-gradient buffers: a timing run must not add into the caller's."""
        dk_s, dv_s = (torch.empty_like(t) for t in (dk_out, dv_out))
        return (*dkdv_args[:6], dk_s if splits == 1 else dk_s[0], dv_s if splits == 1 else dv_s[0],
                torch.zeros_like(dq_acc), *dkdv_args[9:-1], tuple(torch.zeros_like(g) for g in grad_args))

    tiles_limit = mods.block_mask.block_size if mods.block_mask is not None else (n_q, n_k)
    limits = dict(n_q=min(n_q, tiles_limit[0]), n_k=min(n_k, tiles_limit[1]))
    with runtime.on_device(q.device):
        launch(CONFIGS["bwd_dkdv"], _attn_bwd_dkdv,
               lambda c: (triton.cdiv(n_k, c.kwargs["BLOCK_N"]) * splits * batch * h_kv,), dkdv_args, dkdv_constexprs,
               dtype=q.dtype, switches=switches, deterministic=deterministic, scratch=dkdv_scratch,
               fits=lambda c: _fits_block_mask(c, mods.block_mask, "dK/dV"), **limits)
        if splits > 1:
            dk.copy_(dk_out.sum(0))  # a fixed order: bitwise reproducible
            dv.copy_(dv_out.sum(0))
        if fused_dq:
            return dq.copy_(dq_acc), dk, dv
        del constexprs["FUSED_DQ"]
        lists, bm_strides, _, _, _ = mods.kernel_arguments(lse)
        dq_args = (q, k, v, do, lse, delta, dq, *pointers, lists, *scalars, *strides(q), *strides(k), *strides(v),
                   *strides(do), *strides(dq), *strides_lse_alibi, *bm_strides, h_q, h_q // h_kv, n_q, n_k,
                   score_args, mask_args)
        launch(CONFIGS["bwd_dq"], _attn_bwd_dq, lambda c: (triton.cdiv(n_q, c.kwargs["BLOCK_M"]) * batch * h_q,),
               dq_args, constexprs, dtype=q.dtype, switches=switches, deterministic=deterministic,
               scratch=lambda: (*dq_args[:6], torch.empty_like(dq), *dq_args[7:]),
               fits=lambda c: _fits_block_mask(c, mods.block_mask, "dQ"), **limits)
    return dq, dk, dv


# ----------------------------------------------------------------------------
# The torch.library ops and their autograd
#
# Registering the kernels as custom ops, each with a fake (shape-only)
# implementation, lets torch.compile trace a model that calls them without a
# graph break; register_autograd makes the forward op differentiable through
# the backward op (torch builds the autograd.Function from these two pieces).
# Window bounds travel as ints with -1 for an open side, softcap as 0.0 when off.
# ----------------------------------------------------------------------------
def _op_options(window_left, window_right, softcap, alibi_slopes, sinks, dropout_p, seed, cu_seqlens_q,
                cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    varlen = cu_seqlens_q is not None
    return dict(window_size=(window_left, window_right), softcap=softcap or None, alibi_slopes=alibi_slopes,
                sinks=sinks, dropout_p=dropout_p, seed=seed,
                cu_seqlens=(cu_seqlens_q, cu_seqlens_k) if varlen else None,
                max_seqlens=(max_seqlen_q, max_seqlen_k) if varlen else None)


@torch.library.custom_op("attention_playground::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, sm_scale: float,
                       window_left: int = -1, window_right: int = -1, softcap: float = 0.0,
                       alibi_slopes: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
                       dropout_p: float = 0.0, seed: torch.Tensor | None = None,
                       cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
                       max_seqlen_q: int = 0, max_seqlen_k: int = 0,
                       deterministic: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    return _flash_fwd(q, k, v, causal, sm_scale, deterministic=deterministic, **_op_options(
        window_left, window_right, softcap, alibi_slopes, sinks, dropout_p, seed, cu_seqlens_q, cu_seqlens_k,
        max_seqlen_q, max_seqlen_k))


@_flash_attn_fwd_op.register_fake
def _(q, k, v, causal, sm_scale, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None, sinks=None,
      dropout_p=0.0, seed=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0,
      deterministic=True):
    lse_shape = q.shape[:3] if cu_seqlens_q is None else (q.shape[1], q.shape[0])
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(lse_shape, dtype=accumulator_dtype(q.dtype))


@torch.library.custom_op("attention_playground::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       o: torch.Tensor, lse: torch.Tensor, dlse: torch.Tensor | None, causal: bool, sm_scale: float,
                       window_left: int = -1, window_right: int = -1, softcap: float = 0.0,
                       alibi_slopes: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
                       dropout_p: float = 0.0, seed: torch.Tensor | None = None,
                       cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
                       max_seqlen_q: int = 0, max_seqlen_k: int = 0, deterministic: bool = True,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dsinks = torch.empty(sinks.shape if sinks is not None else (0,), dtype=lse.dtype, device=q.device)
    dq, dk, dv = _flash_bwd(do, q, k, v, o, lse, causal, sm_scale, dlse=dlse, dsinks=dsinks,
                            deterministic=deterministic, **_op_options(
                                window_left, window_right, softcap, alibi_slopes, sinks, dropout_p, seed,
                                cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))
    return dq, dk, dv, dsinks


@_flash_attn_bwd_op.register_fake
def _(do, q, k, v, o, lse, dlse, causal, sm_scale, window_left=-1, window_right=-1, softcap=0.0,
      alibi_slopes=None, sinks=None, dropout_p=0.0, seed=None, cu_seqlens_q=None, cu_seqlens_k=None,
      max_seqlen_q=0, max_seqlen_k=0, deterministic=True):
    dsinks = lse.new_empty(sinks.shape if sinks is not None else (0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsinks


_OPTION_NAMES = ("window_left", "window_right", "softcap", "alibi_slopes", "sinks", "dropout_p", "seed",
                 "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "deterministic")


def _setup_context(ctx, inputs, output):
    q, k, v, causal, sm_scale, *options = inputs
    o, lse = output
    ctx.options = dict(zip(_OPTION_NAMES, options))
    tensors = {name: ctx.options.pop(name) for name in ("alibi_slopes", "sinks", "seed", "cu_seqlens_q",
                                                         "cu_seqlens_k")}
    ctx.tensor_names = list(tensors)
    ctx.save_for_backward(q, k, v, o, lse, *tensors.values())
    ctx.causal = causal
    ctx.sm_scale = sm_scale
    # An lse nobody uses gets no gradient: keep it None instead of a tensor of zeros.
    ctx.set_materialize_grads(False)


def _backward(ctx, do, dlse):
    q, k, v, o, lse, *tensors = ctx.saved_tensors
    options = dict(ctx.options, **dict(zip(ctx.tensor_names, tensors)))
    if do is None:  # only the lse was used
        do = torch.zeros_like(o)
    dq, dk, dv, dsinks = _flash_attn_bwd_op(do, q, k, v, o, lse, dlse, ctx.causal, ctx.sm_scale, **options)
    dsinks = dsinks.to(options["sinks"].dtype) if options["sinks"] is not None else None
    grads = dict(zip(_OPTION_NAMES, [None] * len(_OPTION_NAMES)), sinks=dsinks)
    return (dq, dk, dv, None, None, *grads.values())


_flash_attn_fwd_op.register_autograd(_backward, setup_context=_setup_context)


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


def flash_attention(q, k, v, causal=False, sm_scale=None, return_lse=False, window_size=None, softcap=None,
                    alibi_slopes=None, sinks=None, dropout_p=0.0, deterministic=True):
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
    Returns o (B, Hq, Nq, D) in q's dtype, and with return_lse=True also the
    natural-log log-sum-exp of each row's scores (the sink included), lse (B, Hq, Nq) in fp32
    (float64 for float64 inputs; -inf for a row with no visible key and no sink, whose output is 0).
    """
    check_flash_inputs(q, k, v, sm_scale)
    check_flash_options(q, q.shape[0], softcap, alibi_slopes, sinks, dropout_p)
    causal, return_lse, deterministic = (check_flag(value, name) for value, name in (
        (causal, "causal"), (return_lse, "return_lse"), (deterministic, "deterministic")))
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    window_left, window_right = _op_window(window_size, causal)
    o, lse = _flash_attn_fwd_op(q, k, v, causal, sm_scale, window_left, window_right, float(softcap or 0.0),
                                alibi_slopes, sinks, float(dropout_p), _dropout_seed(dropout_p, q.device),
                                deterministic=deterministic)
    return (o, lse) if return_lse else o


def check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, sm_scale=None):
    """Raise a clear error, naming the argument, for packed inputs the kernels cannot take."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must have rank 3 (total_tokens, heads, head_dim), got shape {tuple(t.shape)}")
    # The padded-layout checks apply to a (1, H, total, D) view of the same tensors.
    check_flash_inputs(*(t.transpose(0, 1)[None] for t in (q, k, v)), sm_scale)
    for name, cu, total, max_name, max_len in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], "max_seqlen_q",
                                                max_seqlen_q),
                                               ("cu_seqlens_k", cu_seqlens_k, k.shape[0], "max_seqlen_k",
                                                max_seqlen_k)):
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
            described = f"{cu.dtype} of shape {tuple(cu.shape)}" if isinstance(cu, torch.Tensor) else type(cu).__name__
            raise TypeError(f"{name} must be a 1-D int32 tensor of B + 1 offsets, got {described}")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}")
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 0:
            raise TypeError(f"{max_name} must be a non-negative int, got {max_len!r}")
        if torch.compiler.is_compiling():
            continue  # reading the offsets would break the graph; they are checked in eager mode
        offsets = cu.tolist()
        if offsets[0] != 0 or any(b < a for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"{name} must start at 0 and never decrease, got {offsets[:8]}...")
        if offsets[-1] != total:
            raise ValueError(f"{name} must end at the number of packed tokens ({total}), got {offsets[-1]}")
        longest = max(b - a for a, b in zip(offsets, offsets[1:]))
        if max_len < longest:
            raise ValueError(f"{max_name} ({max_len}) is shorter than the longest sequence in {name} ({longest})")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False,
                           sm_scale=None, return_lse=False, window_size=None, softcap=None, alibi_slopes=None,
                           sinks=None, dropout_p=0.0, deterministic=True):
    """Attention over packed sequences of different lengths, with no compute spent on padding.

    q: (total_q, Hq, D) and k, v: (total_k, Hkv, D) hold B sequences one after
    another; cu_seqlens_q and cu_seqlens_k are (B + 1,) int32 prefix sums from 0
    (sequence b owns rows cu_seqlens[b]:cu_seqlens[b + 1]); max_seqlen_* bound
    the lengths. A sequence never attends across its boundary, an empty one is
    allowed, and causal is bottom-right within each sequence. Options are
    `flash_attention`'s (alibi_slopes may be (B, Hq)). Returns o (total_q, Hq, D),
    and with return_lse=True also lse (Hq, total_q).
    """
    check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, sm_scale)
    check_flash_options(q, cu_seqlens_q.numel() - 1, softcap, alibi_slopes, sinks, dropout_p)
    causal, return_lse, deterministic = (check_flag(value, name) for value, name in (
        (causal, "causal"), (return_lse, "return_lse"), (deterministic, "deterministic")))
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    window_left, window_right = _op_window(window_size, causal)
    o, lse = _flash_attn_fwd_op(q, k, v, causal, sm_scale, window_left, window_right, float(softcap or 0.0),
                                alibi_slopes, sinks, float(dropout_p), _dropout_seed(dropout_p, q.device),
                                cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), deterministic)
    return (o, lse) if return_lse else o


def dropout_keep_mask(seed, dropout_p, streams, n_rows, n_cols, row_offset=0, stream_offset=0):
    """The kernels' dropout mask, bool (streams, n_rows, n_cols): for tests and for reading, never stored by them.

    For padded inputs stream s is batch * Hq + head and rows are query indices;
    for packed ones stream s is the head and rows are packed token indices
    (row_offset = cu_seqlens_q[b] selects sequence b's rows).
    """
    mask = torch.empty((streams, n_rows, n_cols), dtype=torch.int8, device=seed.device)
    block = 32
    with runtime.on_device(seed.device):
        _dropout_mask_kernel[(streams, triton.cdiv(n_rows, block), triton.cdiv(n_cols, block))](
            seed, mask, float(dropout_p), n_rows, n_cols, row_offset, stream_offset, BLOCK_M=block, BLOCK_N=block)
    return mask.bool()
