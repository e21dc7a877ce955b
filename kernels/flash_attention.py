"""FlashAttention-2 in Triton: forward, backward, autograd, and a torch.library op.

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
exp(x * sm_scale) = exp2(x * sm_scale * LOG2E), so the kernel folds LOG2E
into the scale once (qk_scale) and keeps m_i in base-2 units.

Reading guide: `reference/tiled.py` is this forward pass in plain PyTorch,
with the same names (m_i, l_i, acc, qk_scale, start_m, start_n). The file reads
top to bottom: shared helpers -> forward kernel -> backward kernels ->
launchers -> the torch.library op with its autograd -> `flash_attention`.
"""
import math

import torch
import triton
import triton.language as tl

from reference.functional import check_attention_inputs

from .runtime import INTERPRET, accumulator_dtype, check_runnable, dot_precision, upcast_tiles

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # 1/ln 2, so exp(x) == exp2(x * LOG2E)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)  # ln 2, so log(x) == log2(x) * LN2
MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------
# Helpers shared by the forward and backward kernels
# ----------------------------------------------------------------------------
@triton.jit
def _load_tile(ptrs, offs_row, n_rows, offs_col, n_cols,
               CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr, UPCAST: tl.constexpr):
    """Load a 2-D tile, masking only the edges that can be ragged; zeros fill the rest.

    Zero padding is harmless everywhere it lands: a zero head-dim column adds
    nothing to q.k, and a zero key or query row is masked out of the softmax.
    Full tiles skip the mask entirely (CHECK_* are compile-time flags).
    """
    if CHECK_ROWS and CHECK_COLS:
        tile = tl.load(ptrs, mask=(offs_row[:, None] < n_rows) & (offs_col[None, :] < n_cols), other=0.0)
    elif CHECK_ROWS:
        tile = tl.load(ptrs, mask=offs_row[:, None] < n_rows, other=0.0)
    elif CHECK_COLS:
        tile = tl.load(ptrs, mask=offs_col[None, :] < n_cols, other=0.0)
    else:
        tile = tl.load(ptrs)
    if UPCAST:  # the interpreter computes bf16 wrongly: work in fp32 there
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _causal_key_range(start_m, N_Q, N_K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """Split the key axis for the query block starting at start_m.

    Returns (full_end, end): key blocks in [0, full_end) are full and wholly
    visible, so they need no mask; blocks in [full_end, end) straddle the
    diagonal or the ragged end of the keys and are masked element by element;
    keys from `end` on are above the diagonal and are never loaded.
    Same arithmetic as `reference.tiled.causal_key_bounds`.
    """
    full_key_blocks_end = (N_K // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        offset = N_K - N_Q  # query i sees keys j <= i + offset
        # The block's last query sees keys up to start_m + BLOCK_M - 1 + offset.
        end = tl.minimum(N_K, tl.maximum(0, start_m + BLOCK_M + offset))
        # Key block [s, s + BLOCK_N) is wholly visible if its last key is seen by the
        # block's first query. Clamp to >= 0 before dividing: the interpreter floors
        # a negative quotient while the GPU truncates it.
        full_end = (tl.maximum(0, start_m + offset + 1) // BLOCK_N) * BLOCK_N
        full_end = tl.minimum(tl.minimum(full_end, end), full_key_blocks_end)
    else:
        end = N_K
        full_end = full_key_blocks_end
    return full_end, end


# ----------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------
@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn,
                    offs_m, offs_n, offs_d, qk_scale, lo, hi, N_Q, N_K,
                    HEAD_DIM: tl.constexpr, PAD_D: tl.constexpr, BLOCK_N: tl.constexpr,
                    IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr,
                    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Walk key blocks [lo, hi), updating the online-softmax state (the inner loop of reference/tiled.py)."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cur_n = start_n + offs_n
        k = _load_tile(k_ptrs + start_n * stride_kn, cur_n, N_K, offs_d, HEAD_DIM, MASKED, PAD_D, UPCAST)
        # qk = (q @ k.T) * qk_scale, in base-2 units.            (BLOCK_M, BLOCK_N)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            visible = cur_n[None, :] < N_K
            if IS_CAUSAL:
                visible = visible & (cur_n[None, :] <= offs_m[:, None] + (N_K - N_Q))
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if MASKED:
            # A row that has seen no visible key keeps m = -inf; subtracting 0
            # instead keeps exp2(-inf - -inf) = NaN out of p and alpha.
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new_safe = m_new  # every score here is finite, so m_new is too
        p = tl.math.exp2(qk - m_new_safe[:, None])
        # alpha rescales what was accumulated under the old maximum m_i.
        alpha = tl.math.exp2(m_i - m_new_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_ptrs + start_n * stride_vn, cur_n, N_K, offs_d, HEAD_DIM, MASKED, PAD_D, UPCAST)
        # acc = acc * alpha + p @ v, with p rounded to v's dtype for the tensor cores.
        acc = tl.dot(p.to(v.dtype), v, acc=acc * alpha[:, None], input_precision=DOT_PRECISION, out_dtype=acc.dtype)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, qk_scale,
              stride_qz, stride_qh, stride_qm, stride_qk,
              stride_kz, stride_kh, stride_kn, stride_kk,
              stride_vz, stride_vh, stride_vn, stride_vk,
              stride_oz, stride_oh, stride_om, stride_ok,
              H_Q, GROUP_SIZE, N_Q, N_K,
              HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
              UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """One program: BLOCK_M query rows of one (batch, query head). Writes O and the natural-log LSE."""
    start_m = tl.program_id(0) * BLOCK_M
    off_zh = tl.program_id(1)
    off_z = (off_zh // H_Q).to(tl.int64)  # int64: batch * stride can pass 2**31 on big inputs
    off_h = (off_zh % H_Q).to(tl.int64)
    off_kvh = off_h // GROUP_SIZE  # GQA: the kv head this query head shares; K and V are not copied
    PAD_D: tl.constexpr = HEAD_DIM != HEAD_DIM_PAD

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    q_ptrs = Q + off_z * stride_qz + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qk
    k_ptrs = K + off_z * stride_kz + off_kvh * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kk
    v_ptrs = V + off_z * stride_vz + off_kvh * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vk

    # The Q tile is read once and stays in registers for the whole key loop.
    q = _load_tile(q_ptrs, offs_m, N_Q, offs_d, HEAD_DIM, True, PAD_D, UPCAST)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)  # running max, base-2 units
    l_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)  # running normaliser
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=ACC_DTYPE)  # unnormalised output

    full_end, end = _causal_key_range(start_m, N_Q, N_K, BLOCK_M, BLOCK_N, IS_CAUSAL)
    # Stage 1: full, wholly visible key blocks, with no mask at all.
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn,
                                    offs_m, offs_n, offs_d, qk_scale, 0, full_end, N_Q, N_K,
                                    HEAD_DIM, PAD_D, BLOCK_N, IS_CAUSAL, False, UPCAST, DOT_PRECISION)
    # Stage 2: blocks on the diagonal and the ragged last block, masked element by element.
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn,
                                    offs_m, offs_n, offs_d, qk_scale, full_end, end, N_Q, N_K,
                                    HEAD_DIM, PAD_D, BLOCK_N, IS_CAUSAL, True, UPCAST, DOT_PRECISION)

    # Normalise once, at the end. A row that saw no key has l_i == 0 and acc == 0:
    # its output is 0 and its lse is -inf, never NaN.
    no_key = l_i == 0.0
    l_safe = tl.where(no_key, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(no_key, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    tl.store(LSE + off_zh.to(tl.int64) * N_Q + offs_m, lse, mask=offs_m < N_Q)
    o_ptrs = O + off_z * stride_oz + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_ok
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=(offs_m[:, None] < N_Q) & (offs_d[None, :] < HEAD_DIM))


# ----------------------------------------------------------------------------
# Backward
#
# With S = Q K^T * sm_scale, P = exp(S - lse) and dO the incoming gradient:
#     dV = P^T dO      dP = dO V^T      dS = P * (dP - delta),  delta = rowsum(dO * O)
#     dQ = dS K * sm_scale             dK = dS^T Q * sm_scale
# P is recomputed tile by tile from the saved lse, so the backward pass, like
# the forward, never holds more than one tile of the N x N matrices.
# Two kernels avoid atomics: one program per key block accumulates dK and dV
# over the query blocks (and, for GQA, over every query head of its group, in
# a fixed order, so the sums are bitwise reproducible); one program per query
# block accumulates dQ over the key blocks.
# ----------------------------------------------------------------------------
@triton.jit
def _attn_bwd_preprocess(O, DO, DELTA,
                         stride_oz, stride_oh, stride_om, stride_ok,
                         stride_doz, stride_doh, stride_dom, stride_dok,
                         H_Q, N_Q,
                         HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O): the term of dS that comes through the softmax normaliser."""
    start_m = tl.program_id(0) * BLOCK_M
    off_zh = tl.program_id(1)
    off_z = (off_zh // H_Q).to(tl.int64)
    off_h = (off_zh % H_Q).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    PAD_D: tl.constexpr = HEAD_DIM != HEAD_DIM_PAD
    o = _load_tile(O + off_z * stride_oz + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_ok,
                   offs_m, N_Q, offs_d, HEAD_DIM, True, PAD_D, False)
    do = _load_tile(DO + off_z * stride_doz + off_h * stride_doh + offs_m[:, None] * stride_dom
                    + offs_d[None, :] * stride_dok, offs_m, N_Q, offs_d, HEAD_DIM, True, PAD_D, False)
    # Sum in DELTA's precision (fp32, or float64 for float64 inputs), never in bf16.
    acc_dtype = DELTA.dtype.element_ty
    delta = tl.sum(o.to(acc_dtype) * do.to(acc_dtype), 1)
    tl.store(DELTA + off_zh.to(tl.int64) * N_Q + offs_m, delta, mask=offs_m < N_Q)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, LSE_row, DELTA_row, stride_qm, stride_dom,
                         offs_n, offs_m, offs_d, qk_scale, lo, hi, N_Q, N_K,
                         HEAD_DIM: tl.constexpr, PAD_D: tl.constexpr, BLOCK_M: tl.constexpr,
                         IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr,
                         UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Walk query blocks [lo, hi) for one key block, accumulating dK and dV (transposed: keys are rows)."""
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        cur_m = start_m + offs_m
        q = _load_tile(q_ptrs + start_m * stride_qm, cur_m, N_Q, offs_d, HEAD_DIM, MASKED, PAD_D, UPCAST)
        do = _load_tile(do_ptrs + start_m * stride_dom, cur_m, N_Q, offs_d, HEAD_DIM, MASKED, PAD_D, UPCAST)
        if MASKED:
            # A query row past N_Q gets lse = +inf, so its recomputed P is exp2(-inf) = 0.
            lse = tl.load(LSE_row + cur_m, mask=cur_m < N_Q, other=float("inf"))
            delta = tl.load(DELTA_row + cur_m, mask=cur_m < N_Q, other=0.0)
        else:
            lse = tl.load(LSE_row + cur_m)
            delta = tl.load(DELTA_row + cur_m)
        # P^T recomputed from the saved lse.                       (BLOCK_N, BLOCK_M)
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        p_t = tl.math.exp2(qk_t - lse[None, :] * LOG2E)
        if MASKED and IS_CAUSAL:
            # tl.where drops the unselected branch, so the inf of a row that sees no key
            # (lse = -inf) never reaches the sums.
            p_t = tl.where(offs_n[:, None] <= cur_m[None, :] + (N_K - N_Q), p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, acc=dv, input_precision=DOT_PRECISION, out_dtype=dv.dtype)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, acc=dk, input_precision=DOT_PRECISION, out_dtype=dk.dtype)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, qk_scale, sm_scale,
                   stride_qz, stride_qh, stride_qm, stride_qk,
                   stride_kz, stride_kh, stride_kn, stride_kk,
                   stride_vz, stride_vh, stride_vn, stride_vk,
                   stride_doz, stride_doh, stride_dom, stride_dok,
                   stride_dkz, stride_dkh, stride_dkn, stride_dkk,
                   stride_dvz, stride_dvh, stride_dvn, stride_dvk,
                   H_KV, GROUP_SIZE, N_Q, N_K,
                   HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
                   UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """One program: BLOCK_N keys of one (batch, kv head); sums over every query head of the group."""
    start_n = tl.program_id(0) * BLOCK_N
    off_zkv = tl.program_id(1)
    off_z = (off_zkv // H_KV).to(tl.int64)
    off_kvh = (off_zkv % H_KV).to(tl.int64)
    PAD_D: tl.constexpr = HEAD_DIM != HEAD_DIM_PAD

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    k = _load_tile(K + off_z * stride_kz + off_kvh * stride_kh + offs_n[:, None] * stride_kn
                   + offs_d[None, :] * stride_kk, offs_n, N_K, offs_d, HEAD_DIM, True, PAD_D, UPCAST)
    v = _load_tile(V + off_z * stride_vz + off_kvh * stride_vh + offs_n[:, None] * stride_vn
                   + offs_d[None, :] * stride_vk, offs_n, N_K, offs_d, HEAD_DIM, True, PAD_D, UPCAST)
    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=ACC_DTYPE)

    # Which query blocks see this key block (the mirror image of _causal_key_range):
    # [lo, full_start) straddle the diagonal, [full_start, even_end) are full and
    # wholly visible, [tail_start, N_Q) hold the ragged last query block.
    even_end = (N_Q // BLOCK_M) * BLOCK_M
    if IS_CAUSAL:
        offset = N_K - N_Q  # query i sees keys j <= i + offset
        lo = (tl.maximum(0, start_n - offset) // BLOCK_M) * BLOCK_M
        # Query block [s, s + BLOCK_M) sees every key of this block if s + offset >= start_n + BLOCK_N - 1.
        full_start = tl.cdiv(tl.maximum(0, start_n + BLOCK_N - 1 - offset), BLOCK_M) * BLOCK_M
        full_start = tl.maximum(full_start, lo)
    else:
        lo = 0
        full_start = 0
    diagonal_end = tl.minimum(full_start, N_Q)
    tail_start = tl.maximum(full_start, even_end)

    # GQA: the query heads of this kv head are adjacent; visit them in order, no atomics.
    for g in range(GROUP_SIZE):
        off_h = off_kvh * GROUP_SIZE + g
        off_zh = off_z * (H_KV * GROUP_SIZE) + off_h
        q_ptrs = Q + off_z * stride_qz + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qk
        do_ptrs = (DO + off_z * stride_doz + off_h * stride_doh + offs_m[:, None] * stride_dom
                   + offs_d[None, :] * stride_dok)
        LSE_row = LSE + off_zh * N_Q
        DELTA_row = DELTA + off_zh * N_Q
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, LSE_row, DELTA_row, stride_qm, stride_dom,
                                      offs_n, offs_m, offs_d, qk_scale, lo, diagonal_end, N_Q, N_K,
                                      HEAD_DIM, PAD_D, BLOCK_M, IS_CAUSAL, True, UPCAST, DOT_PRECISION)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, LSE_row, DELTA_row, stride_qm, stride_dom,
                                      offs_n, offs_m, offs_d, qk_scale, full_start, tail_start, N_Q, N_K,
                                      HEAD_DIM, PAD_D, BLOCK_M, IS_CAUSAL, False, UPCAST, DOT_PRECISION)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, LSE_row, DELTA_row, stride_qm, stride_dom,
                                      offs_n, offs_m, offs_d, qk_scale, tail_start, N_Q, N_Q, N_K,
                                      HEAD_DIM, PAD_D, BLOCK_M, IS_CAUSAL, True, UPCAST, DOT_PRECISION)

    dk = dk * sm_scale  # S = QK^T * sm_scale, so dK picks up the scale once, here
    store_mask = (offs_n[:, None] < N_K) & (offs_d[None, :] < HEAD_DIM)
    tl.store(DK + off_z * stride_dkz + off_kvh * stride_dkh + offs_n[:, None] * stride_dkn
             + offs_d[None, :] * stride_dkk, dk.to(DK.dtype.element_ty), mask=store_mask)
    tl.store(DV + off_z * stride_dvz + off_kvh * stride_dvh + offs_n[:, None] * stride_dvn
             + offs_d[None, :] * stride_dvk, dv.to(DV.dtype.element_ty), mask=store_mask)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn,
                       offs_m, offs_n, offs_d, qk_scale, lo, hi, N_Q, N_K,
                       HEAD_DIM: tl.constexpr, PAD_D: tl.constexpr, BLOCK_N: tl.constexpr,
                       IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr,
                       UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Walk key blocks [lo, hi) for one query block, accumulating dQ."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cur_n = start_n + offs_n
        k = _load_tile(k_ptrs + start_n * stride_kn, cur_n, N_K, offs_d, HEAD_DIM, MASKED, PAD_D, UPCAST)
        v = _load_tile(v_ptrs + start_n * stride_vn, cur_n, N_K, offs_d, HEAD_DIM, MASKED, PAD_D, UPCAST)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(qk - lse[:, None])  # lse is in base-2 units here
        if MASKED:
            visible = cur_n[None, :] < N_K
            if IS_CAUSAL:
                visible = visible & (cur_n[None, :] <= offs_m[:, None] + (N_K - N_Q))
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, acc=dq, input_precision=DOT_PRECISION, out_dtype=dq.dtype)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, qk_scale, sm_scale,
                 stride_qz, stride_qh, stride_qm, stride_qk,
                 stride_kz, stride_kh, stride_kn, stride_kk,
                 stride_vz, stride_vh, stride_vn, stride_vk,
                 stride_doz, stride_doh, stride_dom, stride_dok,
                 stride_dqz, stride_dqh, stride_dqm, stride_dqk,
                 H_Q, GROUP_SIZE, N_Q, N_K,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
                 UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """One program: BLOCK_M query rows of one (batch, query head); the forward's loop, differentiated."""
    start_m = tl.program_id(0) * BLOCK_M
    off_zh = tl.program_id(1)
    off_z = (off_zh // H_Q).to(tl.int64)
    off_h = (off_zh % H_Q).to(tl.int64)
    off_kvh = off_h // GROUP_SIZE
    PAD_D: tl.constexpr = HEAD_DIM != HEAD_DIM_PAD

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    q = _load_tile(Q + off_z * stride_qz + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qk,
                   offs_m, N_Q, offs_d, HEAD_DIM, True, PAD_D, UPCAST)
    do = _load_tile(DO + off_z * stride_doz + off_h * stride_doh + offs_m[:, None] * stride_dom
                    + offs_d[None, :] * stride_dok, offs_m, N_Q, offs_d, HEAD_DIM, True, PAD_D, UPCAST)
    row = off_zh.to(tl.int64) * N_Q + offs_m
    # Rows past N_Q get lse = +inf, so their recomputed P is 0.
    lse = tl.load(LSE + row, mask=offs_m < N_Q, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + row, mask=offs_m < N_Q, other=0.0)
    k_ptrs = K + off_z * stride_kz + off_kvh * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kk
    v_ptrs = V + off_z * stride_vz + off_kvh * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vk
    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=ACC_DTYPE)

    full_end, end = _causal_key_range(start_m, N_Q, N_K, BLOCK_M, BLOCK_N, IS_CAUSAL)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn,
                            offs_m, offs_n, offs_d, qk_scale, 0, full_end, N_Q, N_K,
                            HEAD_DIM, PAD_D, BLOCK_N, IS_CAUSAL, False, UPCAST, DOT_PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn,
                            offs_m, offs_n, offs_d, qk_scale, full_end, end, N_Q, N_K,
                            HEAD_DIM, PAD_D, BLOCK_N, IS_CAUSAL, True, UPCAST, DOT_PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + off_z * stride_dqz + off_h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqk,
             dq.to(DQ.dtype.element_ty), mask=(offs_m[:, None] < N_Q) & (offs_d[None, :] < HEAD_DIM))


