"""Paged attention for every serving step, in plain PyTorch: the twin of kernels/paged.py.

A serving engine runs one batch per step, and each sequence in it brings
some new tokens: a whole prompt (prefill), a chunk of one (chunked prefill,
or a prompt whose prefix is already cached), a few speculative tokens to
verify, or one token (decode). Whatever the count, the new tokens' keys and
values are written into the cache first (`append_kv`), and their queries
attend to everything the sequence has cached:

    q            packed (total_q, Hq, D), sequence b's new tokens in rows cu_seqlens_q[b]:cu_seqlens_q[b + 1];
                 or dense (B, Hq, Nq, D), Nq new tokens per sequence
    k_cache      contiguous (B, Hkv, N_max, D), or a pool of pages (num_pages, Hkv, page_size, D) with
    v_cache      block_table (B, max_pages): key n of sequence b is row n % page_size of page
                 block_table[b, n // page_size] (reference/decode.py, gather_cache)
    seqused_k    (B,): sequence b's keys end there, its new ones included
    cache_leftpad (B,): and start there (0 by default): a left-padded batch keeps each prompt
                 right-aligned in the cache, and the pads before it are no keys

Query i of the nq_b new tokens of sequence b is the token at cache position
seqused_k[b] - nq_b + i, so causal attention lets it see keys up to that
position (bottom-right alignment), and the variants measure distances from
it: sliding windows, ALiBi. Softcap and sinks are as in `naive_attention`.
Each sequence is attended on its own, over exactly its keys: this is the
definition the kernel is held to.
"""
import math

import torch

from .decode import check_cache
from .fp8 import FP8_DTYPES, check_scales
from .functional import naive_attention


# ----------------------------------------------------------------------------
# The contract: shapes on the host (no data read); the data only when asked (validate=True)
# ----------------------------------------------------------------------------
def _index_vector(t, name, batch, device, dtypes=(torch.int32, torch.int64)):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes or t.dim() != 1 or t.shape[0] != batch:
        kinds = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must be a ({batch},) {kinds} tensor, got {t.dtype} of shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")
    if batch > 1 and t.stride(0) != 1:  # the kernels read it with unit stride
        raise ValueError(f"{name} must be contiguous, got stride {t.stride(0)}; pass {name}.contiguous()")


def check_paged_inputs(q, k_cache, v_cache, seqused_k, block_table, cu_seqlens_q, max_seqlen_q, sm_scale,
                       cache_leftpad, max_head_dim=None, lengths_name="seqused_k", k_scale=None, v_scale=None,
                       max_head_dim_v=None):
    """Raise a clear error, naming the argument, for inputs paged attention cannot take. Shapes only: no sync.

    Returns (batch, capacity, page_size or None).
    """
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    packed = cu_seqlens_q is not None
    if q.dim() != (3 if packed else 4):
        want = "(total_q, Hq, D) with cu_seqlens_q" if packed else "(B, Hq, Nq, D) (or packed, with cu_seqlens_q)"
        raise ValueError(f"q must have rank {3 if packed else 4}, {want}; got shape {tuple(q.shape)}")
    batch, h_kv, capacity, head_dim, page_size = check_cache(k_cache, v_cache, seqused_k, block_table, lengths_name)
    h_q = q.shape[1]
    if packed:
        _index_vector(cu_seqlens_q, "cu_seqlens_q", batch + 1, q.device, (torch.int32,))
        if isinstance(max_seqlen_q, bool) or not isinstance(max_seqlen_q, int) or max_seqlen_q < 0:
            raise TypeError(f"max_seqlen_q must be a non-negative int (a bound on any sequence's new tokens), "
                            f"got {max_seqlen_q!r}")
    elif q.shape[0] != batch:
        raise ValueError(f"q has batch {q.shape[0]} but {lengths_name} has {batch} sequences")
    if q.shape[-1] != head_dim:
        raise ValueError(f"q has head_dim {q.shape[-1]} but k_cache has {head_dim}")
    if max_head_dim is not None and not 1 <= head_dim <= max_head_dim:
        raise ValueError(f"head_dim (q.shape[-1]) must be between 1 and {max_head_dim}, got {head_dim}")
    if max_head_dim_v is not None and not 1 <= v_cache.shape[-1] <= min(max_head_dim_v, head_dim):
        raise ValueError(f"v_cache's head dim must be between 1 and {min(max_head_dim_v, head_dim)} (at most "
                         f"q's), got {v_cache.shape[-1]}")
    if h_kv == 0 or h_q % h_kv:
        raise ValueError(f"the number of query heads ({h_q}) must be a multiple of the number of kv heads ({h_kv})")
    check_scales(k_cache, v_cache, k_scale, v_scale, q.dtype)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype and t.dtype not in FP8_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; q and the cache must share one dtype "
                            "(or the cache be fp8, with k_scale and v_scale)")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; q and the cache must share a device")
    if cache_leftpad is not None:
        _index_vector(cache_leftpad, "cache_leftpad", batch, q.device)
    if sm_scale is not None and (isinstance(sm_scale, bool) or not isinstance(sm_scale, (int, float))
                                 or not math.isfinite(sm_scale)):
        raise TypeError(f"sm_scale must be a finite float or None, got {sm_scale!r}")
    return batch, capacity, page_size


