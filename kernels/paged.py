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

One kernel for every step
-------------------------
A program owns a tile of rows: BLOCK_Q new tokens of one sequence times
HEADS query heads of one kv group (GQA packing, as flash-decoding does), so
each K and V tile it reads serves every head of the group. One token of a
group of 8 fills 8 rows; a 512-token chunk of the same model fills 128-row
tiles of 16 tokens each. The programs of a packed batch are numbered without
reading the lengths on the host: sequence b's tiles start at

    tile_start[b] = cu_seqlens_q[b] // BLOCK_Q + b

which grows with b and leaves each sequence room for all its tiles, so the
grid, total_q // BLOCK_Q + B programs per kv head, depends on shapes only,
and each program finds its sequence by a binary search over tile_start.
Programs past their sequence's last tile return at once.

Few new tokens per sequence (decode, verification) leave the GPU idle: the
key range of each (sequence, kv head) is then cut into up to NUM_SPLITS
chunks, one program each (split-KV), and a second kernel merges the partial
outputs by their log-sum-exp. NUM_SPLITS is a maximum chosen from shapes and
the SM count; each sequence uses as many splits as its own length warrants,
computed in the kernel. Long chunks already fill the GPU with their tiles and
run unsplit, writing the output directly.

Within a program the key loop is the flash forward's: an online softmax over
key tiles, unmasked tiles in the middle of the visible band, masked ones at
its edges (tiles.py: _block_range). Keys are looked up through the block
table per row, so any page size works, from 1 (token-granular tables) up.

Bad input never reads out of bounds
-----------------------------------
The launcher reads shapes, never data: no host-device sync, so a decode loop
can be captured in a CUDA graph. Lengths past the cache, a leftpad past the
end, or a block-table entry outside the pool are found by the kernel: the
reads are clamped to the cache, and that sequence's rows come out NaN, so a
bad batch is never silently wrong. `validate=True` checks the data on the
host first and raises an error that names the argument.
"""
import math

import torch
import triton
import triton.language as tl

from reference.paged import check_paged_inputs, validate_paged_data

from . import runtime
from .block_mask import as_mask_mod, check_mod_args
from .configs import KERNELS as CONFIGS
from .flash_attention import _window_bounds, check_flash_options
from .runtime import check_flag, check_runnable, dot_precision, upcast_tiles
from .tiles import (LN2, LOG2E, UNLIMITED, _block_range, _cast_for_store, _head_dim_pad, _load_rows_where,
                    _scores)

__all__ = ["paged_attention", "decode_attention", "choose_num_splits"]

PAGED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_SPLIT_QUERIES = 16  # new tokens per sequence up to which split-KV pays: decode, verification
MAX_HEAD_DIM_QK, MAX_HEAD_DIM_V = 576, 512  # MLA's absorbed decode: 512 latent + 64 rotary dims, 512 values
MAX_SPLITS = 64
MIN_KEYS_PER_SPLIT = 256  # below this, a split's fixed costs (its Q tile, its partial) dominate its reads
MIN_KEYS: tl.constexpr = tl.constexpr(MIN_KEYS_PER_SPLIT)
MAX_SPLIT_Q: tl.constexpr = tl.constexpr(MAX_SPLIT_QUERIES)
MERGE_BLOCK_R = 32  # (token, head) rows per merge program
MERGE_WARPS = 4
# The interpreter has no SMs: it assumes an H100 SXM's 132, so the CPU picks the splits an H100 would.
INTERPRETER_SM_COUNT = 132


@triton.jit
def _find_sequence(CU_SEQLENS_Q, tile, BATCH, search_steps, BLOCK_Q: tl.constexpr):
    """The sequence b whose tiles hold `tile`: the last b with cu_seqlens_q[b] // BLOCK_Q + b <= tile."""
    lo = 0
    hi = BATCH - 1
    for _ in range(search_steps):
        mid = (lo + hi + 1) // 2
        start = tl.load(CU_SEQLENS_Q + mid) // BLOCK_Q + mid
        lo = tl.where(start <= tile, mid, lo)
        hi = tl.where(start <= tile, hi, mid - 1)
    return lo


