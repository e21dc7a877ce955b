"""Decoding attention over a KV cache, in plain PyTorch: the twin of kernels/decode.py.

During generation each step brings a few new tokens (usually one) per
sequence, and their queries attend to every key cached so far. The cache
holds, for a batch of B sequences of different lengths, K and V in one of
two layouts:

    contiguous  k_cache, v_cache: (B, Hkv, N_max, D); sequence b uses rows 0..n_b-1
    paged       k_cache, v_cache: pools of (num_blocks, Hkv, block_size, D) blocks;
                block_table (B, max_blocks_per_seq): logical block j of sequence b
                is physical block block_table[b, j]; key n of b lives in
                block block_table[b, n // block_size], row n % block_size

cache_seqlens (B,) counts the valid keys of each sequence, the Nq new ones
included: they are appended (`append_kv`) before attending. Causal masking
is bottom-right per sequence: query i of sequence b sees key j when
j <= cache_seqlens[b] - Nq + i.

Split-KV, the idea the kernel is built on, written plainly: cut a sequence's
keys into chunks, attend to each chunk on its own (a partial output o_s,
normalised over the chunk, and the log-sum-exp lse_s of its scores), then
merge. Since o_s = sum_{j in s} exp(x_j - lse_s) v_j, the full softmax is

    lse = log(sum_s exp(lse_s))        o = sum_s exp(lse_s - lse) o_s

exactly the online softmax's rescaling, with one "score" lse_s per chunk.
"""
import math

import torch

from .fp8 import FP8_DTYPES, check_scales, quantize_rows
from .functional import repeat_kv

INDEX_DTYPES = (torch.int32, torch.int64)


# ----------------------------------------------------------------------------
# The contract: shapes, dtypes and devices, then the lengths and block indices
# ----------------------------------------------------------------------------
def _index_tensor(t, name, rank):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must have dtype torch.int32 or torch.int64, got {t.dtype}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {tuple(t.shape)}")
    if rank == 1 and t.shape[0] > 1 and t.stride(0) != 1:  # the kernels read it with unit stride
        raise ValueError(f"{name} must be contiguous, got stride {t.stride(0)}; pass {name}.contiguous()")


def check_cache(k_cache, v_cache, cache_seqlens, block_table=None, lengths_name="cache_seqlens"):
    """Check the cache's layout (no data read). Returns (batch, h_kv, capacity, head_dim, block_size or None).

    lengths_name: what the caller calls cache_seqlens (paged attention's seqused_k), for the errors.
    """
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            what = "(num_blocks, Hkv, block_size, D)" if block_table is not None else "(B, Hkv, N_max, D)"
            raise ValueError(f"{name} must have rank 4 {what}, got shape {tuple(t.shape)}")
    shape, device = k_cache.shape, k_cache.device  # read once: this runs on every decode step
    if shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"k_cache and v_cache must have the same shape but for the head dim, got "
                         f"{tuple(shape)} and {tuple(v_cache.shape)}")
    if v_cache.dtype != k_cache.dtype:
        raise TypeError(f"v_cache has dtype {v_cache.dtype} but k_cache has {k_cache.dtype}")
    _index_tensor(cache_seqlens, lengths_name, 1)
    for name, t in (("v_cache", v_cache), (lengths_name, cache_seqlens)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but k_cache is on {device}")
    batch = cache_seqlens.shape[0]
    h_kv, head_dim = shape[1], shape[3]
    if block_table is None:
        if shape[0] != batch:
            raise ValueError(f"k_cache holds {shape[0]} sequences but {lengths_name} has {batch}")
        return batch, h_kv, shape[2], head_dim, None
    _index_tensor(block_table, "block_table", 2)
    if block_table.device != device:
        raise ValueError(f"block_table is on {block_table.device} but k_cache is on {device}")
    table_shape = block_table.shape
    if table_shape[0] != batch:
        raise ValueError(f"block_table has {table_shape[0]} rows but {lengths_name} has {batch} sequences")
    block_size = shape[2]
    return batch, h_kv, table_shape[1] * block_size, head_dim, block_size


def check_lengths(cache_seqlens, capacity, least=0, block_table=None, num_blocks=None, block_size=None):
    """Check every length against [least, capacity] and every block a sequence uses against the pool.

    Reads the data, so on a GPU it waits for it (one device-to-host copy per
    tensor). Returns the lengths as a list of ints.
    """
    lengths = cache_seqlens.tolist()
    for b, n in enumerate(lengths):
        if not least <= n <= capacity:
            raise ValueError(f"cache_seqlens[{b}] = {n} is outside [{least}, {capacity}]: it must count at least "
                             f"the {least} new token(s) and at most the cache's capacity of {capacity}")
    if block_table is not None and block_table.numel():
        # Only the blocks that hold keys are read; the rest of a row may be padding (-1, say).
        blocks_used = (cache_seqlens.to(torch.int64) + block_size - 1) // block_size  # (B,)
        used = torch.arange(block_table.shape[1], device=block_table.device) < blocks_used[:, None]
        bad = used & ((block_table < 0) | (block_table >= num_blocks))
        if bad.any():
            b, j = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"block_table[{b}, {j}] = {int(block_table[b, j])} is not a block of the pool "
                             f"(k_cache has {num_blocks} blocks)")
    return lengths