def validate_paged_data(q, k_cache, seqused_k, block_table, cu_seqlens_q, max_seqlen_q, cache_leftpad, capacity,
                        lengths_name="seqused_k"):
    """Read the lengths, offsets and block table on the host and raise on any the kernel would turn to NaN.

    A device-to-host sync per tensor: for debugging and for callers that can
    afford it (validate=True), never on the fast path.
    """
    ends = seqused_k.tolist()
    starts = cache_leftpad.tolist() if cache_leftpad is not None else [0] * len(ends)
    if cu_seqlens_q is not None:
        bounds = cu_seqlens_q.tolist()
        if bounds[0] != 0 or any(b < a for a, b in zip(bounds, bounds[1:])) or bounds[-1] != q.shape[0]:
            raise ValueError(f"cu_seqlens_q must start at 0, never decrease and end at the {q.shape[0]} packed "
                             f"tokens, got {bounds[:8]}...")
        counts = [b - a for a, b in zip(bounds, bounds[1:])]
        if counts and max(counts) > max_seqlen_q:
            raise ValueError(f"max_seqlen_q ({max_seqlen_q}) is shorter than the longest run of new tokens "
                             f"({max(counts)})")
    else:
        counts = [q.shape[2]] * len(ends)
    for b, (start, end, count) in enumerate(zip(starts, ends, counts)):
        if not 0 <= end <= capacity:
            raise ValueError(f"{lengths_name}[{b}] = {end} is outside [0, {capacity}], the cache's capacity")
        if not 0 <= start <= end:
            raise ValueError(f"cache_leftpad[{b}] = {start} is outside [0, {lengths_name}[{b}] = {end}]")
        if end - start < count:
            raise ValueError(f"sequence {b} has {count} new tokens but only {end - start} keys: the new tokens' "
                             "keys must be in the cache (append_kv) before attending")
    if block_table is not None:
        page_size, num_pages = k_cache.shape[2], k_cache.shape[0]
        for b, end in enumerate(ends):
            used = block_table[b, :-(-end // page_size)].tolist()
            bad = [(j, page) for j, page in enumerate(used) if not 0 <= page < num_pages]
            if bad:
                j, page = bad[0]
                raise ValueError(f"block_table[{b}, {j}] = {page} is not a page of the pool "
                                 f"(k_cache has {num_pages} pages)")


# ----------------------------------------------------------------------------
# Reading the cache, and the attention
# ----------------------------------------------------------------------------
def sequence_keys(cache, seq, start, end, block_table=None, scale=None):
    """Keys [start, end) of sequence `seq`, as a contiguous (Hkv, end - start, D) tensor.

    scale: an fp8 cache's dequantization, (1,) or one per cache row and kv head (laid out like the
    cache's first three dims): the keys come back as fp32 stored value * scale.
    """
    if block_table is None:
        keys = cache[seq, :, start:end]
        scales = None if scale is None or scale.numel() == 1 else scale[seq, :, start:end]
    else:
        page_size = cache.shape[2]
        positions = torch.arange(start, end, device=cache.device)
        pages = block_table[seq].to(torch.int64)[positions // page_size]  # (n,)
        # (n,) page and row indices into (num_pages, Hkv, page_size, D) -> (n, Hkv, D) -> (Hkv, n, D)
        keys = cache[pages, :, positions % page_size].transpose(0, 1)
        scales = None if scale is None or scale.numel() == 1 else scale[pages, :, positions % page_size].t()
    if scale is None:
        return keys
    scales = scale.reshape(1, 1) if scales is None else scales  # (Hkv, n) per row, or one for all
    return keys.float() * scales[..., None]


def new_token_counts(q, cu_seqlens_q, batch):
    """(B,) new tokens per sequence and a function giving sequence b's queries as (1, Hq, nq_b, D)."""
    if cu_seqlens_q is None:
        counts = [q.shape[2]] * batch
        return counts, lambda b: q[b:b + 1]
    bounds = cu_seqlens_q.tolist()
    counts = [end - start for start, end in zip(bounds, bounds[1:])]
    # (nq_b, Hq, D) -> (1, Hq, nq_b, D)
    return counts, lambda b: q[bounds[b]:bounds[b + 1]].transpose(0, 1)[None]


def paged_attention(q, k_cache, v_cache, seqused_k, block_table=None, *, cu_seqlens_q=None, causal=True,
                    sm_scale=None, window_size=None, softcap=None, alibi_slopes=None, sinks=None, cache_leftpad=None,
                    return_lse=False, dtype=None, k_scale=None, v_scale=None):
    """Every sequence's new queries against its cached keys [cache_leftpad[b], seqused_k[b]).

    Returns o in q's layout (packed (total_q, Hq, D) or dense (B, Hq, Nq, D)) and with return_lse
    also the natural-log lse, (Hq, total_q) packed or (B, Hq, Nq) dense. dtype: compute in it
    (torch.float64 for the tests' reference); by default q's. A row that sees no key gives 0
    (lse -inf, or the sink's logit with sinks). k_scale, v_scale: an fp8 cache's scales (dequantized
    value = stored value * scale).
    """
    batch, _, _, head_dim, _ = check_cache(k_cache, v_cache, seqused_k, block_table)
    sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    counts, queries = new_token_counts(q, cu_seqlens_q, batch)
    ends = seqused_k.tolist()
    starts = cache_leftpad.tolist() if cache_leftpad is not None else [0] * batch
    outputs, lses = [], []
    for b in range(batch):
        k = sequence_keys(k_cache, b, starts[b], ends[b], block_table, k_scale)[None]  # (1, Hkv, n_b, D)
        v = sequence_keys(v_cache, b, starts[b], ends[b], block_table, v_scale)[None]
        slopes = None if alibi_slopes is None else (alibi_slopes[b] if alibi_slopes.dim() == 2 else alibi_slopes)
        o, lse = naive_attention(queries(b), k, v, causal, sm_scale, dtype or q.dtype, window_size=window_size,
                                 softcap=softcap, alibi_slopes=slopes, sinks=sinks, return_lse=True)
        outputs.append(o)  # (1, Hq, nq_b, D)
        lses.append(lse)  # (1, Hq, nq_b)
    if cu_seqlens_q is None:
        o, lse = torch.cat(outputs), torch.cat(lses)
    else:
        # (1, Hq, nq_b, D) -> (nq_b, Hq, D), packed back to back; lse (1, Hq, nq_b) -> (Hq, total_q)
        o = torch.cat([o_b[0].transpose(0, 1) for o_b in outputs])
        lse = torch.cat([lse_b[0] for lse_b in lses], dim=1)
    return (o, lse) if return_lse else o
