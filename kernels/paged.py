"""Paged attention for every serving step: prefill, chunked prefill, verification and decode, in one kernel.

What it computes
----------------
A serving step brings each sequence b some new tokens: a whole prompt, a
chunk of one, a few speculative tokens, or one. Their keys and values are
already in the cache (`append_kv`), and their queries attend to the keys
[cache_leftpad[b], seqused_k[b]) of their sequence:

    O[b] = softmax(Q[b] K[b]^T * sm_scale) V[b]

with causal attention aligned bottom-right (the last new token is the last
key), and the variants of the flash kernels: sliding window, softcap, ALiBi,
sinks. `reference/paged.py` is the same computation in plain PyTorch, one
sequence at a time, with the same names.

    q        packed (total_q, Hq, D) with cu_seqlens_q, or dense (B, Hq, Nq, D)
    cache    contiguous (B, Hkv, N_max, D), or pages (num_pages, Hkv, page_size, D) and a
             block_table (B, max_pages): key n of b is row n % page_size of page block_table[b, n // page_size]

Bad input never reads out of bounds
-----------------------------------
The launcher reads shapes, never data: no host-device sync, so a decode loop
can be captured in a CUDA graph. Lengths past the cache, a leftpad past the
end, or a block-table entry outside the pool are found by the kernel: the
reads are clamped to the cache, and that sequence's rows come out NaN, so a
bad batch is never silently wrong. `validate=True` checks the data on the
host first and raises an error that names the argument.

The kernels are in kernels/paged_fwd.py, with how a program finds its rows and keys.
"""
import math

import torch

from reference.paged import check_paged_inputs, validate_paged_data

from . import runtime
from .block_mask import as_mask_mod, check_mod_args
from .configs import KERNELS as CONFIGS
from .configs import chip_for, on_reset
from .flash_attention import _window_bounds, check_flash_options
from .paged_fwd import MAX_SPLIT_QUERIES, MIN_KEYS_PER_SPLIT, _paged_attn_fwd, _paged_merge
from .runtime import check_flag, check_runnable, dot_precision, upcast_tiles
from .tiles import UNLIMITED, _head_dim_pad

__all__ = ["paged_attention", "decode_attention", "choose_num_splits"]

PAGED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM_QK, MAX_HEAD_DIM_V = 576, 512  # MLA's absorbed decode: 512 latent + 64 rotary dims, 512 values
MAX_SPLITS = 64
FP8_TYPE_CAPABILITY = (8, 9)  # Triton's float8_e4m3fn type: GPUs with fp8 tensor cores
MERGE_TILE_ELEMENTS = 4096  # a merge program's accumulator: 32 rows at head dim 128, 8 at MLA's 512 (no spills)
MERGE_WARPS = 4
# The interpreter has no SMs: it assumes an H100 SXM's 132, so the CPU picks the splits an H100 would.
INTERPRETER_SM_COUNT = 132


# ----------------------------------------------------------------------------
# Launch choices: from shapes only
# ----------------------------------------------------------------------------
_sm_counts = {}


def sm_count(device: torch.device) -> int:
    """The GPU's streaming multiprocessors; under the interpreter, INTERPRETER_SM_COUNT."""
    if device.type != "cuda":
        return INTERPRETER_SM_COUNT
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]