def check_decode_inputs(q, k_cache, v_cache, cache_seqlens, block_table=None):
    """Check q against the cache (shapes, dtype, device). Returns check_cache's tuple."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must have rank 4 (B, Hq, Nq, D), got shape {tuple(q.shape)}")
    batch, h_kv, capacity, head_dim, block_size = check_cache(k_cache, v_cache, cache_seqlens, block_table)
    if q.shape[0] != batch:
        raise ValueError(f"q has batch {q.shape[0]} but cache_seqlens has {batch} sequences")
    if q.shape[3] != head_dim:
        raise ValueError(f"q has head_dim {q.shape[3]} but k_cache has {head_dim}")
    if h_kv == 0 or q.shape[1] % h_kv != 0:
        raise ValueError(f"the number of query heads ({q.shape[1]}) must be a multiple of the number of kv heads "
                         f"({h_kv})")
    if q.shape[2] < 1:
        raise ValueError("q must hold at least one query token (q.shape[2] >= 1)")
    if k_cache.dtype != q.dtype:
        raise TypeError(f"k_cache has dtype {k_cache.dtype} but q has {q.dtype}; q and the cache must share one dtype")
    if k_cache.device != q.device:
        raise ValueError(f"k_cache is on {k_cache.device} but q is on {q.device}; q and the cache must share a device")
    return batch, h_kv, capacity, head_dim, block_size


# ----------------------------------------------------------------------------
# Writing into the cache, reading a sequence back out
# ----------------------------------------------------------------------------
def _check_new_rows(k_new, v_new, k_cache, v_cache, batch, h_kv, cu_seqlens_new):
    """Shapes, dtypes and devices of the new keys and values, dense or packed (no data read).

    Each has its cache's head dim (a value head dim may differ from the keys', as MLA's does), and
    its dtype, or for an fp8 cache a 16-bit or fp32 dtype (quantized on write).
    """
    quantized = k_cache.dtype in FP8_DTYPES
    packed = cu_seqlens_new is not None
    for name, t, head_dim in (("k_new", k_new, k_cache.shape[3]), ("v_new", v_new, v_cache.shape[3])):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if packed and (t.dim() != 3 or (t.shape[1], t.shape[2]) != (h_kv, head_dim)):
            raise ValueError(f"{name} must have shape (total_new, {h_kv}, {head_dim}) with cu_seqlens_new, "
                             f"got {tuple(t.shape)}")
        if not packed and (t.dim() != 4 or (t.shape[0], t.shape[1], t.shape[3]) != (batch, h_kv, head_dim)):
            raise ValueError(f"{name} must have shape ({batch}, {h_kv}, Nnew, {head_dim}) to match the cache "
                             f"(or (total_new, {h_kv}, {head_dim}) with cu_seqlens_new), got {tuple(t.shape)}")
        if t.device != k_cache.device:
            raise ValueError(f"{name} is on {t.device} but k_cache is on {k_cache.device}")
        if quantized and t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{name} has dtype {t.dtype}; an fp8 cache ({k_cache.dtype}) takes new rows in "
                            "float16, bfloat16 or float32 and quantizes them with k_scale and v_scale")
        if not quantized and t.dtype != k_cache.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but the cache has {k_cache.dtype}")
    if k_new.shape[:-1] != v_new.shape[:-1]:
        raise ValueError(f"k_new and v_new must have the same shape but for the head dim, got {tuple(k_new.shape)} "
                         f"and {tuple(v_new.shape)}")
    if packed:
        _index_tensor(cu_seqlens_new, "cu_seqlens_new", 1)
        if cu_seqlens_new.shape[0] != batch + 1:
            raise ValueError(f"cu_seqlens_new must have {batch + 1} offsets (batch + 1), got {cu_seqlens_new.shape[0]}")
        if cu_seqlens_new.device != k_cache.device:
            raise ValueError(f"cu_seqlens_new is on {cu_seqlens_new.device} but k_cache is on {k_cache.device}")


def _validate_append(cache_seqlens, counts, capacity, block_table, num_blocks, block_size):
    """append_kv's host checks (validate=True): every sequence fits, every block it will use is in the pool."""
    for b, (n, n_new) in enumerate(zip(cache_seqlens.tolist(), counts)):
        if not 0 <= n <= capacity - n_new:
            raise ValueError(f"cache_seqlens[{b}] = {n}: appending {n_new} token(s) passes the cache's capacity "
                             f"of {capacity}" if n >= 0 else f"cache_seqlens[{b}] = {n} is negative")
    new_seqlens = cache_seqlens.to(torch.int64) + torch.tensor(counts, dtype=torch.int64,
                                                               device=cache_seqlens.device)
    check_lengths(new_seqlens, capacity, 0, block_table, num_blocks, block_size)


