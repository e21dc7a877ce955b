"""Flash-decoding in Triton: a few new queries against a long KV cache, contiguous or paged.

What it computes
----------------
For each sequence b, with n_b = cache_seqlens[b] keys cached (the Nq new ones included),

    O[b] = softmax(Q[b] K[b, :n_b]^T * sm_scale) V[b, :n_b]

with Q (B, Hq, Nq, D), 1 <= Nq <= 16, and the cache either contiguous,
(B, Hkv, N_max, D), or paged: pools of (num_blocks, Hkv, block_size, D) with a
block_table (B, max_blocks) mapping logical block j of sequence b to a
physical block. Causal is bottom-right per sequence: query i sees key
j <= n_b - Nq + i. `reference/decode.py` is the same computation in plain
PyTorch, with the same names.

Why decoding is bound by memory
-------------------------------
One step reads every cached key and value once, 2 * n * D elements per kv
head, and does 4 * n * D FLOPs per query head with them: with one query per
head and bf16, 1 FLOP per byte (group FLOPs per byte under GQA). An H100
does about 300 FLOPs in the time it reads one byte from HBM, so the step's
time is the bytes of K and V read divided by the memory bandwidth, and a
decode kernel is judged in GB/s, not TFLOP/s.

The prefill kernel, `_attn_fwd`, is the wrong shape for that. It puts the
single query row in a 64- or 128-row tile (all rows but one are padding),
and it launches one program per (batch, query head): at B = 1, Hq = 32, 32
programs for 132 SMs, each reading its kv head's whole cache alone, and each
kv head read once per query head of its group. Three changes make the reads
count:

1. GQA packing. One program takes all Hq / Hkv query heads of a kv group
   and all Nq queries at once: rows = group * Nq (row r is query r % Nq of
   head r // Nq of the group), padded to at least 16 for tl.dot. Each K/V
   tile is then read once per group, not once per query head, and the tile
   is less padding: with group 4 and Nq 4 all 16 rows are real.
2. Split-KV. Each (sequence, kv head) cache is cut into num_splits chunks,
   one program each, so B * Hkv * num_splits programs share the GPU: enough
   to fill 132 SMs even at B = 1. A chunk is a multiple of BLOCK_N keys
   (cut per sequence: ceil(n_b / num_splits) rounded up to a tile), and each
   program leaves a partial output o_s, normalised over its chunk, and the
   log-sum-exp lse_s of its scores, in fp32.
3. The merge, a second small kernel. With o_s = sum_{j in s} exp(x_j - lse_s) v_j,
       lse = log sum_s exp(lse_s)        o = sum_s exp(lse_s - lse) o_s.
   It walks the splits with the online softmax of `_attn_fwd` (running max
   m_i, normaliser l_i, accumulator acc), the lse_s in the role of scores
   and the o_s in the role of values: the same algebra, one level up. With
   a single split (a large batch fills the GPU alone) the split kernel
   writes the output itself and the merge is not launched.

Paged caches
------------
vLLM stores the cache in fixed-size blocks, allocated as sequences grow,
and shares a prompt's blocks between sequences. Key n of sequence b lives in
block block_table[b, n // BLOCK_SIZE], row n % BLOCK_SIZE. The kernel looks
the block up per key row of a tile (BLOCK_N small int loads, cached), so a
tile may span blocks and block_size (any power of two from 16) and BLOCK_N
are independent. The pools are read through their strides: vLLM's
(num_blocks, block_size, Hkv, D) pool passes as a permuted view, no copy.
`append_kv`, which writes new rows into either layout, is plain PyTorch
indexing, shared with reference/decode.py.

Reading order: `_decode_split_kv` (one split of one kv group's keys), then
`_decode_merge`, then the launch choices (tile sizes, `choose_num_splits`),
`_decode_fwd` (checks done, buffers, grids) and `decode_attention`.
"""
import math

import torch
import triton
import triton.language as tl

from reference.decode import append_kv, check_decode_inputs, check_lengths

from . import runtime
from .configs import KERNELS as CONFIGS
from .runtime import INTERPRET, check_flag, check_runnable, dot_precision, upcast_tiles
from .tiles import LN2, LOG2E, MAX_HEAD_DIM, _head_dim_pad, _load_tile

__all__ = ["decode_attention", "append_kv", "choose_num_splits"]