# ----------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------
# Under the interpreter there is no GPU to time configs on: one fixed config,
# with blocks large enough to keep the program count (and so the run time)
# small, and BLOCK_M != BLOCK_N so the tests exercise uneven causal splits.
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=1)
_TUNING_KEY = ["N_Q", "N_K", "HEAD_DIM_PAD", "IS_CAUSAL"]


def _configs(*shapes):
    """triton.Configs from (BLOCK_M, BLOCK_N, num_warps, num_stages) tuples."""
    return [triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
            for block_m, block_n, warps, stages in shapes]


# A short, curated list per kernel keeps autotuning to seconds per shape. The
# forward walks keys with a tall Q tile; dK/dV holds a tall K/V tile and walks
# short query tiles; dQ is the forward's shape again. The last entries of each
# list are the small tiles that head dim 256 needs.
_FWD_CONFIGS = _configs((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 3),
                        (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 2))
_DKDV_CONFIGS = _configs((32, 128, 4, 3), (32, 128, 8, 3), (64, 128, 8, 2), (64, 64, 4, 3),
                         (32, 64, 4, 2), (16, 64, 4, 2))
_DQ_CONFIGS = _configs((128, 32, 4, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3),
                       (64, 32, 4, 2), (32, 32, 4, 2))


def _prune_configs(configs, named_args, **kwargs):
    """Drop configs that cannot fit or cannot pay off for this head dim and length.

    Every pipeline stage holds a K and a V tile (BLOCK_N x D) in shared memory
    next to the resident tile (BLOCK_M x D) and an fp32 accumulator in
    registers: head dim 256 only fits small tiles with at most 2 stages.
    fp32 and fp64 inputs skip the tensor cores' fast path and compile slowly
    (up to a minute a config): they get the smallest config, untuned.
    """
    args = {**named_args, **kwargs}  # named_args holds only positional args; HEAD_DIM_PAD comes as a kwarg
    head_dim, n_max = args["HEAD_DIM_PAD"], max(args["N_Q"], args["N_K"])
    if args["Q"].dtype in (torch.float32, torch.float64):
        return configs[-1:]
    kept = []
    for config in configs:
        block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
        if head_dim >= 256 and (block_m * block_n > 64 * 32 or config.num_stages > 2):
            continue
        if min(block_m, block_n) > max(32, triton.next_power_of_2(n_max)):  # tiles far longer than the sequence
            continue
        kept.append(config)
    return kept or configs[-1:]


