"""FlashAttention-2 forward in Triton: one program per (query block, batch * head).

What it computes
----------------
    O = softmax(Q K^T * sm_scale) V        per (batch, query head)
with Q: (B, Hq, Nq, D) and K, V: (B, Hkv, Nk, D), Hq a multiple of Hkv. Query
head h reads kv head h // (Hq / Hkv): grouped-query attention (GQA), and
multi-query attention (MQA) when Hkv == 1, with K and V never copied. Causal
masking is aligned bottom-right: query i sees key j when j <= i + (Nk - Nq).

Why it is fast: N x N never touches memory
------------------------------------------
Naive attention writes the (Nq, Nk) score matrix S and the probabilities P to
memory and reads them back: O(N^2) bytes per head, which at N = 16k and fp16 is
512 MiB per head, and makes attention bound by memory bandwidth. This kernel
keeps one (BLOCK_M, BLOCK_N) tile of S in registers at a time. Each program
owns BLOCK_M query rows; it reads its Q tile once, streams the K and V tiles
through, and writes its O tile once. Bytes moved are Q, K, V and O (plus one
float per row for the log-sum-exp): O(N * D) per head. The arithmetic is the
same 4 * Nq * Nk * D FLOPs as naive attention; only the traffic shrinks.

The online softmax, and why the rescaling is exact
--------------------------------------------------
A row's softmax needs the row's maximum and sum before anything can be
normalised, but the kernel sees the row one key block at a time. Keep, per
query row, a running maximum m_i, a running normaliser l_i = sum exp(s - m_i)
and an unnormalised output acc = sum exp(s - m_i) v over the blocks seen so
far. When a new block with scores s_j arrives and raises the maximum to
m_new = max(m_i, max_j s_j), every term accumulated so far carries a factor
exp(-m_i) that should now be exp(-m_new); multiplying by

    alpha = exp(m_i - m_new)

fixes all of them at once, because exp(s - m_i) * exp(m_i - m_new) = exp(s - m_new):

    l_i = alpha * l_i + sum_j exp(s_j - m_new)
    acc = alpha * acc + sum_j exp(s_j - m_new) v_j

After the last block, acc / l_i is exactly softmax(s) @ V: nothing was
approximated, only reordered. The kernel saves lse = m_i + log(l_i) per row,
all the backward pass needs to recompute P = exp(S - lse) tile by tile.

exp2 instead of exp: exp2 is one instruction on the GPU. With LOG2E = 1/ln 2,
exp(x * sm_scale) = exp2(x * sm_scale * LOG2E), so the kernel scales each
score tile by sm_scale * LOG2E (the qk_scale of reference/tiled.py; tiles.py's
_scores) and keeps m_i in base-2 units.

Variants as compile-time switches
---------------------------------
Soft-capping, ALiBi, causal and sliding-window masks modify the score tile
(kernels/tiles.py: _scores, _visible), and the key loop visits only the key
blocks that some row of the query block can see (_key_range): a window makes
the cost grow as N * W, not N^2. Sinks start each row's softmax with one
extra logit (m_i = sink, l_i = 1) that has no value. Dropout zeroes
probabilities after they joined the normaliser, from a counter-based random
mask the backward pass regenerates. Packed sequences (IS_VARLEN) read each
sequence's start and length from cu_seqlens; nothing else changes.

Two Hopper options change how tiles arrive, not what is computed, and the
config chooser may pick them on Hopper (kernels/configs.py). USE_TMA reads Q, K and V
through tensor descriptors: the TMA engine copies whole tiles into shared
memory, zero-filling past each sequence's end as the masked loads do.
WARP_SPECIALIZE (with USE_TMA, for non-causal calls) lets the compiler split
the key loop between a producer of copies and consumers of tiles.

Reading guide: `reference/tiled.py` is this forward pass in plain PyTorch,
with the same names (m_i, l_i, acc, start_m, start_n), and
`reference.naive_attention` spells out every variant on the full score matrix.
The launcher, `_flash_fwd` in `kernels/flash_attention.py`, checks the inputs
and builds the grid.
"""
import triton
import triton.language as tl