def choose_num_splits(programs: int, max_keys: int, num_sms: int) -> int:
    """How many splits fill the GPU: FlashAttention's wave-efficiency rule.

    `programs` (tiles x kv heads) run in waves of num_sms. For each candidate
    s, efficiency = waves / ceil(waves) with waves = programs * s / num_sms (a
    last, partly empty wave wastes SMs); the answer is the smallest s within
    85% of the best. No more splits than leave MIN_KEYS_PER_SPLIT keys each of
    max_keys (the cache's capacity: the launcher reads no lengths), never more
    than MAX_SPLITS. Each sequence then uses as many as its own length warrants.
    """
    limit = max(1, min(MAX_SPLITS, -(-max_keys // MIN_KEYS_PER_SPLIT)))
    if programs < 1:
        return 1
    efficiency = []
    for s in range(1, limit + 1):
        waves = programs * s / num_sms
        efficiency.append(waves / math.ceil(waves))
    best = max(efficiency)
    return next(s for s, e in enumerate(efficiency, 1) if e >= 0.85 * best)


def _tile_shape(block_m, group):
    """(HEADS, BLOCK_Q, HEAD_BLOCKS): query heads and new tokens per tile, and tiles across a kv group."""
    heads = min(group, block_m)
    return heads, block_m // heads, -(-group // heads)


def head_dim_tiles(head_dim):
    """(HEAD_DIM_PAD, HEAD_DIM_TAIL): the query/key head dim as one power-of-two tile, or past 256 as two
    (MLA's 576 = 512 + 64; 192 stays one 256-wide tile), so a big head dim is not padded to 1024."""
    if head_dim <= 256:
        return _head_dim_pad(head_dim), 0
    main = 1 << (head_dim.bit_length() - 1)
    return main, 0 if head_dim == main else _head_dim_pad(head_dim - main)


def plan_tiles(q, k_cache, v_cache, block_table, cu_seqlens_q, max_seqlen_q, switches):
    """The launch of one call, from shapes: (config, heads, block_q, head_blocks, tiles, capacity)."""
    h_q = q.shape[-2] if cu_seqlens_q is not None else q.shape[1]
    group = h_q // k_cache.shape[1]
    batch = (cu_seqlens_q.shape[0] - 1) if cu_seqlens_q is not None else q.shape[0]
    # What fits is decided by the widest tiles: the query/key ones, or the value's.
    width = max(sum(head_dim_tiles(q.shape[-1])), _head_dim_pad(v_cache.shape[-1]))
    config = CONFIGS["paged"].choose(q.device, q.dtype, width, group * max_seqlen_q, None, switches)
    heads, block_q, head_blocks = _tile_shape(config.kwargs["BLOCK_M"], group)
    if cu_seqlens_q is not None:
        tiles = q.shape[0] // block_q + batch
    else:
        tiles = batch * -(-q.shape[2] // block_q)
    capacity = block_table.shape[1] * k_cache.shape[2] if block_table is not None else k_cache.shape[2]
    return config, heads, block_q, head_blocks, tiles, capacity


def shares_storage(k_cache, v_cache):
    """Whether v_cache is the first columns of k_cache (MLA's latent cache, two views of one tensor)."""
    return (k_cache.data_ptr() == v_cache.data_ptr() and k_cache.stride() == v_cache.stride()
            and v_cache.shape[-1] == head_dim_tiles(k_cache.shape[-1])[0])


# ----------------------------------------------------------------------------
# Launcher: allocate, choose, launch on the inputs' device
# ----------------------------------------------------------------------------
class _Launch:
    """Everything a paged call's launch takes that its shapes decide: kept per call signature, so a decode
    loop builds it once (paged_attention's plan cache) and each step only allocates and launches."""

    __slots__ = ("o_shape", "lse_shape", "parts", "grid", "scalars", "constexprs", "merge_grid", "merge_scalars",
                 "merge_constexprs", "config", "device", "empty", "e4m3_bytes")


def merge_block_rows(head_dim_v_pad: int) -> int:
    """(token, head) rows per merge program: the fp32 accumulator and one partial tile stay in registers."""
    return max(1, MERGE_TILE_ELEMENTS // head_dim_v_pad)


def _plan_launch(q, k_cache, v_cache, seqused_k, block_table, cu_seqlens_q, max_seqlen_q, causal, sm_scale, window,
                 softcap, alibi_slopes, sinks, cache_leftpad, num_splits, k_scale, v_scale, has_mask_mod, o, lse):
    """The _Launch of one call, from shapes, strides and options (o and lse: its output buffers)."""
    plan = _Launch()
    packed = cu_seqlens_q is not None
    head_dim_v = v_cache.shape[-1]
    if packed:
        num_tokens, h_q, head_dim = q.shape
        batch, n_q = cu_seqlens_q.shape[0] - 1, 0
        q_strides = (0, q.stride(1), q.stride(0), q.stride(2))
        o_strides, lse_strides = (0, o.stride(1), o.stride(0), o.stride(2)), (0, lse.stride(0), lse.stride(1))
    else:
        batch, h_q, n_q, head_dim = q.shape
        num_tokens, max_seqlen_q = batch * n_q, n_q
        q_strides, o_strides, lse_strides = q.stride(), o.stride(), lse.stride()
    plan.o_shape, plan.lse_shape, plan.device = o.shape, lse.shape, q.device
    plan.empty = num_tokens == 0 or batch == 0
    if plan.empty:
        return plan
    paged = block_table is not None
    window_left, window_right = window
    if causal:
        window_right = 0
    kv_scales = 0 if k_scale is None else (1 if k_scale.numel() == 1 else 2)
    switches = (("PAGED", paged), ("IS_VARLEN", packed), ("IS_CAUSAL", bool(causal)),
                ("HAS_WINDOW", window_left < UNLIMITED or (window_right < UNLIMITED and not causal)),
                ("HAS_SOFTCAP", bool(softcap)), ("HAS_ALIBI", alibi_slopes is not None),
                ("HAS_SINKS", sinks is not None), ("HAS_LEFTPAD", cache_leftpad is not None),
                ("KV_SCALES", kv_scales), ("HAS_MASK_MOD", has_mask_mod))
    config, heads, block_q, head_blocks, tiles, capacity = plan_tiles(q, k_cache, v_cache, block_table,
                                                                      cu_seqlens_q, max_seqlen_q, switches)
    h_kv = k_cache.shape[1]
    # Split programs serve the sequences with at most MAX_SPLIT_QUERIES new tokens: this many tiles each.
    split_tiles = -(-min(max_seqlen_q, MAX_SPLIT_QUERIES) // block_q)
    if num_splits is None:
        num_splits = choose_num_splits(batch * split_tiles * h_kv * head_blocks, capacity, sm_count(q.device))
    split = num_splits > 1 and max_seqlen_q > 0
    slots = (num_splits, batch, MAX_SPLIT_QUERIES, h_q)  # partials: (split, b, token, head)
    plan.parts = (slots + (head_dim_v,), slots) if split else None
    alibi_strides = (0, 0) if alibi_slopes is None else ((0, 1) if alibi_slopes.dim() == 1 else (h_q, 1))
    table_strides = block_table.stride() if paged else (0, 0)
    scale_strides = k_scale.stride() if kv_scales == 2 else (0, 0, 0)
    head_dim_pad, head_dim_tail = head_dim_tiles(head_dim)
    head_dim_v_pad = _head_dim_pad(head_dim_v)
    plan.config = config
    plan.grid = (tiles + (batch * split_tiles * (num_splits - 1) if split else 0), h_kv * head_blocks)
    plan.scalars = (sm_scale, float(softcap or 0.0), window_left, window_right,
                    *q_strides, *k_cache.stride(), *v_cache.stride(), *o_strides, *lse_strides, *table_strides,
                    *alibi_strides, *scale_strides, batch, n_q, h_q, h_q // h_kv, head_blocks, capacity,
                    k_cache.shape[0], num_splits, tiles, split_tiles, max(1, (batch - 1).bit_length()))
    flags = {name: value for name, value in switches if name not in ("KV_SCALES", "HAS_MASK_MOD")}
    # Triton has no e4m3 type before sm_89 (no fp8 tensor cores): such a chip reads an e4m3 cache as bytes.
    chip = chip_for(q.device)
    plan.e4m3_bytes = (k_cache.dtype == torch.float8_e4m3fn and chip is not None
                       and chip.capability < FP8_TYPE_CAPABILITY)
    plan.constexprs = dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, HEAD_DIM_TAIL=head_dim_tail,
                           HEAD_DIM_V=head_dim_v, HEAD_DIM_V_PAD=head_dim_v_pad, HEADS=heads,
                           PAGE_SIZE=k_cache.shape[2] if paged else 1, **flags, SPLIT=split,
                           SHARED_KV=shares_storage(k_cache, v_cache), KV_SCALES=kv_scales,
                           UPCAST=upcast_tiles(q.dtype), DOT_PRECISION=dot_precision(q.dtype), MASK_MOD=None,
                           E4M3_BYTES=plan.e4m3_bytes, **config.all_kwargs())
    if split:
        merge_rows = merge_block_rows(head_dim_v_pad)
        plan.merge_grid = (-(-(batch * MAX_SPLIT_QUERIES * h_q) // merge_rows),)
        plan.merge_scalars = (*o_strides, *lse_strides, batch, h_q, n_q, num_splits)
        plan.merge_constexprs = dict(HEAD_DIM=head_dim_v, HEAD_DIM_PAD=head_dim_v_pad, BLOCK_R=merge_rows,
                                     IS_VARLEN=packed, HAS_SINKS=sinks is not None, UPCAST=upcast_tiles(q.dtype),
                                     num_warps=MERGE_WARPS)
    return plan


def _run(plan, q, k_cache, v_cache, seqused_k, block_table, cu_seqlens_q, cache_leftpad, alibi_slopes, sinks,
         k_scale, v_scale, mask_mod, o, lse, o_part=None, lse_part=None):
    """Launch a planned call on these tensors (the kernel, and the merge when split). Returns o, lse."""
    if plan.empty:
        return o, lse
    if plan.parts is not None:
        o_part = torch.empty(plan.parts[0], dtype=torch.float32, device=plan.device) if o_part is None else o_part
        lse_part = torch.empty(plan.parts[1], dtype=torch.float32, device=plan.device) if lse_part is None else lse_part
    else:
        o_part, lse_part = o, lse  # never read: the kernel writes o and lse itself
    placeholder = seqused_k  # a switched-off option's pointer is never read
    if plan.e4m3_bytes:
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    sinks = sinks.float().contiguous() if sinks is not None else placeholder
    constexprs = plan.constexprs if mask_mod is None else dict(plan.constexprs, MASK_MOD=mask_mod.fn)
    with runtime.on_device(plan.device):
        CONFIGS["paged"].last_config = plan.config
        _paged_attn_fwd[plan.grid](
            q, k_cache, v_cache, o, lse, o_part, lse_part, placeholder if cu_seqlens_q is None else cu_seqlens_q,
            seqused_k, placeholder if cache_leftpad is None else cache_leftpad,
            placeholder if block_table is None else block_table, sinks,
            placeholder if alibi_slopes is None else alibi_slopes.float().contiguous(),
            placeholder if k_scale is None else k_scale, placeholder if v_scale is None else v_scale,
            *plan.scalars, () if mask_mod is None else mask_mod.args, **constexprs)
        if plan.parts is not None:
            _paged_merge[plan.merge_grid](o_part, lse_part, o, lse, sinks,
                                          placeholder if cu_seqlens_q is None else cu_seqlens_q,
                                          *plan.merge_scalars, **plan.merge_constexprs)
    return o, lse


def _outputs(q, head_dim_v, packed):
    """o in q's layout with v's head dim, and the fp32 lse: (Hq, total_q) packed, (B, Hq, Nq) dense."""
    o = q.new_empty((*q.shape[:-1], head_dim_v))
    lse = q.new_empty((q.shape[1], q.shape[0]) if packed else q.shape[:3], dtype=torch.float32)
    return o, lse


def _paged_fwd(q, k_cache, v_cache, seqused_k, block_table, cu_seqlens_q, max_seqlen_q, causal, sm_scale,
               window=(UNLIMITED, UNLIMITED), softcap=0.0, alibi_slopes=None, sinks=None, cache_leftpad=None,
               num_splits=None, k_scale=None, v_scale=None, mask_mod=None, o=None, lse=None, o_part=None,
               lse_part=None):
    """Plan and run one call: the paged kernel, and the merge when split. Returns o in q's layout and lse in fp32.

    Packed q (total_q, Hq, D) gives lse (Hq, total_q); dense (B, Hq, Nq, D) gives (B, Hq, Nq); o has
    v_cache's head dim. window: (left, right) as kernel ints, UNLIMITED for an open side (causal sets
    right = 0). k_scale, v_scale: an fp8 cache's scales, (1,) or one per cache row and kv head.
    o, lse and the fp32 partials may be passed in (tests pass NaN-filled buffers).
    """
    if o is None or lse is None:
        o_new, lse_new = _outputs(q, v_cache.shape[-1], cu_seqlens_q is not None)
        o, lse = o if o is not None else o_new, lse if lse is not None else lse_new
    plan = _plan_launch(q, k_cache, v_cache, seqused_k, block_table, cu_seqlens_q, max_seqlen_q, causal, sm_scale,
                        window, softcap, alibi_slopes, sinks, cache_leftpad, num_splits, k_scale, v_scale,
                        mask_mod is not None, o, lse)
    return _run(plan, q, k_cache, v_cache, seqused_k, block_table, cu_seqlens_q, cache_leftpad, alibi_slopes, sinks,
                k_scale, v_scale, mask_mod, o, lse, o_part, lse_part)


# ----------------------------------------------------------------------------
# The torch.library op (what torch.compile traces) and the public functions
# ----------------------------------------------------------------------------
@torch.library.custom_op("attention_playground::paged_attn", mutates_args=())
def _paged_attn_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqused_k: torch.Tensor,
                   block_table: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None,
                   cache_leftpad: torch.Tensor | None, alibi_slopes: torch.Tensor | None, sinks: torch.Tensor | None,
                   k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, ints: list[int],
                   floats: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """ints: (max_seqlen_q, causal, window_left, window_right, num_splits or 0); floats: (sm_scale, softcap)."""
    max_seqlen_q, causal, window_left, window_right, num_splits = ints
    return _paged_fwd(q, k_cache, v_cache, seqused_k, block_table, cu_seqlens_q, max_seqlen_q, bool(causal),
                      floats[0], (window_left, window_right), floats[1], alibi_slopes, sinks, cache_leftpad,
                      num_splits or None, k_scale, v_scale)


@_paged_attn_op.register_fake
def _(q, k_cache, v_cache, seqused_k, block_table, cu_seqlens_q, cache_leftpad, alibi_slopes, sinks, k_scale, v_scale,
      ints, floats):
    lse_shape = (q.shape[1], q.shape[0]) if cu_seqlens_q is not None else q.shape[:3]
    return q.new_empty((*q.shape[:-1], v_cache.shape[-1])), q.new_empty(lse_shape, dtype=torch.float32)


def paged_attention(q, k_cache, v_cache, seqused_k, block_table=None, *, cu_seqlens_q=None, max_seqlen_q=None,
                    causal=True, sm_scale=None, window_size=None, softcap=None, alibi_slopes=None, sinks=None,
                    cache_leftpad=None, k_scale=None, v_scale=None, mask_mod=None, return_lse=False,
                    num_splits=None, validate=False, _lengths_name="seqused_k"):
    """Attention of each sequence's new tokens to its cached keys, for any serving step. Inference only.

    q: packed (total_q, Hq, D) with cu_seqlens_q (B + 1,) int32 prefix sums from 0 and max_seqlen_q (an int
    bound on any sequence's new tokens, which sizes the tiles), or dense (B, Hq, Nq, D); fp32, fp16, bf16.
    k_cache, v_cache: contiguous (B, Hkv, N_max, D), or with block_table (B, max_pages) int32/int64 a pool
    of pages (num_pages, Hkv, page_size, D), any page size, any strides (vLLM's (num_pages, page_size, Hkv, D)
    pool as a permuted view). D up to 576 for q and k, v's head dim up to 512 and at most q's (MLA's
    absorbed decode: v_cache = k_cache[..., :512], one latent cache read once). The cache may be fp8
    (e4m3fn, e5m2) with k_scale and v_scale: (1,) per tensor, or one per cache row and kv head, shaped like
    the cache's first three dims (value = stored * scale). seqused_k (B,): where each sequence's keys
    end, its new ones included (write them first with append_kv); cache_leftpad (B,): where they start.
    causal: new token i of nq_b sees keys up to seqused_k[b] - nq_b + i. window_size, softcap,
    alibi_slopes and sinks as in flash_attention, distances measured from that diagonal.
    mask_mod: a MaskMod (kernels/block_mask.py), e.g. kernels.mods.tree(ancestors) to verify a tree of
    speculative tokens; it sees q_idx = the new token's index (0 .. nq_b - 1) and kv_idx = the key's
    position relative to the first new token (negative: cached). It runs eagerly (outside a compiled graph).
    num_splits: split-KV chunks for few new tokens per sequence (None: from shapes and the SM count).
    validate: check the lengths, offsets and block table on the host first (a sync; clear errors).
    Without it nothing is read on the host, and a sequence with bad data outputs NaN rows.
    Returns o in q's layout and dtype (v's head dim), and with return_lse also lse, (Hq, total_q) packed
    or (B, Hq, Nq) dense, natural log, fp32. (_lengths_name: what errors call seqused_k.)
    """
    causal = check_flag(causal, "causal")
    return_lse = check_flag(return_lse, "return_lse")
    validate = check_flag(validate, "validate")
    if torch.is_grad_enabled() and (q.requires_grad or k_cache.requires_grad or v_cache.requires_grad):
        raise ValueError("paged attention has no backward pass, but q or the cache requires grad: "
                         "call it under torch.no_grad() (or torch.inference_mode())")
    eager = mask_mod is None and not torch.compiler.is_compiling()
    key = _call_signature(q, k_cache, v_cache, seqused_k, block_table, cu_seqlens_q, max_seqlen_q, causal, sm_scale,
                          window_size, softcap, alibi_slopes, sinks, cache_leftpad, k_scale, v_scale, num_splits,
                          _lengths_name) if eager else None
    known = _PLANS.get(key) if key is not None else None
    if known is None:  # a call signature not seen yet: every check, then its plan
        batch, capacity, _ = check_paged_inputs(q, k_cache, v_cache, seqused_k, block_table, cu_seqlens_q,
                                                max_seqlen_q, sm_scale, cache_leftpad, MAX_HEAD_DIM_QK, _lengths_name,
                                                k_scale, v_scale, MAX_HEAD_DIM_V)
        if q.dtype not in PAGED_DTYPES:
            raise TypeError(f"q has dtype {q.dtype}; paged attention supports float32, float16 and bfloat16")
        check_runnable(q, "q")
        check_flash_options(q, batch, softcap, alibi_slopes, sinks)
        if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                       or num_splits < 1):
            raise ValueError(f"num_splits must be None or an int >= 1, got {num_splits!r}")
        window = _window_bounds(window_size, causal)
        sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    else:
        capacity, plan = known
    if validate:
        validate_paged_data(q, k_cache, seqused_k, block_table, cu_seqlens_q, max_seqlen_q, cache_leftpad, capacity,
                            _lengths_name)
    if eager:  # the launch itself, without the op's dispatch; planned once per call signature
        o, lse = _outputs(q, v_cache.shape[-1], cu_seqlens_q is not None)
        if known is None:
            plan = _plan_launch(q, k_cache, v_cache, seqused_k, block_table, cu_seqlens_q, max_seqlen_q, causal,
                                sm_scale, window, softcap, alibi_slopes, sinks, cache_leftpad, num_splits, k_scale,
                                v_scale, False, o, lse)
            if key is not None:
                if len(_PLANS) >= MAX_PLANS:
                    _PLANS.clear()
                _PLANS[key] = (capacity, plan)
        o, lse = _run(plan, q, k_cache, v_cache, seqused_k, block_table, cu_seqlens_q, cache_leftpad, alibi_slopes,
                      sinks, k_scale, v_scale, None, o, lse)
    elif mask_mod is not None:
        mask_mod = as_mask_mod(mask_mod)
        check_mod_args(mask_mod.args, q.device, "mask_mod")
        o, lse = _paged_fwd_with_mask(q, k_cache, v_cache, seqused_k, block_table, cu_seqlens_q, max_seqlen_q,
                                      causal, sm_scale, window, softcap, alibi_slopes, sinks, cache_leftpad,
                                      num_splits, k_scale, v_scale, mask_mod)
    else:
        o, lse = _paged_attn_op(q, k_cache, v_cache, seqused_k, block_table, cu_seqlens_q, cache_leftpad,
                                alibi_slopes, sinks, k_scale, v_scale,
                                [max_seqlen_q or 0, int(causal), *window, num_splits or 0],
                                [sm_scale, float(softcap or 0.0)])
    return (o, lse) if return_lse else o


# Plans by call signature: (shape, strides, dtype, device of every tensor, and every option). A decode
# loop meets a handful; the bound only keeps a pathological caller from growing the dict forever.
_PLANS = {}
MAX_PLANS = 1024
on_reset(_PLANS.clear)  # a plan holds its config: configs.reset() (another chip, new footprints) drops them


def _described(t):
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


def _call_signature(q, k_cache, v_cache, seqused_k, block_table, cu_seqlens_q, max_seqlen_q, causal, sm_scale,
                    window_size, softcap, alibi_slopes, sinks, cache_leftpad, k_scale, v_scale, num_splits,
                    lengths_name):
    """What decides a call's checks and plan, or None if some argument is no tensor or not hashable."""
    try:
        key = (_described(q), _described(k_cache), _described(v_cache), k_cache.data_ptr() == v_cache.data_ptr(),
               _described(seqused_k), _described(block_table), _described(cu_seqlens_q), max_seqlen_q, causal,
               sm_scale, tuple(window_size) if isinstance(window_size, list) else window_size, softcap,
               _described(alibi_slopes), _described(sinks), _described(cache_leftpad), _described(k_scale),
               _described(v_scale), num_splits, lengths_name)
        hash(key)
    except (AttributeError, TypeError):
        return None
    return key


_paged_fwd_with_mask = torch.compiler.disable(_paged_fwd)  # a Triton mask_mod is no value a graph can hold


def decode_attention(q, k_cache, v_cache, cache_seqlens, block_table=None, causal=True, sm_scale=None,
                     return_lse=False, num_splits=None, *, window_size=None, softcap=None, alibi_slopes=None,
                     sinks=None, cache_leftpad=None, k_scale=None, v_scale=None, mask_mod=None, validate=False):
    """paged_attention with dense q (B, Hq, Nq, D): Nq new tokens per sequence, cache_seqlens its keys' end.

    The decode step of a generation loop (Nq = 1), or a few speculative tokens to verify. See
    paged_attention for every argument.
    """
    if isinstance(q, torch.Tensor) and q.dim() != 4:
        raise ValueError(f"q must have rank 4 (B, Hq, Nq, D), got shape {tuple(q.shape)}")
    return paged_attention(q, k_cache, v_cache, cache_seqlens, block_table, causal=causal, sm_scale=sm_scale,
                           window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
                           cache_leftpad=cache_leftpad, k_scale=k_scale, v_scale=v_scale, mask_mod=mask_mod,
                           return_lse=return_lse, num_splits=num_splits, validate=validate,
                           _lengths_name="cache_seqlens")