@triton.jit
def _paged_visible(pos, k_idx, seq_start, seq_end, window_left, window_right,
                   MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_LEFTPAD: tl.constexpr):
    """Bool tile: key k_idx is one of the sequence's keys and in the band of the query at cache position pos."""
    visible = k_idx < seq_end
    if HAS_LEFTPAD:
        visible = visible & (k_idx >= seq_start)
    if MASK_RIGHT:
        visible = visible & (k_idx <= pos + window_right)
    if MASK_LEFT:
        visible = visible & (k_idx >= pos - window_left)
    return visible


@triton.jit
def _paged_inner(acc, l_i, m_i, bad, q, q_tail, k_base, v_base, bt_row, stride_btn, stride_kp, stride_kn, stride_kk,
                 stride_vp, stride_vn, stride_vk, K_SCALE, V_SCALE, stride_sp, stride_sn, pos, offs_n, offs_d, offs_dt,
                 offs_dv, lo, hi, seq_start, seq_end, num_pages, sm_scale, softcap, alibi_slope, window_left,
                 window_right, off_z, head, n_new, mask_args, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                 HEAD_DIM_TAIL: tl.constexpr,
                 HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr,
                 MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, MASKED: tl.constexpr, SHARED_KV: tl.constexpr,
                 KV_SCALES: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 MASK_MOD: tl.constexpr):
    """Walk key tiles [lo, hi) of one sequence, updating the online-softmax state of the tile's rows.

    bad collects block-table entries outside the pool: those keys are never read.
    A head dim past 256 is two tiles: the first HEAD_DIM_PAD columns (a power of two) and the
    HEAD_DIM_TAIL after them (MLA's 576 = 512 + 64), so nothing is padded to 1024.
    SHARED_KV: v is the first HEAD_DIM_V columns of k (MLA's latent cache): read once.
    KV_SCALES: an fp8 cache's dequantization, 1 per tensor or 2 per (token, kv head) (vLLM's two
    schemes): k's scale multiplies the scores, v's the probabilities, after the exact fp8 -> 16-bit cast.
    MASK_MOD(b, h, q_idx, kv_idx, mask_args): a user's mask (a speculative-decoding tree), with q_idx
    the new token's index (0 .. n_new - 1) and kv_idx the key's position relative to the first new
    token (negative: cached), so one mod serves sequences of any cached length.
    """
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cur_n = start_n + offs_n
        in_seq = cur_n < seq_end
        if HAS_LEFTPAD:  # pads are no keys: never read (their rows may hold anything, NaN included)
            in_seq = in_seq & (cur_n >= seq_start)
        if PAGED:
            # Key n lives in page block_table[b, n // PAGE_SIZE], row n % PAGE_SIZE.
            page = tl.load(bt_row + (cur_n // PAGE_SIZE) * stride_btn, mask=in_seq, other=0)
            in_pool = (page >= 0) & (page < num_pages)
            bad = bad | (tl.sum((in_seq & ~in_pool).to(tl.int32), 0) > 0)
            page = tl.where(in_pool, page, 0).to(tl.int64)
            k_rows = page * stride_kp + (cur_n % PAGE_SIZE) * stride_kn
            v_rows = page * stride_vp + (cur_n % PAGE_SIZE) * stride_vn
            scale_rows = page * stride_sp + (cur_n % PAGE_SIZE) * stride_sn
            readable = in_seq & in_pool
        else:
            k_rows = cur_n.to(tl.int64) * stride_kn
            v_rows = cur_n.to(tl.int64) * stride_vn
            scale_rows = cur_n.to(tl.int64) * stride_sn
            readable = in_seq
        k = _load_rows_where(k_base + k_rows[:, None] + offs_d[None, :] * stride_kk, readable, offs_d, HEAD_DIM,
                             False).to(q.dtype)
        # s = modified (q @ k.T) * sm_scale, in base-2 units.      (BLOCK_M, BLOCK_N)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if HEAD_DIM_TAIL > 0:
            k_tail = _load_rows_where(k_base + k_rows[:, None] + (HEAD_DIM_PAD + offs_dt[None, :]) * stride_kk,
                                      readable, HEAD_DIM_PAD + offs_dt, HEAD_DIM, False).to(q.dtype)
            qk = tl.dot(q_tail, tl.trans(k_tail), acc=qk, input_precision=DOT_PRECISION)
        if KV_SCALES == 2:
            qk = qk * tl.load(K_SCALE + scale_rows, mask=readable, other=0.0)[None, :]
        s, _, _ = _scores(qk, pos[:, None], cur_n[None, :], 0, sm_scale, softcap, alibi_slope[:, None], 0, 0, (),
                          0, 0, HAS_SOFTCAP, HAS_ALIBI, None)
        if MASKED:
            visible = _paged_visible(pos[:, None], cur_n[None, :], seq_start, seq_end, window_left, window_right,
                                     MASK_LEFT, MASK_RIGHT, HAS_LEFTPAD)
            if MASK_MOD is not None:
                first_new = seq_end - n_new
                visible = visible & MASK_MOD(off_z, head[:, None], pos[:, None] - first_new,
                                             cur_n[None, :] - first_new, mask_args)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key keeps m = -inf: subtract 0 instead (no NaN).
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_new_safe[:, None])
        # alpha rescales what was accumulated under the old maximum m_i.
        alpha = tl.math.exp2(m_i - m_new_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if SHARED_KV:
            v = k  # the latent's first HEAD_DIM_V (= HEAD_DIM_PAD) columns: already loaded
        else:
            v = _load_rows_where(v_base + v_rows[:, None] + offs_dv[None, :] * stride_vk, readable, offs_dv,
                                 HEAD_DIM_V, False).to(q.dtype)
        if KV_SCALES == 2:
            # p @ (v * scale per key) = (p * scale per key) @ v.
            p = p * tl.load(V_SCALE + scale_rows, mask=readable, other=0.0)[None, :]
        acc = tl.dot(p.to(v.dtype), v, acc=acc * alpha[:, None], input_precision=DOT_PRECISION, out_dtype=acc.dtype)
        m_i = m_new
    return acc, l_i, m_i, bad


@triton.jit
def _paged_attn_fwd(Q, K, V, O, LSE, O_PART, LSE_PART, CU_SEQLENS_Q, SEQUSED_K, LEFTPAD, BLOCK_TABLE, SINKS,
                    ALIBI_SLOPES, K_SCALE, V_SCALE, sm_scale, softcap, window_left, window_right,
                    stride_qz, stride_qh, stride_qm, stride_qk,
                    stride_kp, stride_kh, stride_kn, stride_kk,
                    stride_vp, stride_vh, stride_vn, stride_vk,
                    stride_oz, stride_oh, stride_om, stride_ok,
                    stride_lz, stride_lh, stride_lm, stride_btz, stride_btn, stride_az, stride_ah,
                    stride_sp, stride_sh, stride_sn,
                    BATCH, N_Q, H_Q, GROUP, HEAD_BLOCKS, CAPACITY, NUM_PAGES, NUM_SPLITS, TILES, SPLIT_TILES,
                    search_steps, mask_args,
                    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_TAIL: tl.constexpr,
                    HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    HEADS: tl.constexpr, PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr, IS_VARLEN: tl.constexpr,
                    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                    HAS_ALIBI: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
                    SPLIT: tl.constexpr, SHARED_KV: tl.constexpr, KV_SCALES: tl.constexpr, UPCAST: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, MASK_MOD: tl.constexpr = None):
    """One program: BLOCK_Q new tokens x HEADS query heads of one kv group, one split of their keys.

    N_Q: the dense layout's new tokens per sequence (unused when packed, IS_VARLEN).
    q and k have HEAD_DIM columns, read as HEAD_DIM_PAD (+ HEAD_DIM_TAIL) of them; v and o HEAD_DIM_V.
    K_SCALE, V_SCALE: an fp8 cache's scales, one each (KV_SCALES 1) or per (token, kv head) laid out
    like the cache's rows (KV_SCALES 2, strides stride_sp/h/n); unused otherwise.
    SPLIT (NUM_SPLITS > 1): the first TILES programs are the tiles above, doing split 0; after them
    come SPLIT_TILES * (NUM_SPLITS - 1) programs per sequence for splits 1.. of the tiles of
    sequences with at most MAX_SPLIT_Q new tokens (decode, verification: the others exit at once,
    their split 0 having done all their keys). A split sequence writes each split's normalised
    partial output and lse to slot (split, b, token, head) of O_PART (NUM_SPLITS, B, MAX_SPLIT_Q,
    Hq, HEAD_DIM_V) / LSE_PART for the merge; every other sequence writes O and LSE directly. So
    a mixed batch runs in one launch and a merge, and long chunks never split.
    """
    BLOCK_Q: tl.constexpr = BLOCK_M // HEADS
    pid = tl.program_id(0)
    off_kvh = (tl.program_id(1) // HEAD_BLOCKS).to(tl.int64)
    head_block = tl.program_id(1) % HEAD_BLOCKS
    split = 0
    if SPLIT and pid >= TILES:  # a split program: sequence, its tile, the split
        extra = pid - TILES
        off_z = extra // (SPLIT_TILES * (NUM_SPLITS - 1))
        local_tile = extra // (NUM_SPLITS - 1) % SPLIT_TILES
        split = 1 + extra % (NUM_SPLITS - 1)
        if IS_VARLEN:
            row0 = tl.load(CU_SEQLENS_Q + off_z)
            n_new = tl.load(CU_SEQLENS_Q + off_z + 1) - row0
        else:
            row0 = 0
            n_new = N_Q
        t0 = local_tile * BLOCK_Q
    elif IS_VARLEN:
        off_z = _find_sequence(CU_SEQLENS_Q, pid, BATCH, search_steps, BLOCK_Q)
        row0 = tl.load(CU_SEQLENS_Q + off_z)
        n_new = tl.load(CU_SEQLENS_Q + off_z + 1) - row0
        t0 = (pid - (row0 // BLOCK_Q + off_z)) * BLOCK_Q
    else:
        tiles_per_seq = tl.cdiv(N_Q, BLOCK_Q)
        off_z = pid // tiles_per_seq
        n_new = N_Q
        t0 = (pid % tiles_per_seq) * BLOCK_Q
        row0 = 0
    # This sequence splits its keys (few new tokens, splits asked for), or one program does them all.
    seq_split = SPLIT and n_new <= MAX_SPLIT_Q
    if t0 >= n_new or (split > 0 and not seq_split):
        return
    off_z = off_z.to(tl.int64)
    row0 = tl.full([], 0, tl.int64) + row0  # the first new token's row in q and o, 64-bit

    # The sequence's keys: [seq_start, seq_end) of its cache, clamped to the cache; a bad entry
    # turns its rows to NaN at the end instead of reading out of bounds.
    seq_end = tl.load(SEQUSED_K + off_z)
    bad = (seq_end < 0) | (seq_end > CAPACITY)
    seq_end = tl.minimum(tl.maximum(seq_end, 0), CAPACITY)
    seq_start = 0
    if HAS_LEFTPAD:
        seq_start = tl.load(LEFTPAD + off_z)
        bad = bad | (seq_start < 0) | (seq_start > seq_end)
        seq_start = tl.minimum(tl.maximum(seq_start, 0), seq_end)

    # Rows: token t0 + r // HEADS of the sequence's new ones, query head head_block * HEADS + r % HEADS of the group.
    rows = tl.arange(0, BLOCK_M)
    tok = t0 + rows // HEADS
    group_head = head_block * HEADS + rows % HEADS
    row_ok = (rows < BLOCK_Q * HEADS) & (tok < n_new) & (group_head < GROUP)
    head = off_kvh * GROUP + group_head
    pos = seq_end - n_new + tok  # each new token's position in the cache: its causal diagonal
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_dt = tl.arange(0, HEAD_DIM_TAIL if HEAD_DIM_TAIL > 0 else 16)  # MLA's rotary part
    offs_dv = tl.arange(0, HEAD_DIM_V_PAD)
    # 64-bit tile starts, 32-bit offsets within the tile.
    q_base = Q + off_z * stride_qz + (row0 + t0) * stride_qm + off_kvh * GROUP * stride_qh
    q_rows = q_base + ((rows // HEADS) * stride_qm + group_head * stride_qh)[:, None]
    q = _load_rows_where(q_rows + offs_d[None, :] * stride_qk, row_ok, offs_d, HEAD_DIM, UPCAST)
    q_tail = q
    if HEAD_DIM_TAIL > 0:
        q_tail = _load_rows_where(q_rows + (HEAD_DIM_PAD + offs_dt[None, :]) * stride_qk, row_ok,
                                  HEAD_DIM_PAD + offs_dt, HEAD_DIM, UPCAST)
    scale_base = 0  # where this kv head's (and, contiguous, this sequence's) scales start
    if KV_SCALES == 1:  # one scale per tensor: into the score scale now, into the output at the end
        sm_scale = sm_scale * tl.load(K_SCALE)
    elif KV_SCALES == 2:
        scale_base = off_kvh * stride_sh
        if not PAGED:
            scale_base += off_z * stride_sp

    alibi_slope = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_ALIBI:
        alibi_slope = tl.load(ALIBI_SLOPES + off_z * stride_az + head * stride_ah, mask=row_ok, other=0.0)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_SINKS:
        # The sink is one more logit in every row with no value: exp2(sink - m_i) = 1 to start.
        # (A split sequence's merge adds it once instead.)
        sink = tl.load(SINKS + head, mask=row_ok, other=0.0).to(tl.float32) * LOG2E
        if SPLIT:
            m_i = tl.where(seq_split, m_i, sink)
            l_i = tl.where(seq_split, l_i, 1.0)
        else:
            m_i = sink
            l_i = l_i + 1.0

    # The keys some row of the tile sees, and those every row sees (tiles.py: _block_range).
    MASK_RIGHT: tl.constexpr = IS_CAUSAL or HAS_WINDOW
    first_pos = seq_end - n_new + t0
    last_pos = seq_end - n_new + tl.minimum(t0 + BLOCK_Q, n_new) - 1
    first_seen = seq_start
    first_full = seq_start
    if HAS_WINDOW:
        first_seen = tl.maximum(seq_start, first_pos - window_left)
        first_full = tl.maximum(seq_start, last_pos - window_left)
    last_seen = seq_end - 1
    last_full = seq_end - 1
    if MASK_RIGHT:
        last_seen = tl.minimum(last_seen, last_pos + window_right)
        last_full = tl.minimum(last_full, first_pos + window_right)
    lo, full_lo, full_hi, hi = _block_range(BLOCK_N, first_seen, last_seen, first_full, last_full, seq_end,
                                            (seq_end // BLOCK_N) * BLOCK_N)
    if seq_split:
        # This split's share of [lo, hi): whole tiles, as many splits as this sequence's keys warrant.
        splits = tl.minimum(tl.maximum(tl.cdiv(hi - lo, MIN_KEYS), 1), NUM_SPLITS)
        chunk = tl.cdiv(tl.cdiv(hi - lo, splits), BLOCK_N) * BLOCK_N
        lo = tl.minimum(lo + split * chunk, hi)
        hi = tl.minimum(lo + chunk, hi)
        full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
        full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)

    k_base = K + off_kvh * stride_kh
    v_base = V + off_kvh * stride_vh
    if not PAGED:
        k_base += off_z * stride_kp
        v_base += off_z * stride_vp
    bt_row = BLOCK_TABLE + off_z * stride_btz
    # Masked left edge, unmasked middle, masked right edge (the diagonal, the window, the ragged end).
    for stage in tl.static_range(3):
        if stage == 0:
            stage_lo, stage_hi = lo, full_lo
        elif stage == 1:
            stage_lo, stage_hi = full_lo, full_hi
        else:
            stage_lo, stage_hi = full_hi, hi
        acc, l_i, m_i, bad = _paged_inner(acc, l_i, m_i, bad, q, q_tail, k_base, v_base, bt_row, stride_btn,
                                          stride_kp, stride_kn, stride_kk, stride_vp, stride_vn, stride_vk,
                                          K_SCALE + scale_base, V_SCALE + scale_base, stride_sp, stride_sn, pos,
                                          offs_n, offs_d, offs_dt, offs_dv, stage_lo, stage_hi, seq_start, seq_end,
                                          NUM_PAGES, sm_scale, softcap, alibi_slope, window_left, window_right,
                                          off_z, head, n_new, mask_args, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_TAIL,
                                          HEAD_DIM_V, BLOCK_N, PAGE_SIZE, PAGED, HAS_WINDOW, MASK_RIGHT, HAS_LEFTPAD,
                                          HAS_SOFTCAP, HAS_ALIBI, stage != 1 or MASK_MOD is not None, SHARED_KV,
                                          KV_SCALES, UPCAST, DOT_PRECISION, MASK_MOD)
    if KV_SCALES == 1:
        acc = acc * tl.load(V_SCALE)

    # A row that saw no key (and has no sink) has l_i = 0: o = 0, lse = -inf, never NaN, unless the input was bad.
    no_key = l_i == 0.0
    l_safe = tl.where(no_key, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(no_key, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    o = tl.where(bad, float("nan"), o)
    lse = tl.where(bad, float("nan"), lse)
    d_ok = offs_dv[None, :] < HEAD_DIM_V
    if seq_split:
        slot = ((split * BATCH + off_z) * MAX_SPLIT_Q + tok) * H_Q + head  # (split, b, token, head)
        tl.store(LSE_PART + slot, lse, mask=row_ok)
        tl.store(O_PART + slot[:, None] * HEAD_DIM_V + offs_dv[None, :], o, mask=row_ok[:, None] & d_ok)
    else:
        tl.store(LSE + off_z * stride_lz + head * stride_lh + (row0 + tok) * stride_lm, lse, mask=row_ok)
        o_ptrs = (O + off_z * stride_oz + (row0 + t0) * stride_om
                  + ((rows // HEADS) * stride_om + head * stride_oh)[:, None] + offs_dv[None, :] * stride_ok)
        tl.store(o_ptrs, _cast_for_store(o, O.dtype.element_ty, UPCAST), mask=row_ok[:, None] & d_ok)



@triton.jit
def _paged_merge(O_PART, LSE_PART, O, LSE, SINKS, CU_SEQLENS_Q, stride_oz, stride_oh, stride_om, stride_ok,
                 stride_lz, stride_lh, stride_lm, BATCH, H_Q, N_Q, NUM_SPLITS,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
                 IS_VARLEN: tl.constexpr, HAS_SINKS: tl.constexpr, UPCAST: tl.constexpr):
    """One program: BLOCK_R partial slots (b, token, head) of the split sequences, merged over the splits in fp32.

    The online softmax again, one level up: lse_s plays the score, o_s the value.
        m_new = max(m_i, lse_s); alpha = exp(m_i - m_new); w = exp(lse_s - m_new)
        l_i = alpha * l_i + w;   acc = alpha * acc + w * o_s
    and o = acc / l_i, lse = m_i + log(l_i). A sink starts each row as one more split with no
    value (m_i = sink, l_i = 1). Slot r is (b, token, head) = (r // (MAX_SPLIT_Q * Hq),
    r // Hq % MAX_SPLIT_Q, r % Hq); only sequences with at most MAX_SPLIT_Q new tokens were split:
    the others' slots, and tokens past a sequence's count, are skipped.
    """
    num_slots = BATCH * MAX_SPLIT_Q * H_Q
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    off_z = offs_r // (MAX_SPLIT_Q * H_Q)
    tok = offs_r // H_Q % MAX_SPLIT_Q
    head = offs_r % H_Q
    in_batch = offs_r < num_slots
    if IS_VARLEN:
        row0 = tl.load(CU_SEQLENS_Q + off_z, mask=in_batch, other=0)
        n_new = tl.load(CU_SEQLENS_Q + off_z + 1, mask=in_batch, other=0) - row0
    else:
        row0 = 0
        n_new = N_Q + 0 * off_z
    row_mask = in_batch & (n_new <= MAX_SPLIT_Q) & (tok < n_new)
    tile_mask = row_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    if HAS_SINKS:
        m_i = tl.load(SINKS + head, mask=row_mask, other=0.0).to(tl.float32) * LOG2E
        l_i = tl.zeros([BLOCK_R], dtype=tl.float32) + 1.0
    else:
        m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM_PAD], dtype=tl.float32)
    for split in range(0, NUM_SPLITS):
        slot = split * num_slots + offs_r
        lse_s = tl.load(LSE_PART + slot, mask=row_mask, other=float("-inf")) * LOG2E
        o_s = tl.load(O_PART + slot[:, None] * HEAD_DIM + offs_d[None, :], mask=tile_mask, other=0.0)
        m_new = tl.maximum(m_i, lse_s)
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_new_safe)
        w = tl.math.exp2(lse_s - m_new_safe)
        l_i = l_i * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o_s
        m_i = m_new
    no_key = l_i == 0.0
    l_safe = tl.where(no_key, 1.0, l_i)
    row = row0 + tok  # the token's row in o: packed (stride_oz = 0), or the b-th entry's
    tl.store(LSE + off_z * stride_lz + head * stride_lh + row * stride_lm,
             tl.where(no_key, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2), mask=row_mask)
    o_ptrs = O + (off_z * stride_oz + head * stride_oh + row * stride_om)[:, None] + offs_d[None, :] * stride_ok
    tl.store(o_ptrs, _cast_for_store(acc / l_safe[:, None], O.dtype.element_ty, UPCAST), mask=tile_mask)


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
                 "merge_constexprs", "config", "device", "empty")


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
    plan.constexprs = dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, HEAD_DIM_TAIL=head_dim_tail,
                           HEAD_DIM_V=head_dim_v, HEAD_DIM_V_PAD=head_dim_v_pad, HEADS=heads,
                           PAGE_SIZE=k_cache.shape[2] if paged else 1, **flags, SPLIT=split,
                           SHARED_KV=shares_storage(k_cache, v_cache), KV_SCALES=kv_scales,
                           UPCAST=upcast_tiles(q.dtype), DOT_PRECISION=dot_precision(q.dtype), MASK_MOD=None,
                           **config.all_kwargs())
    if split:
        plan.merge_grid = (-(-(batch * MAX_SPLIT_QUERIES * h_q) // MERGE_BLOCK_R),)
        plan.merge_scalars = (*o_strides, *lse_strides, batch, h_q, n_q, num_splits)
        plan.merge_constexprs = dict(HEAD_DIM=head_dim_v, HEAD_DIM_PAD=head_dim_v_pad, BLOCK_R=MERGE_BLOCK_R,
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