from .tiles import (LN2, LOG2E, _cast_for_store, _dropout_keep, _key_range, _listed_block_start, _load_rows,
                    _mask_mod_visible, _round_to_fp8, _row_descriptor, _scores, _sequence_bounds, _stage_range,
                    _visible)


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_vn, offs_m, offs_n, offs_d, offs_dv, lo, hi,
                    N_Q, N_K, offset, sm_scale, softcap, alibi_slope, window_left, window_right,
                    seed, stream, dropout_row0, dropout_p, off_z, off_h, score_args, mask_args, KV_LIST,
                    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
                    BLOCK_N: tl.constexpr,
                    MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                    HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, MASKED: tl.constexpr,
                    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
                    WARP_SPECIALIZE: tl.constexpr, SCORE_MOD: tl.constexpr, MASK_MOD: tl.constexpr,
                    SPARSE_BLOCK_N: tl.constexpr, ROUND_P: tl.constexpr):
    """Walk key blocks, updating the online-softmax state (the inner loop of reference/tiled.py).

    The blocks are [lo, hi) in steps of BLOCK_N, or with a block mask (SPARSE_BLOCK_N, its
    block size, > 0) the sub-tiles lo..hi-1 of the mask blocks listed after the count at KV_LIST:
    sub-tile i is BLOCK_N keys of mask block KV_LIST[1 + i // (SPARSE_BLOCK_N // BLOCK_N)].
    k_src and v_src are tensor descriptors (USE_TMA) or pointer tiles of the first key block: see _load_rows.
    MASKED applies the element mask (the band, the sequence's end, and the user's MASK_MOD).
    ROUND_P: round p to v's fp8 by hand (the interpreter's cast rounds wrongly: tiles.py, _round_to_fp8).
    """
    if SPARSE_BLOCK_N > 0:
        STEP: tl.constexpr = 1
    else:
        STEP: tl.constexpr = BLOCK_N
    # warp_specialize (Hopper, with descriptor loads): the compiler gives the TMA
    # copies to a producer warp group and the math to two consumer warp groups,
    # so loads and math overlap without waiting on each other.
    for it in tl.range(lo, hi, STEP, warp_specialize=WARP_SPECIALIZE):
        start_n = _listed_block_start(it, KV_LIST, SPARSE_BLOCK_N, BLOCK_N)
        cur_n = start_n + offs_n
        k = _load_rows(k_src, start_n, stride_kn, cur_n, N_K, offs_d, HEAD_DIM, MASKED, PAD_D, UPCAST, USE_TMA)
        # s = modified (q @ k.T) * sm_scale, in base-2 units.      (BLOCK_M, BLOCK_N)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s, _, _ = _scores(qk, offs_m[:, None], cur_n[None, :], offset, sm_scale, softcap, alibi_slope, off_z, off_h,
                          score_args, N_Q, N_K, HAS_SOFTCAP, HAS_ALIBI, SCORE_MOD)
        if MASKED:
            visible = _visible(offs_m[:, None], cur_n[None, :], N_K, offset, window_left, window_right,
                               MASK_LEFT, MASK_RIGHT)
            visible = _mask_mod_visible(visible, offs_m[:, None], cur_n[None, :], off_z, off_h, mask_args, N_Q, N_K,
                                        MASK_MOD)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED or SCORE_MOD is not None:
            # A row that has seen no visible key keeps m = -inf (a score_mod may give -inf too);
            # subtracting 0 instead keeps exp2(-inf - -inf) = NaN out of p and alpha.
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new_safe = m_new  # every score here is finite, so m_new is too
        p = tl.math.exp2(s - m_new_safe[:, None])
        # alpha rescales what was accumulated under the old maximum m_i.
        alpha = tl.math.exp2(m_i - m_new_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            # Dropped after joining the normaliser: dropout acts on the probabilities.
            keep = _dropout_keep(seed, stream, offs_m[:, None] + dropout_row0, cur_n[None, :], dropout_p)
            p = tl.where(keep, p, 0.0)
        v = _load_rows(v_src, start_n, stride_vn, cur_n, N_K, offs_dv, HEAD_DIM_V, MASKED, PAD_DV, UPCAST, USE_TMA)
        # acc = acc * alpha + p @ v, with p rounded to v's dtype for the tensor cores (for fp8 v,
        # to e4m3/e5m2: p <= 1 under the running max, so it needs no scale of its own).
        if ROUND_P:
            p_low = _round_to_fp8(p, v.dtype)
        else:
            p_low = p.to(v.dtype)
        acc = tl.dot(p_low, v, acc=acc * alpha[:, None], input_precision=DOT_PRECISION, out_dtype=acc.dtype)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, CU_SEQLENS_Q, CU_SEQLENS_K, SINKS, ALIBI_SLOPES, SEED, BLOCK_MASK, DESCALE,
              sm_scale, softcap, dropout_p, window_left, window_right,
              stride_qz, stride_qh, stride_qm, stride_qk,
              stride_kz, stride_kh, stride_kn, stride_kk,
              stride_vz, stride_vh, stride_vn, stride_vk,
              stride_oz, stride_oh, stride_om, stride_ok,
              stride_lz, stride_lh, stride_az, stride_ah,
              stride_bmk, stride_bmz, stride_bmh, stride_bmr, stride_dsk, stride_dsz, stride_dsh,
              H_Q, GROUP_SIZE, N_Q, N_K, score_args, mask_args,
              HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr,
              HEAD_DIM_V_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
              HAS_ALIBI: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
              IS_VARLEN: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
              ACC_DTYPE: tl.constexpr, SCORE_MOD: tl.constexpr = None, MASK_MOD: tl.constexpr = None,
              MASK_BLOCK_M: tl.constexpr = 0, MASK_BLOCK_N: tl.constexpr = 0, HAS_DESCALE: tl.constexpr = False,
              ROUND_BY_HAND: tl.constexpr = False, USE_TMA: tl.constexpr = False,
              WARP_SPECIALIZE: tl.constexpr = False):
    """One program: BLOCK_M query rows of one (batch, query head). Writes O and the natural-log LSE.

    N_Q and N_K are the lengths, or for packed sequences (IS_VARLEN) the longest ones.
    SCORE_MOD and MASK_MOD are a user's @triton.jit functions (or None), reading the
    tuples score_args and mask_args. A block mask (MASK_BLOCK_M, MASK_BLOCK_N > 0) lists,
    per query block of MASK_BLOCK_M rows, the key blocks partly visible (MASK_MOD applied)
    and wholly visible (no mask): BLOCK_MASK[kind, z, h, row] = count, then block indices
    (kernels/block_mask.py); no other key block is loaded.
    fp8 (HAS_DESCALE): q, k and v are e4m3/e5m2 and DESCALE[kind, z, kv head] holds their
    dequantization factors (kind 0, 1, 2: q, k, v, FlashAttention-3's descales): q.k is taken in
    fp8 and scaled by q's and k's, P is rounded to v's fp8 for the P.V product (as FA3 and the
    Triton tutorial do), and v's scales the output. ROUND_BY_HAND: under the interpreter, whose
    own casts round wrongly, round P to fp8 and a bf16 output to nearest by hand (tiles.py).
    USE_TMA and WARP_SPECIALIZE are Hopper options of the launch configs
    (kernels/configs.py): Q, K and V through tensor descriptors, and the key loop
    split into producer and consumer warps.
    """
    # A 1-D grid: consecutive programs take consecutive query blocks of one
    # (batch, head), so the programs running together share its K and V in L2,
    # and batch * heads is not capped at 65535 as a second grid axis would be.
    num_m_blocks = tl.cdiv(N_Q, BLOCK_M)
    pid = tl.program_id(0)
    off_zh = pid // num_m_blocks
    block_m = pid % num_m_blocks
    if IS_CAUSAL:
        # Later query blocks see more keys: start them first, so the last wave is short.
        block_m = num_m_blocks - 1 - block_m
    start_m = block_m * BLOCK_M
    off_z = (off_zh // H_Q).to(tl.int64)  # int64: batch * stride can pass 2**31 on big inputs
    off_h = (off_zh % H_Q).to(tl.int64)
    off_kvh = off_h // GROUP_SIZE  # GQA: the kv head this query head shares; K and V are not copied
    q_start, k_start, seqlen_q, seqlen_k = _sequence_bounds(CU_SEQLENS_Q, CU_SEQLENS_K, off_z, N_Q, N_K, IS_VARLEN)
    stream = off_zh  # dropout counters: (batch, head) and the row in the sequence
    if IS_VARLEN:
        if start_m >= seqlen_q:  # this sequence is shorter than the longest
            return
        stream = off_h  # packed rows are global token indices: the head alone
    PAD_D: tl.constexpr = HEAD_DIM != HEAD_DIM_PAD
    PAD_DV: tl.constexpr = HEAD_DIM_V != HEAD_DIM_V_PAD
    MASK_RIGHT: tl.constexpr = IS_CAUSAL or HAS_WINDOW  # causal is the band with right = 0
    offset = seqlen_k - seqlen_q  # bottom-right alignment: query i's diagonal is key i + offset

    rows = tl.arange(0, BLOCK_M)
    offs_m = start_m + rows
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)  # q and k's head dim
    offs_dv = tl.arange(0, HEAD_DIM_V_PAD)  # v and o's (MLA's prefill: 192 and 128)
    # This sequence's (rows, HEAD_DIM) matrices of Q, K and V. Offsets from a
    # block's first row are 32-bit tiles; where the block starts is a 64-bit
    # scalar, so a long sequence times a large stride cannot overflow.
    q_row0 = q_start + start_m.to(tl.int64)
    q_base = Q + off_z * stride_qz + off_h * stride_qh + q_start * stride_qm
    k_base = K + off_z * stride_kz + off_kvh * stride_kh + k_start * stride_kn
    v_base = V + off_z * stride_vz + off_kvh * stride_vh + k_start * stride_vn
    if USE_TMA:
        # Descriptors bounded by this sequence's own lengths: TMA zero-fills past
        # them, so a packed sequence never reads its neighbour's rows.
        q_src = _row_descriptor(q_base, seqlen_q, stride_qm, HEAD_DIM, BLOCK_M, HEAD_DIM_PAD)
        k_src = _row_descriptor(k_base, seqlen_k, stride_kn, HEAD_DIM, BLOCK_N, HEAD_DIM_PAD)
        v_src = _row_descriptor(v_base, seqlen_k, stride_vn, HEAD_DIM_V, BLOCK_N, HEAD_DIM_V_PAD)
    else:
        q_src = q_base + rows[:, None] * stride_qm + offs_d[None, :] * stride_qk
        k_src = k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kk
        v_src = v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vk

    alibi_slope = 0.0
    if HAS_ALIBI:
        alibi_slope = tl.load(ALIBI_SLOPES + off_z * stride_az + off_h * stride_ah)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    descale = DESCALE + off_z * stride_dsz + off_kvh * stride_dsh
    if HAS_DESCALE:  # the scores of fp8 q and k: q.k * q_descale * k_descale * sm_scale
        sm_scale = sm_scale * tl.load(descale) * tl.load(descale + stride_dsk)

    # The Q tile is read once and stays in registers for the whole key loop.
    q = _load_rows(q_src, start_m, stride_qm, offs_m, seqlen_q, offs_d, HEAD_DIM, True, PAD_D, UPCAST, USE_TMA)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V_PAD], dtype=ACC_DTYPE)  # unnormalised output
    if HAS_SINKS:
        # The sink is one more logit in every row with no value: exp2(sink - m_i) = 1 to start.
        m_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE) + tl.load(SINKS + off_h) * LOG2E  # running max, base 2
        l_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE) + 1.0  # running normaliser
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)
        l_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)

    if MASK_BLOCK_N > 0:
        # A block mask lists, for this query block, its partly visible key blocks (masked, MASK_MOD
        # applied) and its wholly visible ones (no mask at all, and in bounds: a block past a
        # sequence's end is never listed full); no other key block is loaded.
        mask_row = BLOCK_MASK + off_z * stride_bmz + off_h * stride_bmh + (start_m // MASK_BLOCK_M) * stride_bmr
        FIRST_STAGE: tl.constexpr = 0
        NUM_STAGES: tl.constexpr = 2
    else:
        lo, full_lo, full_hi, hi = _key_range(start_m, seqlen_q, seqlen_k, window_left, window_right,
                                              BLOCK_M, BLOCK_N, HAS_WINDOW, MASK_RIGHT)
        # Hopper's warp specialization (Triton 3.6) rebuilds the kernel around a single
        # loop: with a second loop the kernel fails to compile. So stage 2 alone walks
        # every key block, each masked (for the non-causal calls without a window that
        # the chooser gives it, the mask is keys >= N_K).
        FIRST_STAGE: tl.constexpr = 2 if WARP_SPECIALIZE else 0
        NUM_STAGES: tl.constexpr = 3
        if WARP_SPECIALIZE:
            full_hi = lo
    for stage in tl.static_range(FIRST_STAGE, NUM_STAGES):
        if MASK_BLOCK_N > 0:
            # Stage 0: the partly visible key blocks; stage 1: the wholly visible ones.
            kv_list = mask_row + stage * stride_bmk
            stage_lo, stage_hi = 0, tl.load(kv_list) * (MASK_BLOCK_N // BLOCK_N)
            MASKED = stage == 0
        else:
            # Stage 0: key blocks on the window's left edge, masked element by element (none without
            # a window); stage 1: key blocks wholly visible to every row, with no mask at all (unless
            # a mask_mod may hide any key); stage 2: the diagonal (or the window's right edge) and the
            # ragged last block, masked.
            kv_list = BLOCK_MASK
            stage_lo, stage_hi = _stage_range(stage, lo, full_lo, full_hi, hi)
            MASKED = stage != 1 or MASK_MOD is not None
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_src, v_src, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                                        offs_dv, stage_lo, stage_hi, seqlen_q, seqlen_k, offset, sm_scale, softcap,
                                        alibi_slope,
                                        window_left, window_right, seed, stream, q_start, dropout_p, off_z, off_h,
                                        score_args, mask_args, kv_list, HEAD_DIM, HEAD_DIM_V, PAD_D, PAD_DV, BLOCK_N,
                                        HAS_WINDOW and MASK_BLOCK_N == 0, MASK_RIGHT and MASK_BLOCK_N == 0,
                                        HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, MASKED, UPCAST, DOT_PRECISION, USE_TMA,
                                        WARP_SPECIALIZE and stage == 2, SCORE_MOD, MASK_MOD, MASK_BLOCK_N,
                                        HAS_DESCALE and ROUND_BY_HAND)

    # Normalise once, at the end. A row that saw no key (and has no sink) has
    # l_i == 0 and acc == 0: its output is 0 and its lse is -inf, never NaN.
    no_key = l_i == 0.0
    l_safe = tl.where(no_key, 1.0, l_i)
    acc = acc / l_safe[:, None]
    if HAS_DROPOUT:
        acc = acc * (1.0 / (1.0 - dropout_p))  # kept probabilities are scaled up by 1 / (1 - p)
    if HAS_DESCALE:
        acc = acc * tl.load(descale + 2 * stride_dsk)  # v's dequantization: the output is linear in v
    lse = tl.where(no_key, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    tl.store(LSE + off_z * stride_lz + off_h * stride_lh + q_start + offs_m, lse, mask=offs_m < seqlen_q)
    o_ptrs = (O + off_z * stride_oz + off_h * stride_oh + q_row0 * stride_om
              + rows[:, None] * stride_om + offs_dv[None, :] * stride_ok)
    tl.store(o_ptrs, _cast_for_store(acc, O.dtype.element_ty, UPCAST or ROUND_BY_HAND),
             mask=(offs_m[:, None] < seqlen_q) & (offs_dv[None, :] < HEAD_DIM_V))
