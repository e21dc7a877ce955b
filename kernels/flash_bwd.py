"""FlashAttention-2 backward in Triton: delta, then dK/dV per key block, then dQ per query block.

The launcher, `_flash_bwd` in `kernels/flash_attention.py`, runs the three
kernels in that order. `reference/tiled.py` (tiled_flash_attention_backward)
is the same computation in plain PyTorch.
"""
import triton
import triton.language as tl

from .tiles import LOG2E, _causal_key_range, _load_tile


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