def _autotuned(kernel, gpu_configs):
    """The kernel autotuned over its GPU configs, or pinned to the interpreter config."""
    if INTERPRET:
        return triton.autotune(configs=[_INTERPRETER_CONFIG], key=_TUNING_KEY)(kernel)
    return triton.autotune(configs=gpu_configs, key=_TUNING_KEY,
                           prune_configs_by={"early_config_prune": _prune_configs})(kernel)


_attn_fwd_tuned = _autotuned(_attn_fwd, _FWD_CONFIGS)
_attn_bwd_dkdv_tuned = _autotuned(_attn_bwd_dkdv, _DKDV_CONFIGS)
_attn_bwd_dq_tuned = _autotuned(_attn_bwd_dq, _DQ_CONFIGS)
_PREPROCESS_BLOCK_M = 64


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _head_dim_pad(head_dim: int) -> int:
    """Tiles are powers of two and tl.dot needs K >= 16: pad D inside the kernel, with masked loads."""
    return max(16, triton.next_power_of_2(head_dim))


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


def _flash_fwd(q, k, v, causal, sm_scale, o=None, lse=None):
    """Run the forward kernel. Returns o (B, Hq, Nq, D) in q's dtype and lse (B, Hq, Nq) in fp32.

    o and lse may be passed in (tests pass NaN-filled buffers to catch unwritten elements).
    """
    batch, h_q, n_q, head_dim = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device) if o is None else o
    lse = torch.empty((batch, h_q, n_q), dtype=accumulator_dtype(q.dtype), device=q.device) if lse is None else lse
    if q.numel() == 0:
        return o, lse
    qk_scale = sm_scale * LOG2E.value  # fold LOG2E into the scale: exp(x * s) == exp2(x * s * LOG2E)

    def grid(meta):
        return (triton.cdiv(n_q, meta["BLOCK_M"]), batch * h_q)

    _attn_fwd_tuned[grid](
        q, k, v, o, lse, qk_scale,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        h_q, h_q // h_kv, n_q, n_k,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=_head_dim_pad(head_dim), IS_CAUSAL=causal,
        UPCAST=upcast_tiles(q.dtype), DOT_PRECISION=dot_precision(q.dtype), ACC_DTYPE=_tl_dtype(lse.dtype),
    )
    return o, lse