def _validate_offsets(cu_seqlens_new, total):
    """The packed form's offsets, read on the host (validate=True). Returns the tokens per sequence."""
    offsets = cu_seqlens_new.tolist()
    if offsets[0] != 0 or any(b < a for a, b in zip(offsets, offsets[1:])) or offsets[-1] != total:
        raise ValueError(f"cu_seqlens_new must start at 0, never decrease and end at the {total} new tokens, "
                         f"got {offsets[:8]}{'...' if len(offsets) > 8 else ''}")
    return [b - a for a, b in zip(offsets, offsets[1:])]


def append_kv(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table=None, *, cu_seqlens_new=None,
              k_scale=None, v_scale=None, validate=False):
    """Write each sequence's new keys and values into the cache after its cache_seqlens[b] keys. In place.

    New tokens come dense, k_new and v_new (B, Hkv, Nnew, D) (the same count for every sequence:
    a decode step), or packed, (total_new, Hkv, D) with cu_seqlens_new (B + 1,) prefix sums from 0
    (sequence b's new tokens are rows cu_seqlens_new[b]:cu_seqlens_new[b + 1], any count each: a
    chunked-prefill step). Either cache layout, through any strides (a permuted view of a
    (num_blocks, block_size, Hkv, D) pool included). Returns the new lengths, cache_seqlens plus
    each sequence's new tokens, a tensor on the cache's device in cache_seqlens's dtype.

    Nothing is read on the host (no sync: a decode loop can be captured in a CUDA graph), so bad
    data cannot raise; instead a new token whose position would be negative or pass the cache's
    capacity, or land in a block outside the pool (a block-table entry < 0 or >= the pool's
    blocks), is not written: never out of bounds, never into another sequence's rows (every
    index is computed and masked on the device; see the end of the function). Its sequence's
    returned length still counts it, so paged attention then sees a length past the capacity,
    or the bad block, and gives that sequence NaN rows instead of a silently wrong answer.
    An fp8 cache (e4m3fn, e5m2) takes k_scale and v_scale, paged attention's: new rows (16-bit
    or fp32) are quantized on write, with the per-tensor scale (1,) (saturating), or per row and
    kv head, each new row's scale computed from it and written into k_scale / v_scale beside it
    (reference/fp8.py: quantize_rows).
    Packed offsets that do not count up are not checked either: a token outside every
    sequence's range is not written. validate=True reads the lengths, offsets and block table on
    the host first (a device-to-host sync) and raises an error that names the argument.
    """
    batch, h_kv, capacity, _, block_size = check_cache(k_cache, v_cache, cache_seqlens, block_table)
    _check_new_rows(k_new, v_new, k_cache, v_cache, batch, h_kv, cu_seqlens_new)
    check_scales(k_cache, v_cache, k_scale, v_scale, k_new.dtype)
    packed = cu_seqlens_new is not None
    device = k_cache.device
    if validate:
        counts = (_validate_offsets(cu_seqlens_new, k_new.shape[0]) if packed
                  else [k_new.shape[2]] * batch)
        _validate_append(cache_seqlens, counts, capacity, block_table, k_cache.shape[0], block_size)
    if packed:
        offsets = cu_seqlens_new.to(torch.int64)
        new_seqlens = cache_seqlens + (offsets[1:] - offsets[:-1]).to(cache_seqlens.dtype)
    else:
        new_seqlens = cache_seqlens + k_new.shape[2]
    if k_new.shape[0] == 0 or (not packed and k_new.shape[2] == 0) or batch == 0 or capacity == 0 \
            or k_cache.shape[0] == 0:
        return new_seqlens  # nothing to write, or nowhere to write it
    lengths = cache_seqlens.to(torch.int64)
    if packed:
        k_rows, v_rows = k_new, v_new  # (total_new, Hkv, D)
        token = torch.arange(k_new.shape[0], device=device)
        # Each token's sequence: the last b with cu_seqlens_new[b] <= token (searchsorted, on the device).
        seq = torch.searchsorted(offsets[1:], token, right=True).clamp_(max=max(batch - 1, 0))
        start = offsets[seq]
        positions = lengths[seq] + (token - start)
        # Offsets that do not count up place some tokens in no sequence's range: those are not written.
        valid = (token >= start) & (token < offsets[seq + 1])
    else:
        n_new = k_new.shape[2]
        # (B, Hkv, Nnew, D) -> (B, Nnew, Hkv, D) -> (B * Nnew, Hkv, D): token (b, i) is row b * Nnew + i
        k_rows = k_new.transpose(1, 2).reshape(-1, h_kv, k_new.shape[3])
        v_rows = v_new.transpose(1, 2).reshape(-1, h_kv, v_new.shape[3])
        seq = torch.arange(batch, device=device).repeat_interleave(n_new)
        # (B, 1) + (1, Nnew) -> (B, Nnew) -> (B * Nnew,): logical positions n_b, n_b + 1, ...
        positions = (lengths[:, None] + torch.arange(n_new, device=device)).reshape(-1)
        valid = None
    in_range = (positions >= 0) & (positions < capacity)
    valid = in_range if valid is None else valid & in_range
    if block_table is None:
        rows, slots = seq, positions.clamp(0, capacity - 1)
    else:
        num_blocks = k_cache.shape[0]
        column = positions.clamp(0, capacity - 1) // block_size
        blocks = block_table[seq, column].to(torch.int64)  # (T,) physical blocks
        valid &= (blocks >= 0) & (blocks < num_blocks)
        rows, slots = blocks.clamp(0, num_blocks - 1), positions.remainder(block_size)
    # A row that must not be written is sent where the first valid row goes, with that row's values
    # (or, when no row is valid, to row 0 of block 0 with the values already there): every write to
    # one place then carries the same bits, so the duplicates are harmless. No data is read on the host.
    first = valid.to(torch.int32).argmax().view(1)  # the first valid row, 0 when there is none
    any_valid = valid.any()
    spare_row = torch.where(any_valid, rows.index_select(0, first)[0], 0)
    spare_slot = torch.where(any_valid, slots.index_select(0, first)[0], 0)
    rows, slots = torch.where(valid, rows, spare_row), torch.where(valid, slots, spare_slot)
    keep = valid[:, None, None]
    for cache, new, scale in ((k_cache, k_rows, k_scale), (v_cache, v_rows, v_scale)):
        if scale is not None:  # an fp8 cache: quantize, and write per-row scales beside their rows
            new, row_scale = quantize_rows(new, scale, cache.dtype)
            if row_scale is not None:
                spare = torch.where(any_valid, row_scale.index_select(0, first)[0], scale[0, :, 0])  # (Hkv,)
                scale[rows, :, slots] = torch.where(valid[:, None], row_scale, spare)
        spare = torch.where(any_valid, new.index_select(0, first)[0], cache[0, :, 0])  # (Hkv, D)
        # Two index tensors around a slice: the indexed view is (T, Hkv, D).
        cache[rows, :, slots] = torch.where(keep, new, spare)
    return new_seqlens