MAX_QUERIES = 16  # Nq limit: speculative decoding and small chunks; a longer chunk is a prefill
DECODE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_BLOCK_SIZE = 16
MERGE_BLOCK_R = 32  # rows per merge program
MAX_SPLITS = 64
MIN_KEYS_PER_SPLIT = 256  # below this, a split's fixed costs (its Q tile, its partial) dominate its reads
# The interpreter has no SMs: it assumes an H100 SXM's 132, so the CPU picks the splits an H100 would.
INTERPRETER_SM_COUNT = 132
MERGE_WARPS = 4


@triton.jit
def _decode_split_kv(Q, K, V, SEQLENS, BLOCK_TABLE, O_PART, LSE_PART, qk_scale,
                     stride_qz, stride_qh, stride_qm, stride_qk,
                     stride_kz, stride_kh, stride_kn, stride_kk,
                     stride_vz, stride_vh, stride_vn, stride_vk,
                     stride_btz, stride_btn,
                     stride_ops, stride_opz, stride_oph, stride_opm, stride_opk, stride_lps,
                     H_KV, GROUP_SIZE, N_Q, NUM_SPLITS,
                     HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, PAGED: tl.constexpr, IS_CAUSAL: tl.constexpr,
                     UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program: one split of one (sequence, kv head)'s keys, for BLOCK_M packed rows of its query group.

    stride_kz/stride_vz step one sequence (contiguous) or one block of the pool (PAGED).
    Writes the split's normalised partial output and its natural-log lse (-inf where it saw no key)
    into O_PART[split] (B, Hq, Nq, D) and LSE_PART[split] (B, Hq, Nq, contiguous); with a single
    split they are the final o (any strides, any dtype) and lse, and no merge runs.
    """
    off_zh = tl.program_id(0)
    split = tl.program_id(1)
    start_m = tl.program_id(2) * BLOCK_M
    off_z = (off_zh // H_KV).to(tl.int64)
    off_kvh = (off_zh % H_KV).to(tl.int64)
    PAD_D: tl.constexpr = HEAD_DIM != HEAD_DIM_PAD
    num_group_rows = GROUP_SIZE * N_Q

    seqlen = tl.load(SEQLENS + off_z)
    # This split's keys [lo, hi): a whole number of tiles, cut per sequence so a short one is not
    # left with empty splits while a long one runs alone. Splits past the end get lo >= hi.
    chunk = (seqlen + NUM_SPLITS - 1) // NUM_SPLITS
    chunk = (chunk + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, seqlen)

    # Packed rows: row r is query r % N_Q of the group's query head r // N_Q.
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_i = offs_m % N_Q
    offs_h = off_kvh * GROUP_SIZE + offs_m // N_Q
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    q_ptrs = (Q + off_z * stride_qz + offs_h[:, None] * stride_qh + offs_i[:, None] * stride_qm
              + offs_d[None, :] * stride_qk)
    q = _load_tile(q_ptrs, offs_m, num_group_rows, offs_d, HEAD_DIM, True, PAD_D, UPCAST)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    if PAGED:
        k_base = K + off_kvh * stride_kh
        v_base = V + off_kvh * stride_vh
    else:
        k_base = K + off_z * stride_kz + off_kvh * stride_kh
        v_base = V + off_z * stride_vz + off_kvh * stride_vh
    bt_row = BLOCK_TABLE + off_z * stride_btz
    # The online softmax of `_attn_fwd_inner`. Every tile is masked: the step is bound by memory,
    # so the few integer ops per score cost nothing next to the K and V loads (the prefill
    # kernel, bound by compute, runs its full tiles without a mask instead).
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cur_n = start_n + offs_n
        in_seq = cur_n < seqlen
        if PAGED:
            # Key n lives in block block_table[b, n // BLOCK_SIZE], row n % BLOCK_SIZE. Rows past
            # the sequence's end look up nothing: their K and V loads are masked too.
            block = tl.load(bt_row + (cur_n // BLOCK_SIZE) * stride_btn, mask=in_seq, other=0).to(tl.int64)
            k_rows = block * stride_kz + (cur_n % BLOCK_SIZE) * stride_kn
            v_rows = block * stride_vz + (cur_n % BLOCK_SIZE) * stride_vn
        else:
            k_rows = cur_n.to(tl.int64) * stride_kn
            v_rows = cur_n.to(tl.int64) * stride_vn
        k = _load_tile(k_base + k_rows[:, None] + offs_d[None, :] * stride_kk, cur_n, seqlen, offs_d, HEAD_DIM,
                       True, PAD_D, UPCAST)
        # qk = (q @ k.T) * qk_scale, in base-2 units.            (BLOCK_M, BLOCK_N)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        visible = in_seq[None, :]
        if IS_CAUSAL:  # bottom-right, per sequence: query i sees keys j <= seqlen - N_Q + i
            visible = visible & (cur_n[None, :] <= offs_i[:, None] + (seqlen - N_Q))
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row that has seen no visible key keeps m = -inf: subtract 0 instead (no NaN).
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_new_safe[:, None])
        # alpha rescales what was accumulated under the old maximum m_i.
        alpha = tl.math.exp2(m_i - m_new_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base + v_rows[:, None] + offs_d[None, :] * stride_vk, cur_n, seqlen, offs_d, HEAD_DIM,
                       True, PAD_D, UPCAST)
        acc = tl.dot(p.to(v.dtype), v, acc=acc * alpha[:, None], input_precision=DOT_PRECISION, out_dtype=tl.float32)
        m_i = m_new

    # A row that saw no key of this split (an empty split, or keys all past its causal limit)
    # leaves o_s = 0 and lse_s = -inf: it weighs exp(-inf) = 0 in the merge.
    no_key = l_i == 0.0
    l_safe = tl.where(no_key, 1.0, l_i)
    lse = tl.where(no_key, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    # The group's rows are consecutive in the flattened (B, Hq, Nq) order: the first is (b, kvh * group, 0).
    rows = (off_z * H_KV + off_kvh) * num_group_rows + offs_m
    row_mask = offs_m < num_group_rows
    split = split.to(tl.int64)
    tl.store(LSE_PART + split * stride_lps + rows, lse, mask=row_mask)
    o_ptrs = (O_PART + split * stride_ops + off_z * stride_opz + offs_h[:, None] * stride_oph
              + offs_i[:, None] * stride_opm + offs_d[None, :] * stride_opk)
    tl.store(o_ptrs, (acc / l_safe[:, None]).to(O_PART.dtype.element_ty),
             mask=row_mask[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _decode_merge(O_PART, LSE_PART, O, LSE, stride_oz, stride_oh, stride_om, stride_ok, H_Q, N_Q, NUM_ROWS, NUM_SPLITS,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_R: tl.constexpr):
    """One program: BLOCK_R rows of the flattened (B, Hq, Nq) output, merged over the splits in fp32.

    The online softmax again: lse_s plays the score, o_s the value.
        m_new = max(m_i, lse_s); alpha = exp(m_i - m_new); w = exp(lse_s - m_new)
        l_i = alpha * l_i + w;   acc = alpha * acc + w * o_s
    and o = acc / l_i, lse = m_i + log(l_i). Maxima are kept in base 2 (exp2 is one instruction).
    """
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row_mask = offs_r < NUM_ROWS
    tile_mask = row_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM_PAD], dtype=tl.float32)
    for split in range(0, NUM_SPLITS):
        lse_s = tl.load(LSE_PART + split * NUM_ROWS + offs_r, mask=row_mask, other=float("-inf")) * LOG2E
        o_s = tl.load(O_PART + (split * NUM_ROWS + offs_r)[:, None] * HEAD_DIM + offs_d[None, :], mask=tile_mask,
                      other=0.0)
        m_new = tl.maximum(m_i, lse_s)
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_new_safe)
        w = tl.math.exp2(lse_s - m_new_safe)
        l_i = l_i * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o_s
        m_i = m_new
    no_key = l_i == 0.0
    l_safe = tl.where(no_key, 1.0, l_i)
    tl.store(LSE + offs_r, tl.where(no_key, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2), mask=row_mask)
    # Flattened row -> (b, h, i), so O may have any strides.
    off_z = offs_r // (H_Q * N_Q)
    off_h = offs_r // N_Q % H_Q
    off_i = offs_r % N_Q
    o_ptrs = (O + (off_z * stride_oz + off_h * stride_oh + off_i * stride_om)[:, None]
              + offs_d[None, :] * stride_ok)
    tl.store(o_ptrs, (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=tile_mask)


# ----------------------------------------------------------------------------
# Launch choices
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


def choose_num_splits(programs: int, max_seqlen: int, num_sms: int) -> int:
    """How many splits fill the GPU: FlashAttention's wave-efficiency rule.

    `programs` (sequences x kv heads x row blocks) run in waves of num_sms.
    For each candidate s, efficiency = waves / ceil(waves) with
    waves = programs * s / num_sms (a last, partly empty wave wastes SMs);
    the answer is the smallest s within 85% of the best. No more splits than
    leave MIN_KEYS_PER_SPLIT keys each, and never more than MAX_SPLITS.
    """
    limit = max(1, min(MAX_SPLITS, -(-max_seqlen // MIN_KEYS_PER_SPLIT)))
    if programs < 1:
        return 1
    efficiency = []
    for s in range(1, limit + 1):
        waves = programs * s / num_sms
        efficiency.append(waves / math.ceil(waves))
    best = max(efficiency)
    return next(s for s, e in enumerate(efficiency, 1) if e >= 0.85 * best)


def _stores_round_to_nearest(dtype: torch.dtype) -> bool:
    """The interpreter truncates fp32 -> bf16 (a GPU rounds to nearest): merge into fp32 there, cast in PyTorch."""
    return not (INTERPRET and dtype == torch.bfloat16)


# ----------------------------------------------------------------------------
# Launcher: check the contract, allocate, build the grids
# ----------------------------------------------------------------------------
def check_decode_kernel_inputs(q, k_cache, v_cache, cache_seqlens, block_table=None, sm_scale=None, num_splits=None):
    """Raise a clear error, naming the argument, for anything the kernels cannot take. Returns the lengths."""
    batch, h_kv, capacity, head_dim, block_size = check_decode_inputs(q, k_cache, v_cache, cache_seqlens, block_table)
    if q.shape[2] > MAX_QUERIES:
        raise ValueError(f"q has {q.shape[2]} query tokens (q.shape[2]); decode_attention takes 1 to {MAX_QUERIES}: "
                         "use flash_attention for a longer chunk")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim (q.shape[-1]) must be between 1 and {MAX_HEAD_DIM}, got {head_dim}")
    if block_size is not None and (block_size < MIN_BLOCK_SIZE or block_size & (block_size - 1)):
        raise ValueError(f"block_size (k_cache.shape[2] of a paged cache) must be a power of two >= {MIN_BLOCK_SIZE}, "
                         f"got {block_size}")
    if num_splits is not None and (not isinstance(num_splits, int) or isinstance(num_splits, bool) or num_splits < 1):
        raise ValueError(f"num_splits must be None or an int >= 1, got {num_splits!r}")
    if sm_scale is not None and not (isinstance(sm_scale, (int, float)) and math.isfinite(sm_scale)):
        raise TypeError(f"sm_scale must be a finite float or None, got {sm_scale!r}")
    if q.dtype not in DECODE_DTYPES:
        raise TypeError(f"q has dtype {q.dtype}; decode_attention supports float32, float16 and bfloat16")
    check_runnable(q, "q")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache)):
        raise ValueError("decode_attention has no backward pass, but q or the cache requires grad: "
                         "call it under torch.no_grad() (or torch.inference_mode())")
    # The data last: a block index out of the pool would make the kernel read out of bounds.
    return check_lengths(cache_seqlens, capacity, q.shape[2], block_table, k_cache.shape[0], block_size)


def _decode_fwd(q, k_cache, v_cache, cache_seqlens, block_table, causal, sm_scale, num_splits,
                o=None, lse=None, o_part=None, lse_part=None):
    """Run the split-KV kernel, then the merge. Returns o (B, Hq, Nq, D) in q's dtype and lse (B, Hq, Nq) fp32.

    o, lse and the fp32 partials o_part (num_splits, B, Hq, Nq, D), lse_part
    (num_splits, B, Hq, Nq) may be passed in (tests pass NaN-filled buffers).
    With one split there is nothing to merge: the kernel writes o and lse itself.
    """
    batch, h_q, n_q, head_dim = q.shape
    h_kv = k_cache.shape[1]
    group = h_q // h_kv
    num_rows = batch * h_q * n_q
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device) if o is None else o
    lse = torch.empty((batch, h_q, n_q), dtype=torch.float32, device=q.device) if lse is None else lse
    if num_rows == 0:
        return o, lse
    # The interpreter's fp32 -> bf16 store truncates: write fp32 there and let PyTorch round (below).
    out = o if _stores_round_to_nearest(q.dtype) else torch.empty(q.shape, dtype=torch.float32, device=q.device)
    if num_splits == 1:  # the one split's output is the result: (B, Hq, Nq, D) -> (1, B, Hq, Nq, D) views
        o_part, lse_part = out[None], lse[None]
    if o_part is None:
        o_part = torch.empty((num_splits, batch, h_q, n_q, head_dim), dtype=torch.float32, device=q.device)
    if lse_part is None:
        lse_part = torch.empty((num_splits, batch, h_q, n_q), dtype=torch.float32, device=q.device)
    paged = block_table is not None
    cache_seqlens = cache_seqlens.contiguous()  # the kernel reads it with unit stride
    head_dim_pad = _head_dim_pad(head_dim)
    rows = group * n_q  # packed query rows per (sequence, kv head)
    config = CONFIGS["decode"].choose(q.device, q.dtype, head_dim_pad, rows, None,
                                      (("PAGED", paged), ("IS_CAUSAL", causal)))
    CONFIGS["decode"].last_config = config
    # A contiguous cache needs no table: any tensor stands in for the pointer, never read.
    table = block_table if paged else cache_seqlens
    table_strides = block_table.stride() if paged else (0, 0)

    with runtime.on_device(q.device):
        _decode_split_kv[(batch * h_kv, num_splits, triton.cdiv(rows, config.kwargs["BLOCK_M"]))](
            q, k_cache, v_cache, cache_seqlens, table, o_part, lse_part, sm_scale * LOG2E.value,
            *q.stride(), *k_cache.stride(), *v_cache.stride(), *table_strides, *o_part.stride(), lse_part.stride(0),
            h_kv, group, n_q, num_splits,
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_SIZE=k_cache.shape[2] if paged else 1, PAGED=paged,
            IS_CAUSAL=causal, UPCAST=upcast_tiles(q.dtype), DOT_PRECISION=dot_precision(q.dtype),
            **config.all_kwargs(),
        )
        if num_splits > 1:
            _decode_merge[(triton.cdiv(num_rows, MERGE_BLOCK_R),)](
                o_part, lse_part, out, lse, *out.stride(), h_q, n_q, num_rows, num_splits,
                HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_R=MERGE_BLOCK_R, num_warps=MERGE_WARPS,
            )
    if out is not o:
        o.copy_(out)  # PyTorch's fp32 -> bf16 cast rounds to nearest, as the GPU's store does
    return o, lse


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------
def decode_attention(q, k_cache, v_cache, cache_seqlens, block_table=None, causal=True, sm_scale=None,
                     return_lse=False, num_splits=None):
    """Attention of a few new queries per sequence to each sequence's KV cache (flash-decoding). Inference only.

    q: (B, Hq, Nq, D), 1 <= Nq <= 16, Hq a multiple of Hkv, 1 <= D <= 256; fp32, fp16 or bf16.
    k_cache, v_cache: (B, Hkv, N_max, D), or with block_table (B, max_blocks) int32/int64,
    pools (num_blocks, Hkv, block_size, D) with block_size a power of two >= 16; any strides.
    cache_seqlens: (B,) int32/int64, the valid keys of each sequence, the Nq new ones included
    (write them first with `append_kv`). causal: query i of sequence b sees key j <= cache_seqlens[b] - Nq + i.
    sm_scale defaults to 1/sqrt(D). num_splits: the chunks per (sequence, kv head) cache; None picks
    them from the batch, the lengths and the GPU's SM count (`choose_num_splits`).
    Returns o (B, Hq, Nq, D) in q's dtype, and with return_lse=True also lse (B, Hq, Nq), natural log, fp32.
    The inputs are checked on the host first (lengths, block indices): one device-to-host sync per call.
    """
    lengths = check_decode_kernel_inputs(q, k_cache, v_cache, cache_seqlens, block_table, sm_scale, num_splits)
    causal, return_lse = check_flag(causal, "causal"), check_flag(return_lse, "return_lse")
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    if num_splits is None:
        batch, h_q, n_q = q.shape[:3]
        rows = h_q // k_cache.shape[1] * n_q
        block_m = CONFIGS["decode"].choose(q.device, q.dtype, _head_dim_pad(q.shape[-1]), rows, None,
                                           (("PAGED", block_table is not None), ("IS_CAUSAL", causal))).kwargs["BLOCK_M"]
        programs = batch * k_cache.shape[1] * triton.cdiv(rows, block_m)
        num_splits = choose_num_splits(programs, max(lengths, default=0), sm_count(q.device))
    o, lse = _decode_fwd(q, k_cache, v_cache, cache_seqlens, block_table, causal, sm_scale, num_splits)
    return (o, lse) if return_lse else o
