"""Flash attention's launchers: check the contract, allocate, choose a config, launch on the inputs' device.

The kernels live one family per file, read in this order:
    kernels/tiles.py       tile loads and the causal key range, shared by every kernel
    kernels/flash_fwd.py   the forward kernel (the online softmax, derived in its docstring)
    kernels/flash_bwd.py   the backward kernels (delta, dK/dV, dQ)
    kernels/configs.py     the launch configurations: which fit which GPU, and how one is chosen
    this file              option checks -> the launchers _flash_fwd and _flash_bwd
    kernels/ops.py         the torch.library ops with their autograd -> `flash_attention`,
                           `flash_attention_varlen` (and kernels/fp8.py for fp8 inputs)

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

from reference.fp8 import FP8_DTYPES
from reference.functional import check_attention_inputs

from . import runtime
from .block_mask import DEFAULT_BLOCK_SIZE, NO_MODS
from .configs import KERNELS as CONFIGS
from .configs import autotune_enabled, launch
from .flash_bwd import _attn_bwd_dkdv, _attn_bwd_dq, _attn_bwd_preprocess
from .flash_fwd import _attn_fwd
from .runtime import SUPPORTED_DTYPES, accumulator_dtype, check_runnable, dot_precision, has_tma, upcast_tiles
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
    dtype, device = q.dtype, q.device
    if k.dtype != dtype or v.dtype != dtype or k.device != device or v.device != device:
        for name, t in (("k", k), ("v", v)):
            if t.dtype != dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but q has {dtype}; q, k and v must share one dtype")
            if t.device != device:
                raise ValueError(f"{name} is on {t.device} but q is on {device}; q, k and v must share one device")
    head_dim = q.shape[-1]
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim (q.shape[-1]) must be between 1 and {MAX_HEAD_DIM}, got {head_dim}")
    if sm_scale is not None and not (isinstance(sm_scale, (int, float)) and math.isfinite(sm_scale)):
        raise TypeError(f"sm_scale must be a finite float or None, got {sm_scale!r}")
    check_runnable(q, "q", SUPPORTED_DTYPES + FP8_DTYPES)  # fp8: kernels/fp8.py's forward
    if dtype == torch.float64 and head_dim > 128 and device.type == "cuda":
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
    if softcap is None and alibi_slopes is None and sinks is None and type(dropout_p) in (float, int) \
            and dropout_p == 0:
        return  # no option: nothing to check (a bool dropout_p goes on to be refused)
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


# Offsets within a tile are 32-bit: stride * MAX_HEAD_DIM must stay within int32, i.e. stride <= this.
_MAX_TILE_STRIDE = INT32_MAX // MAX_HEAD_DIM


def _check_tile_offsets(dims, **tensors):
    """Offsets inside a tile are 32-bit (block starts are 64-bit): refuse strides that would overflow them.

    dims: the two dimensions whose strides a tile spans (the token's and the head dim's).
    """
    first, second = dims
    for name, t in tensors.items():
        if t.stride(first) > _MAX_TILE_STRIDE or t.stride(second) > _MAX_TILE_STRIDE:
            dim = first if t.stride(first) > _MAX_TILE_STRIDE else second
            raise ValueError(f"{name}.stride({dim}) = {t.stride(dim)} is too large: offsets within one tile "
                             f"would pass 2**31 elements; make {name} contiguous")


TMA_ALIGNMENT = 16  # bytes: a TMA descriptor's start address and its row strides are multiples of this


def _descriptor_loads_allowed(*tensors):
    """Whether the forward may read these tensors through TMA descriptors (kernels/tiles.py, _row_descriptor).

    TMA wants a unit last stride, and the start and every other stride 16-byte
    aligned. Anything else (a strided view, a head dim of 4 fp16 values) takes
    the pointer path: the chooser offers descriptor configs only when this holds.
    """
    for t in tensors:
        strides = t.stride()
        if strides[-1] != 1 or t.data_ptr() % TMA_ALIGNMENT:
            return False
        size = t.element_size()
        for stride in strides[:-1]:
            if stride * size % TMA_ALIGNMENT:
                return False
    return True


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
    """The pointers, scalars, strides and switches every attention kernel takes after its own tensors.

    Returns (pointers, sinks pointer, scalars, lse and alibi strides, variant): variant is the
    tuple of dtypes and on/off switches that _launch_plan turns into compile-time arguments.
    """
    placeholder = lse  # any tensor: a switched-off option's pointer is never read
    window_left, window_right = window
    # The kernels index cu_seqlens, the slopes and the sinks as contiguous vectors.
    if cu_seqlens is None:
        cu_q = cu_k = placeholder
    else:
        cu_q, cu_k = cu_seqlens[0].contiguous(), cu_seqlens[1].contiguous()
    if alibi_slopes is None:
        alibi, alibi_strides = placeholder, (0, 0)
    else:
        alibi = alibi_slopes.float().contiguous()
        # ALiBi slopes (Hq,) are shared by the batch: batch stride 0.
        alibi_strides = (0, alibi.stride(0)) if alibi.dim() == 1 else (alibi.stride(0), alibi.stride(1))
    # lse is (B, Hq, Nq) for padded batches and (Hq, total_q) for packed ones.
    lse_strides = (lse.stride(0), lse.stride(1)) if lse.dim() == 3 else (0, lse.stride(0))
    pointers = (cu_q, cu_k, alibi, seed if dropout_p > 0 else placeholder)
    scalars = (sm_scale, float(softcap or 0.0), float(dropout_p), window_left, window_right)
    variant = (q.dtype, lse.dtype, bool(causal), window_left < UNLIMITED or (window_right < UNLIMITED and not causal),
               bool(softcap), alibi_slopes is not None, sinks is not None, dropout_p > 0, cu_seqlens is not None)
    sinks = sinks.to(lse.dtype).contiguous() if sinks is not None else placeholder  # float64 for gradcheck
    return pointers, sinks, scalars, (*lse_strides, *alibi_strides), variant


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


# The mods' kernel arguments and compile-time switches when a call has none (kernels/block_mask.py).
_NO_MOD_ARGUMENTS = ((0, 0, 0, 0), (), ())  # block-mask strides, score_args, mask_args
_NO_MOD_CONSTEXPRS = {"fwd": NO_MODS.kernel_arguments(None)[4],
                      "bwd": NO_MODS.kernel_arguments(None, transposed=True, backward=True)[4]}


_launch_plans = {}


def _launch_plan(kernel, variant, head_dim, head_dim_v, gqa):
    """(constexprs, switches, head_dim_pad) of `kernel` ("fwd", "bwd_dkdv", "bwd_dq" or "bwd_dkdv_fused").

    For one variant of a call without mods, worked out once per (kernel, variant, head dims,
    GQA or not) and kept: the same call shape pays a dict lookup, not the flags and the dtype
    rules again. head_dim_pad: the wider of the query/key and value tiles, which decides what
    fits (configs.launch's rule). The dicts are shared: never change one.
    """
    key = (kernel, variant, head_dim, head_dim_v, gqa)
    plan = _launch_plans.get(key)
    if plan is None:
        dtype, acc_dtype, causal, has_window, has_softcap, has_alibi, has_sinks, has_dropout, varlen = variant
        flags = dict(IS_CAUSAL=causal, HAS_WINDOW=has_window, HAS_SOFTCAP=has_softcap, HAS_ALIBI=has_alibi,
                     HAS_DROPOUT=has_dropout, IS_VARLEN=varlen)
        if kernel == "fwd":
            flags["HAS_SINKS"] = has_sinks  # the backward kernels leave the sinks to a reduction outside them
        else:
            flags["FUSED_DQ"] = kernel == "bwd_dkdv_fused"
        switches = _switches(flags, gqa)
        if kernel == "bwd_dq":
            del flags["FUSED_DQ"]  # the dQ kernel runs only unfused; it shares dK/dV's switches
        constexprs = dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=_head_dim_pad(head_dim), HEAD_DIM_V=head_dim_v,
                          HEAD_DIM_V_PAD=_head_dim_pad(head_dim_v), **flags, UPCAST=upcast_tiles(dtype),
                          DOT_PRECISION=dot_precision(dtype), ACC_DTYPE=_tl_dtype(acc_dtype),
                          **_NO_MOD_CONSTEXPRS["fwd" if kernel == "fwd" else "bwd"])
        if dtype in FP8_DTYPES:
            # q.k and P.V on fp8 tensor cores, whose K is 32 wide; the interpreter's fp8 and bf16 casts
            # round wrongly, so the kernel rounds P and the output by hand there.
            constexprs.update(HAS_DESCALE=True, ROUND_BY_HAND=runtime.INTERPRET,
                              HEAD_DIM_PAD=max(32, constexprs["HEAD_DIM_PAD"]))
        plan = _launch_plans[key] = (constexprs, switches,
                                     max(constexprs["HEAD_DIM_PAD"], constexprs["HEAD_DIM_V_PAD"]))
    return plan


_launch_kwargs = {}


def _launch(kernel_configs, kernel, grid, args, plan, *, n_q, n_k, tma=False, warp_specialize=False,
            deterministic=True, scratch=None, check=None):
    """configs.launch for a launch plan (_launch_plan), its keyword arguments merged once per (plan, config).

    The choice is configs.launch's own (KernelConfigs.choose, its memo, forced configs, checks);
    only the dict of compile-time and config keywords a launch passes on is kept instead of
    rebuilt on every call. A timed choice (opt-in autotuning, deterministic=False) goes
    through configs.launch itself. Returns the config.
    """
    constexprs, switches, head_dim_pad = plan
    if not deterministic and autotune_enabled():
        return launch(kernel_configs, kernel, grid, args, constexprs, dtype=args[0].dtype, n_q=n_q, n_k=n_k,
                      switches=switches, tma=tma, warp_specialize=warp_specialize, deterministic=deterministic,
                      scratch=scratch, check=check)
    config = kernel_configs.choose(args[0].device, args[0].dtype, head_dim_pad, n_q, n_k, switches,
                                   tma=tma, warp_specialize=warp_specialize, deterministic=deterministic)
    if check is not None and kernel_configs.forced is not None:
        check(config)
    kernel_configs.last_config = config
    # By identity (a Config hashes by rebuilding its keywords): a plan's constexprs live as long as the
    # process, and the entry holds the config, so neither id can be reused while the entry stands.
    entry = _launch_kwargs.get((id(constexprs), id(config)))
    if entry is None or entry[0] is not config:
        entry = _launch_kwargs[id(constexprs), id(config)] = (config, {**constexprs, **config.all_kwargs()})
    kernel[grid(config)](*args, **entry[1])
    return config


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
        return batch, h_q, k.shape[1], n_q, k.shape[2], _padded_strides
    # Packed (total, H, D): the batch offset comes from cu_seqlens, so its stride is 0.
    return (cu_seqlens[0].shape[0] - 1, q.shape[1], k.shape[1], *max_seqlens, _packed_strides)


def _empty_contiguous(t):
    """A contiguous tensor of t's shape, dtype and device (empty_like is the cheapest call when t is contiguous)."""
    return torch.empty_like(t) if t.is_contiguous() else torch.empty_like(t, memory_format=torch.contiguous_format)


def _padded_strides(t):
    return t.stride()


def _packed_strides(t):
    strides = t.stride()
    return 0, strides[1], strides[0], strides[2]


def _descriptor_views_allowed(q, k, v, sq, sk, sv):
    """_descriptor_loads_allowed(q, k, v) from the strides of their 4-D views (a packed view's 0 is aligned).

    Element sizes are powers of two, so stride * size is a multiple of 16 for every stride exactly
    when the bitwise or of the strides, times the size, is: one test instead of nine.
    """
    return (sq[3] == 1 and sk[3] == 1 and sv[3] == 1
            and not (q.data_ptr() | k.data_ptr() | v.data_ptr()) % TMA_ALIGNMENT
            and not (sq[0] | sq[1] | sq[2] | sk[0] | sk[1] | sk[2] | sv[0] | sv[1] | sv[2]) * q.element_size()
            % TMA_ALIGNMENT)


def _flash_fwd(q, k, v, causal, sm_scale, o=None, lse=None, *, window_size=None, softcap=None, alibi_slopes=None,
               sinks=None, dropout_p=0.0, seed=None, cu_seqlens=None, max_seqlens=None, deterministic=True,
               mods=NO_MODS, descale=None, out_dtype=None, _prepared=None):
    """Run the forward kernel. Returns o in q's layout and dtype, and lse in fp32 (float64 for float64).

    Padded: q (B, Hq, Nq, D) -> lse (B, Hq, Nq). Packed: q (total_q, Hq, D) with
    cu_seqlens = (cu_seqlens_q, cu_seqlens_k) and max_seqlens = (max_q, max_k) -> lse (Hq, total_q).
    o and lse may be passed in (tests pass NaN-filled buffers to catch unwritten elements).
    seed is a one-element int64 tensor, needed when dropout_p > 0. deterministic=False lets opt-in
    autotuning (kernels/configs.py) time the candidates for a new shape. mods: the call's
    score_mod, mask_mod and block_mask (kernels/block_mask.py).
    fp8 (kernels/fp8.py): descale = (DESCALE, its (kind, batch, kv head) strides), the q, k, v
    dequantization factors; o is then in out_dtype (bf16 or fp16).
    Reads shapes and strides only, never data: no host-device sync.
    _prepared: a list that receives the kernel arguments worked out from the options
    (_variant_arguments' result), which _flash_bwd(_prepared=...) then reuses.
    """
    batch, h_q, h_kv, n_q, n_k, strides = _layout(q, k, cu_seqlens, max_seqlens)
    head_dim, head_dim_v = q.shape[-1], v.shape[-1]
    if o is None:
        if descale is not None:
            o = q.new_empty((*q.shape[:-1], head_dim_v), dtype=out_dtype)
        else:
            o = _empty_contiguous(q) if head_dim_v == head_dim else q.new_empty((*q.shape[:-1], head_dim_v))
    if lse is None:
        lse = q.new_empty((batch, h_q, n_q) if cu_seqlens is None else (h_q, q.shape[0]),
                          dtype=accumulator_dtype(q.dtype))
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
    sq, sk, sv, so = strides(q), strides(k), strides(v), strides(o)
    if max(sq[2], sq[3], sk[2], sk[3], sv[2], sv[3], so[2], so[3]) > _MAX_TILE_STRIDE:
        _check_tile_offsets((-2, -1) if cu_seqlens is None else (0, -1), q=q, k=k, v=v, o=o)
    prepared = _variant_arguments(q, causal, sm_scale, _window_bounds(window_size, causal), softcap, alibi_slopes,
                                  sinks, dropout_p, seed, cu_seqlens, lse)
    if _prepared is not None:
        _prepared.append(prepared)
    pointers, sinks_arg, scalars, strides_lse_alibi, variant = prepared
    plan = _launch_plan("fwd", variant, head_dim, head_dim_v, h_q != h_kv)
    constexprs = plan[0]
    # fp8 (the plan's HAS_DESCALE): the descales' pointer and strides; else a placeholder, never read.
    descale_tensor, descale_strides = (lse, (0, 0, 0)) if descale is None else descale

    # Descriptor (TMA) loads of q, k, v are a config option when their layout allows them.
    device = q.device
    descriptors = _descriptor_views_allowed(q, k, v, sq, sk, sv)
    if descriptors and has_tma(device):
        _ensure_descriptor_allocator()
    # Warp specialization is for the plain key loop: not for causal or windowed calls (their masked
    # diagonal blocks), nor packed sequences (with their early exit Triton 3.6 cannot compile the
    # kernel), nor mods (their block lists are more loops).
    has_mods = mods is not NO_MODS and bool(mods)  # Mods.__bool__ walks its fields: ask once, and not for none
    warp_specialize = not (constexprs["IS_CAUSAL"] or constexprs["HAS_WINDOW"] or constexprs["IS_VARLEN"]
                           or has_mods)
    if has_mods:
        block_mask, bm_strides, score_args, mask_args, mod_constexprs = mods.kernel_arguments(lse)
    else:
        block_mask, (bm_strides, score_args, mask_args) = lse, _NO_MOD_ARGUMENTS
    args = (q, k, v, o, lse, pointers[0], pointers[1], sinks_arg, pointers[2], pointers[3], block_mask,
            descale_tensor, *scalars, *sq, *sk, *sv, *so, *strides_lse_alibi, *bm_strides, *descale_strides,
            h_q, h_q // h_kv, n_q, n_k, score_args, mask_args)
    programs = batch * h_q  # times the query blocks of the config: a 1-D grid
    with runtime.on_device(device):
        if not has_mods:
            _launch(CONFIGS["fwd"], _attn_fwd, lambda c: (-(-n_q // c.kwargs["BLOCK_M"]) * programs,), args, plan,
                    n_q=n_q, n_k=n_k, tma=descriptors, warp_specialize=warp_specialize,
                    deterministic=deterministic, check=lambda c: _check_hopper_options(c, constexprs, descriptors),
                    scratch=lambda: (*args[:3], torch.empty_like(o), torch.empty_like(lse), *args[5:]))
        else:  # a block mask's blocks bound the tiles
            limit_q, limit_k = mods.block_mask.block_size if mods.block_mask is not None else (n_q, n_k)
            launch(CONFIGS["fwd"], _attn_fwd, lambda c: (-(-n_q // c.kwargs["BLOCK_M"]) * programs,), args,
                   dict(constexprs, **mod_constexprs), dtype=q.dtype, n_q=min(n_q, limit_q), n_k=min(n_k, limit_k),
                   switches=(*plan[1][:-1], ("HAS_MODS", True)), tma=descriptors, warp_specialize=warp_specialize,
                   deterministic=deterministic, check=lambda c: _check_hopper_options(c, constexprs, descriptors),
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
    if device.type != "cuda":
        return 1  # the interpreter's one "SM" is always full
    wanted = -(-_sm_count(device) // max(programs, 1))
    return next((d for d in range(1, group + 1) if group % d == 0 and d >= wanted), group)


def _flash_bwd(do, q, k, v, o, lse, causal, sm_scale, dlse=None, dq=None, dk=None, dv=None, *, window_size=None,
               softcap=None, alibi_slopes=None, sinks=None, dsinks=None, dropout_p=0.0, seed=None,
               cu_seqlens=None, max_seqlens=None, deterministic=True, gqa_splits=None, mods=NO_MODS, grad_args=(),
               _prepared=None):
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
    _prepared: what _flash_fwd(_prepared=[]) worked out for the same call (the options'
    kernel arguments), not worked out again.
    """
    batch, h_q, h_kv, n_q, n_k, strides = _layout(q, k, cu_seqlens, max_seqlens)
    head_dim = q.shape[-1]
    dq = _empty_contiguous(q) if dq is None else dq
    dk = _empty_contiguous(k) if dk is None else dk
    dv = _empty_contiguous(v) if dv is None else dv
    if dsinks is not None:
        dsinks.zero_()
    if q.numel() == 0 or k.numel() == 0:
        if k.numel() == 0 and sinks is not None and dsinks is not None and dlse is not None:
            # No key: each row's lse is its sink, so d sink is the sum of the gradient into lse.
            dsinks.copy_(dlse.sum(dim=(0, 2) if dlse.dim() == 3 else 1))
        return dq.zero_(), dk.zero_(), dv.zero_()
    sq, sk, sv, so, sdo, sdq = strides(q), strides(k), strides(v), strides(o), strides(do), strides(dq)
    sdk, sdv = strides(dk), strides(dv)
    if max(sq[2], sq[3], sk[2], sk[3], sv[2], sv[3], so[2], so[3], sdo[2], sdo[3], sdq[2], sdq[3], sdk[2], sdk[3],
           sdv[2], sdv[3]) > _MAX_TILE_STRIDE:
        _check_tile_offsets((-2, -1) if cu_seqlens is None else (0, -1), q=q, k=k, v=v, o=o, do=do, dq=dq, dk=dk,
                            dv=dv)
    if _prepared is None:
        _prepared = _variant_arguments(q, causal, sm_scale, _window_bounds(window_size, causal), softcap, alibi_slopes,
                                       sinks, dropout_p, seed, cu_seqlens, lse)
    pointers, _, scalars, strides_lse_alibi, variant = _prepared
    group = h_q // h_kv
    fused_dq = not deterministic
    plan = _launch_plan("bwd_dkdv_fused" if fused_dq else "bwd_dkdv", variant, head_dim, v.shape[-1], group > 1)
    constexprs = plan[0]

    delta = torch.empty_like(lse)
    # delta is per row: packed sequences go through as one batch of total_q rows.
    rows, pre_batch = (n_q, batch) if cu_seqlens is None else (q.shape[0], 1)
    with runtime.on_device(q.device):
        _attn_bwd_preprocess[(-(-rows // PREPROCESS_BLOCK_M) * pre_batch * h_q,)](
            o, do, delta, *so, *sdo, *strides_lse_alibi[:2], h_q, rows,
            HEAD_DIM=constexprs["HEAD_DIM_V"], HEAD_DIM_PAD=constexprs["HEAD_DIM_V_PAD"], BLOCK_M=PREPROCESS_BLOCK_M,
        )
        if dlse is not None:
            delta -= dlse
        if sinks is not None and dsinks is not None:
            # d sink = -sum_i P_sink,i * delta_i, with P_sink,i = exp(sink - lse_i): one reduction, no kernel.
            sink = sinks.to(lse.dtype)[None, :, None] if lse.dim() == 3 else sinks.to(lse.dtype)[:, None]
            p_sink = torch.exp(sink - lse)
            dsinks.copy_(-(p_sink * delta).sum(dim=(0, 2) if lse.dim() == 3 else 1))

        # The largest key block (128) gives the fewest programs: split whenever even that leaves SMs idle.
        splits = _gqa_splits(-(-n_k // 128) * batch * h_kv, group, q.device) if gqa_splits is None else gqa_splits
        if group % splits:
            raise ValueError(f"gqa_splits ({splits}) must divide the query heads per kv head ({group})")
        # Split groups write fp32 partial sums, one slice per split; otherwise dK and dV go straight out.
        if splits == 1:
            dk_out, dv_out, dk_view, dv_view, stride_split, sdk_view, sdv_view = dk, dv, dk, dv, 0, sdk, sdv
        else:
            dk_out, dv_out = (torch.empty((splits, *t.shape), dtype=lse.dtype, device=t.device) for t in (k, v))
            dk_view, dv_view, stride_split = dk_out[0], dv_out[0], dk_out.stride(0)
            sdk_view, sdv_view = strides(dk_view), strides(dv_view)
        dq_acc = torch.zeros(q.shape, dtype=lse.dtype, device=q.device) if fused_dq else dq
        grad_args = tuple(grad_args)
        has_mods = mods is not NO_MODS and bool(mods)
        if has_mods:
            lists_t, bm_strides_t, score_args, mask_args, mod_constexprs = mods.kernel_arguments(
                lse, transposed=True, backward=True)
        else:
            lists_t, (bm_strides_t, score_args, mask_args) = lse, _NO_MOD_ARGUMENTS
        dkdv_args = (q, k, v, do, lse, delta, dk_view, dv_view, dq_acc, *pointers, lists_t, *scalars,
                     *sq, *sk, *sv, *sdo, *sdk_view, *sdv_view, *(strides(dq_acc) if fused_dq else sdq),
                     *strides_lse_alibi, stride_split, *bm_strides_t, h_kv, group, group // splits, n_q, n_k,
                     score_args, mask_args, grad_args)

        def dkdv_scratch():
            """Fresh dK, dV (all split slices), dQ and mod-gradient buffers: a timing run must not add into the
            caller's."""
            dk_s, dv_s = (torch.empty_like(t) for t in (dk_out, dv_out))
            return (*dkdv_args[:6], dk_s if splits == 1 else dk_s[0], dv_s if splits == 1 else dv_s[0],
                    torch.zeros_like(dq_acc), *dkdv_args[9:-1], tuple(torch.zeros_like(g) for g in grad_args))

        dkdv_grid = lambda c: (-(-n_k // c.kwargs["BLOCK_N"]) * splits * batch * h_kv,)  # noqa: E731
        if not has_mods:
            _launch(CONFIGS["bwd_dkdv"], _attn_bwd_dkdv, dkdv_grid, dkdv_args, plan, n_q=n_q, n_k=n_k,
                    deterministic=deterministic, scratch=dkdv_scratch)
        else:  # a block mask's blocks bound the tiles
            limit_q, limit_k = mods.block_mask.block_size if mods.block_mask is not None else (n_q, n_k)
            limits = dict(n_q=min(n_q, limit_q), n_k=min(n_k, limit_k))
            mod_switches = (*plan[1][:-1], ("HAS_MODS", True))
            dkdv_constexprs = dict(constexprs, **mod_constexprs)
            if grad_args:
                dkdv_constexprs["MOD_GRADS"] = True
            launch(CONFIGS["bwd_dkdv"], _attn_bwd_dkdv, dkdv_grid, dkdv_args, dkdv_constexprs, dtype=q.dtype,
                   switches=mod_switches, deterministic=deterministic, scratch=dkdv_scratch,
                   fits=lambda c: _fits_block_mask(c, mods.block_mask, "dK/dV"), **limits)
        if splits > 1:
            dk.copy_(dk_out.sum(0))  # a fixed order: bitwise reproducible
            dv.copy_(dv_out.sum(0))
        if fused_dq:
            return dq.copy_(dq_acc), dk, dv
        dq_plan = _launch_plan("bwd_dq", variant, head_dim, v.shape[-1], group > 1)
        lists, bm_strides = (mods.kernel_arguments(lse)[:2]) if has_mods else (lse, _NO_MOD_ARGUMENTS[0])
        dq_args = (q, k, v, do, lse, delta, dq, *pointers, lists, *scalars, *sq, *sk, *sv, *sdo, *sdq,
                   *strides_lse_alibi, *bm_strides, h_q, group, n_q, n_k, score_args, mask_args)
        dq_grid = lambda c: (-(-n_q // c.kwargs["BLOCK_M"]) * batch * h_q,)  # noqa: E731
        if not has_mods:
            _launch(CONFIGS["bwd_dq"], _attn_bwd_dq, dq_grid, dq_args, dq_plan, n_q=n_q, n_k=n_k,
                    deterministic=deterministic, scratch=lambda: (*dq_args[:6], torch.empty_like(dq), *dq_args[7:]))
        else:
            launch(CONFIGS["bwd_dq"], _attn_bwd_dq, dq_grid, dq_args, dict(dq_plan[0], **mod_constexprs),
                   dtype=q.dtype, switches=mod_switches, deterministic=deterministic,
                   scratch=lambda: (*dq_args[:6], torch.empty_like(dq), *dq_args[7:]),
                   fits=lambda c: _fits_block_mask(c, mods.block_mask, "dQ"), **limits)
    return dq, dk, dv


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