def _flash_bwd(do, q, k, v, o, lse, causal, sm_scale, dlse=None, dq=None, dk=None, dv=None):
    """Run the three backward kernels. Returns dq, dk, dv in the dtypes of q, k, v.

    dlse, the gradient flowing into the returned lse (if any), enters through
    delta: d lse_i / d S_ij = P_ij, so it adds P_ij * dlse_i to dS_ij, which is
    the same as subtracting dlse_i from delta_i.
    """
    batch, h_q, n_q, head_dim = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if dq is None else dq
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if dk is None else dk
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if dv is None else dv
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    head_dim_pad = _head_dim_pad(head_dim)
    qk_scale = sm_scale * LOG2E.value

    delta = torch.empty((batch, h_q, n_q), dtype=lse.dtype, device=q.device)
    _attn_bwd_preprocess[(triton.cdiv(n_q, _PREPROCESS_BLOCK_M), batch * h_q)](
        o, do, delta, *o.stride(), *do.stride(), h_q, n_q,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_M=_PREPROCESS_BLOCK_M,
    )
    if dlse is not None:
        delta -= dlse

    flags = dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, IS_CAUSAL=causal,
                 UPCAST=upcast_tiles(q.dtype), DOT_PRECISION=dot_precision(q.dtype), ACC_DTYPE=_tl_dtype(lse.dtype))
    _attn_bwd_dkdv_tuned[lambda meta: (triton.cdiv(n_k, meta["BLOCK_N"]), batch * h_kv)](
        q, k, v, do, lse, delta, dk, dv, qk_scale, sm_scale,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        h_kv, h_q // h_kv, n_q, n_k, **flags,
    )
    _attn_bwd_dq_tuned[lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), batch * h_q)](
        q, k, v, do, lse, delta, dq, qk_scale, sm_scale,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        h_q, h_q // h_kv, n_q, n_k, **flags,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------
# The torch.library op and its autograd
#
# Registering the kernels as custom ops, each with a fake (shape-only)
# implementation, lets torch.compile trace a model that calls them without a
# graph break; register_autograd makes the forward op differentiable through
# the backward op (torch builds the autograd.Function from these two pieces).
# ----------------------------------------------------------------------------
@torch.library.custom_op("attention_playground::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       causal: bool, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _flash_fwd(q, k, v, causal, sm_scale)


@_flash_attn_fwd_op.register_fake
def _(q, k, v, causal, sm_scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=accumulator_dtype(q.dtype))


@torch.library.custom_op("attention_playground::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       o: torch.Tensor, lse: torch.Tensor, dlse: torch.Tensor | None,
                       causal: bool, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _flash_bwd(do, q, k, v, o, lse, causal, sm_scale, dlse=dlse)


@_flash_attn_bwd_op.register_fake
def _(do, q, k, v, o, lse, dlse, causal, sm_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, sm_scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal = causal
    ctx.sm_scale = sm_scale


def _backward(ctx, do, dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _flash_attn_bwd_op(do, q, k, v, o, lse, dlse, ctx.causal, ctx.sm_scale)
    return dq, dk, dv, None, None


_flash_attn_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------
def flash_attention(q, k, v, causal=False, sm_scale=None, return_lse=False):
    """softmax(q k^T * sm_scale) v, fused in Triton, differentiable.

    q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D), with Hq a multiple of Hkv (GQA/MQA)
    and 1 <= D <= 256; fp32, fp16 or bf16 (float64 too, for gradcheck); any strides. causal masks bottom-right
    (query i sees key j <= i + Nk - Nq). sm_scale defaults to 1/sqrt(D).
    Returns o (B, Hq, Nq, D) in q's dtype, and with return_lse=True also the
    natural-log log-sum-exp of each row's scores, lse (B, Hq, Nq) in fp32
    (float64 for float64 inputs; -inf for a row with no visible key, whose output is 0).
    """
    check_flash_inputs(q, k, v, sm_scale)
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    o, lse = _flash_attn_fwd_op(q, k, v, bool(causal), sm_scale)
    return (o, lse) if return_lse else o