def gather_cache(cache, seq, length, block_table=None):
    """The first `length` rows of sequence `seq`, as a contiguous (Hkv, length, D) tensor."""
    if block_table is None:
        return cache[seq, :, :length]
    block_size = cache.shape[2]
    blocks = block_table[seq, :(length + block_size - 1) // block_size].to(torch.int64)
    pages = cache[blocks]  # (blocks, Hkv, block_size, D)
    h_kv, head_dim = cache.shape[1], cache.shape[3]
    # (blocks, Hkv, block_size, D) -> (Hkv, blocks, block_size, D) -> (Hkv, blocks * block_size, D)
    return pages.transpose(0, 1).reshape(h_kv, -1, head_dim)[:, :length]


# ----------------------------------------------------------------------------
# Attention: per chunk, the merge, and the whole decode step
# ----------------------------------------------------------------------------
def chunk_attention(q, k, v, n_keys, lo, hi, causal, sm_scale):
    """Attention of q (Hq, Nq, D) to keys [lo, hi) of k, v (Hkv, n_keys, D), normalised over that chunk.

    Returns (o_s (Hq, Nq, D), lse_s (Hq, Nq)); a row that sees no key of the
    chunk gets o_s = 0 and lse_s = -inf, so it weighs nothing in the merge.
    """
    h_q, n_q = q.shape[0], q.shape[1]
    k = repeat_kv(k[None, :, lo:hi], h_q // k.shape[0])[0]  # (Hkv, chunk, D) -> (Hq, chunk, D)
    v = repeat_kv(v[None, :, lo:hi], h_q // v.shape[0])[0]
    scores = (q @ k.transpose(-2, -1)) * sm_scale  # (Hq, Nq, chunk)
    if causal:
        keys = torch.arange(lo, hi, device=q.device)
        queries = torch.arange(n_q, device=q.device)
        visible = keys[None, :] <= queries[:, None] + (n_keys - n_q)  # (Nq, chunk), bottom-right
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (Hq, Nq); -inf where a row sees nothing
    weights = torch.exp(scores - lse.masked_fill(lse == float("-inf"), 0.0)[..., None])
    return weights @ v, lse


def merge_partials(o_parts, lse_parts):
    """Merge S partial results: o_parts (S, ..., D), lse_parts (S, ...) -> (o, lse).

    lse = log sum_s exp(lse_s) and o = sum_s exp(lse_s - lse) o_s. A row
    with every lse_s = -inf (no key anywhere) gets o = 0 and lse = -inf.
    """
    lse = torch.logsumexp(lse_parts, dim=0)
    lse_safe = lse.masked_fill(lse == float("-inf"), 0.0)
    weights = torch.exp(lse_parts - lse_safe)  # (S, ...); 0 for an empty chunk
    return (weights[..., None] * o_parts).sum(dim=0), lse


def decode_attention(q, k_cache, v_cache, cache_seqlens, block_table=None, causal=True, sm_scale=None,
                     return_lse=False, num_splits=None, dtype=None):
    """Attention of q (B, Hq, Nq, D) to each sequence's cached keys; the plain twin of kernels.decode_attention.

    num_splits=None attends to all keys at once; an int cuts each sequence's
    keys into that many chunks (of ceil(n_b / num_splits) keys) and merges
    them, as the kernel does. dtype computes in that dtype (torch.float64 for
    the tests' reference); by default q's. Unlike the kernel, any Nq works.
    Returns o (B, Hq, Nq, D), and with return_lse=True the natural-log lse (B, Hq, Nq).
    """
    batch, h_kv, capacity, head_dim, block_size = check_decode_inputs(q, k_cache, v_cache, cache_seqlens, block_table)
    n_q = q.shape[2]
    lengths = check_lengths(cache_seqlens, capacity, n_q, block_table, k_cache.shape[0], block_size)
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be None or an int >= 1, got {num_splits!r}")
    dtype = dtype or q.dtype
    sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    outputs, lses = [], []
    for b, n in enumerate(lengths):
        k = gather_cache(k_cache, b, n, block_table).to(dtype)  # (Hkv, n, D)
        v = gather_cache(v_cache, b, n, block_table).to(dtype)
        qb = q[b].to(dtype)  # (Hq, Nq, D)
        splits = num_splits or 1
        chunk = -(-n // splits)  # ceil(n / splits): the last chunks may be short or empty
        parts = [chunk_attention(qb, k, v, n, min(n, s * chunk), min(n, (s + 1) * chunk), causal, sm_scale)
                 for s in range(splits)]
        o, lse = merge_partials(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
        outputs.append(o)
        lses.append(lse)
    o, lse = torch.stack(outputs), torch.stack(lses)  # (B, Hq, Nq, D), (B, Hq, Nq)
    return (o, lse) if return_lse else o
