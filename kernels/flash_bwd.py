"""FlashAttention-2 backward in Triton: delta, then dK/dV per key block, then dQ per query block.

With S the modified scores (kernels/tiles.py: _scores), P = exp(S - lse) and dO
the incoming gradient:

    dV = P^T dO      dP = dO V^T      dS = P * (dP - delta),  delta = rowsum(dO * O)
    dQ = dS' K * sm_scale             dK = dS'^T Q * sm_scale

where dS' = dS, or dS * (1 - tanh^2) with soft-capping (the derivative of
softcap * tanh(s / softcap)). ALiBi and the masks add constants to S and need
nothing more. P is recomputed tile by tile from the saved lse, so the backward
pass, like the forward, never holds more than one tile of the N x N matrices.
With a sink, lse already counts it, so P is right as it is; the sink's own
gradient, -sum_i exp(sink - lse_i) * delta_i, is one reduction the launcher
does in PyTorch. With dropout, the same counter-based mask as the forward's
is regenerated: dV sees the dropped P, and dP is dropped the same way.

Two kernels avoid atomics: one program per key block accumulates dK and dV
over the query blocks (and, for GQA, over every query head of its group, in a
fixed order, so the sums are bitwise reproducible); one program per query
block accumulates dQ over the key blocks. With deterministic=False, the
dK/dV kernel also adds dQ with atomics and the dQ kernel is skipped
(FlashAttention-2's scheme). The launcher, `_flash_bwd` in
`kernels/flash_attention.py`, runs the three kernels in order;
`reference/tiled.py` (tiled_flash_attention_backward) is the same computation
in plain PyTorch, without the variants.
"""
import triton
import triton.language as tl

from .tiles import (LOG2E, _cast_for_store, _dropout_keep, _key_range, _listed_block_start, _load_tile,
                    _mask_mod_visible, _query_range, _score_grad, _scores, _sequence_bounds, _stage_range, _visible)


@triton.jit
def _attn_bwd_preprocess(O, DO, DELTA,
                         stride_oz, stride_oh, stride_om, stride_ok,
                         stride_doz, stride_doh, stride_dom, stride_dok,
                         stride_lz, stride_lh,
                         H_Q, N_Q,
                         HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O): the term of dS that comes through the softmax normaliser.

    Packed sequences pass as one batch of N_Q = total rows: delta is per row.
    """
    num_m_blocks = tl.cdiv(N_Q, BLOCK_M)
    off_zh = tl.program_id(0) // num_m_blocks
    start_m = (tl.program_id(0) % num_m_blocks) * BLOCK_M
    off_z = (off_zh // H_Q).to(tl.int64)
    off_h = (off_zh % H_Q).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    offs_m = start_m + rows
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    PAD_D: tl.constexpr = HEAD_DIM != HEAD_DIM_PAD
    row0 = start_m.to(tl.int64)  # 64-bit block start, 32-bit offsets within the block
    o = _load_tile(O + off_z * stride_oz + off_h * stride_oh + row0 * stride_om + rows[:, None] * stride_om
                   + offs_d[None, :] * stride_ok, offs_m, N_Q, offs_d, HEAD_DIM, True, PAD_D, False)
    do = _load_tile(DO + off_z * stride_doz + off_h * stride_doh + row0 * stride_dom + rows[:, None] * stride_dom
                    + offs_d[None, :] * stride_dok, offs_m, N_Q, offs_d, HEAD_DIM, True, PAD_D, False)
    # Sum in DELTA's precision (fp32, or float64 for float64 inputs), never in bf16.
    acc_dtype = DELTA.dtype.element_ty
    delta = tl.sum(o.to(acc_dtype) * do.to(acc_dtype), 1)
    tl.store(DELTA + off_z * stride_lz + off_h * stride_lh + offs_m, delta, mask=offs_m < N_Q)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, LSE_row, DELTA_row, stride_qm, stride_dom,
                         stride_dqm, offs_n, offs_m, offs_d, offs_dv, lo, hi, N_Q, N_K, offset, sm_scale, softcap,
                         alibi_slope, window_left, window_right, seed, stream, dropout_row0, dropout_p,
                         off_z, off_h, score_args, mask_args, grad_args, Q_LIST,
                         HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, PAD_D: tl.constexpr,
                         PAD_DV: tl.constexpr, BLOCK_M: tl.constexpr,
                         MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                         HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, FUSED_DQ: tl.constexpr,
                         MASKED: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         SCORE_MOD: tl.constexpr, SCORE_MOD_BWD: tl.constexpr, MASK_MOD: tl.constexpr,
                         SPARSE_BLOCK_M: tl.constexpr, MOD_GRADS: tl.constexpr):
    """Walk query blocks for one key block, accumulating dK and dV (transposed: keys are rows).

    The blocks are [lo, hi) in steps of BLOCK_M, or with a block mask (SPARSE_BLOCK_M > 0) the
    sub-tiles lo..hi-1 of the mask's query blocks listed after the count at Q_LIST (see _attn_fwd_inner).
    FUSED_DQ: also add this key block's share of dQ = dS K * sm_scale into an
    fp32 buffer with atomic adds (FlashAttention-2's single-kernel backward: five
    matrix products per tile instead of the seven the separate dQ kernel needs,
    at the price of a summation order that varies from run to run).
    This kernel accumulates the gradients of the tensors a score_mod reads (grad_args, when
    MOD_GRADS): it sees every (query, key) pair once, in the fused backward and the two-kernel one alike.
    """
    if SPARSE_BLOCK_M > 0:
        STEP: tl.constexpr = 1
    else:
        STEP: tl.constexpr = BLOCK_M
    for it in range(lo, hi, STEP):
        start_m = _listed_block_start(it, Q_LIST, SPARSE_BLOCK_M, BLOCK_M)
        cur_m = start_m + offs_m
        q = _load_tile(q_ptrs + start_m.to(tl.int64) * stride_qm, cur_m, N_Q, offs_d, HEAD_DIM, MASKED, PAD_D,
                       UPCAST)
        do = _load_tile(do_ptrs + start_m.to(tl.int64) * stride_dom, cur_m, N_Q, offs_dv, HEAD_DIM_V, MASKED,
                        PAD_DV, UPCAST)
        if MASKED:
            # A query row past N_Q gets lse = +inf, so its recomputed P is exp2(-inf) = 0.
            lse = tl.load(LSE_row + cur_m, mask=cur_m < N_Q, other=float("inf"))
            delta = tl.load(DELTA_row + cur_m, mask=cur_m < N_Q, other=0.0)
        else:
            lse = tl.load(LSE_row + cur_m)
            delta = tl.load(DELTA_row + cur_m)
        # P^T recomputed from the saved lse.                       (BLOCK_N, BLOCK_M)
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        s_t, tanh_t, s_in_t = _scores(qk_t, cur_m[None, :], offs_n[:, None], offset, sm_scale, softcap, alibi_slope,
                                      off_z, off_h, score_args, N_Q, N_K, HAS_SOFTCAP, HAS_ALIBI, SCORE_MOD)
        p_t = tl.math.exp2(s_t - lse[None, :] * LOG2E)
        if MASKED:
            # tl.where drops the unselected branch, so the inf of a row that sees no key
            # (lse = -inf) and of a padding key never reaches the sums.
            visible = _visible(cur_m[None, :], offs_n[:, None], N_K, offset, window_left, window_right,
                               MASK_LEFT, MASK_RIGHT)
            visible = _mask_mod_visible(visible, cur_m[None, :], offs_n[:, None], off_z, off_h, mask_args, N_Q, N_K,
                                        MASK_MOD)
            p_t = tl.where(visible, p_t, 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep_t = _dropout_keep(seed, stream, cur_m[None, :] + dropout_row0, offs_n[:, None], dropout_p)
            scale = 1.0 / (1.0 - dropout_p)
            dv = tl.dot(tl.where(keep_t, p_t * scale, 0.0).to(do.dtype), do, acc=dv, input_precision=DOT_PRECISION,
                        out_dtype=dv.dtype)
            dp_t = tl.where(keep_t, dp_t * scale, 0.0)
        else:
            dv = tl.dot(p_t.to(do.dtype), do, acc=dv, input_precision=DOT_PRECISION, out_dtype=dv.dtype)
        ds_t = p_t * (dp_t - delta[None, :])
        ds_t = _score_grad(ds_t, tanh_t, s_in_t, cur_m[None, :], offs_n[:, None], off_z, off_h, score_args,
                           grad_args, N_Q, N_K, HAS_SOFTCAP, SCORE_MOD_BWD, MOD_GRADS)
        if SCORE_MOD_BWD is not None and MASKED:
            # A masked score has no gradient, whatever a score_mod's derivative says there (inf * 0 = NaN).
            ds_t = tl.where(visible, ds_t, 0.0)
        dk = tl.dot(ds_t.to(q.dtype), q, acc=dk, input_precision=DOT_PRECISION, out_dtype=dk.dtype)
        if FUSED_DQ:
            dq = tl.dot(tl.trans(ds_t).to(k.dtype), k, input_precision=DOT_PRECISION) * sm_scale  # (BLOCK_M, D)
            ptrs = dq_ptrs + start_m.to(tl.int64) * stride_dqm
            # Relaxed: a sum needs each add to be atomic, not ordered against other memory operations
            # (the default, acq_rel, fences every add).
            if MASKED or PAD_D:
                tl.atomic_add(ptrs, dq, mask=(cur_m[:, None] < N_Q) & (offs_d[None, :] < HEAD_DIM), sem="relaxed")
            else:
                tl.atomic_add(ptrs, dq, sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, DQ, CU_SEQLENS_Q, CU_SEQLENS_K, ALIBI_SLOPES, SEED, BLOCK_MASK,
                   sm_scale, softcap, dropout_p, window_left, window_right,
                   stride_qz, stride_qh, stride_qm, stride_qk,
                   stride_kz, stride_kh, stride_kn, stride_kk,
                   stride_vz, stride_vh, stride_vn, stride_vk,
                   stride_doz, stride_doh, stride_dom, stride_dok,
                   stride_dkz, stride_dkh, stride_dkn, stride_dkk,
                   stride_dvz, stride_dvh, stride_dvn, stride_dvk,
                   stride_dqz, stride_dqh, stride_dqm, stride_dqk,
                   stride_lz, stride_lh, stride_az, stride_ah, stride_split,
                   stride_bmk, stride_bmz, stride_bmh, stride_bmr,
                   H_KV, GROUP_SIZE, HEADS_PER_PROGRAM, N_Q, N_K, score_args, mask_args, grad_args,
                   HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                   HEAD_DIM_V_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr,
                   FUSED_DQ: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   ACC_DTYPE: tl.constexpr, SCORE_MOD: tl.constexpr = None, SCORE_MOD_BWD: tl.constexpr = None,
                   MASK_MOD: tl.constexpr = None, MASK_BLOCK_M: tl.constexpr = 0, MASK_BLOCK_N: tl.constexpr = 0,
                   MOD_GRADS: tl.constexpr = False):
    """One program: BLOCK_N keys of one (batch, kv head), summing over HEADS_PER_PROGRAM query heads.

    With a block mask, BLOCK_MASK is its transpose: per key block of MASK_BLOCK_N keys, the
    query blocks that see it partly and wholly (kernels/block_mask.py).

    Normally one program takes the whole GQA group. When batch * kv heads * key
    blocks is small against the GPU (MQA at batch 1: 64 programs on 132 SMs), the
    launcher splits the group: split s takes query heads s * HEADS_PER_PROGRAM
    onwards and writes fp32 partial dK, dV at DK + s * stride_split, which the
    launcher sums in a fixed order, so the result stays bitwise reproducible.
    """
    num_n_blocks = tl.cdiv(N_K, BLOCK_N)
    num_splits = GROUP_SIZE // HEADS_PER_PROGRAM
    start_n = (tl.program_id(0) % num_n_blocks) * BLOCK_N
    split = (tl.program_id(0) // num_n_blocks) % num_splits
    off_zkv = tl.program_id(0) // (num_n_blocks * num_splits)
    off_z = (off_zkv // H_KV).to(tl.int64)
    off_kvh = (off_zkv % H_KV).to(tl.int64)
    q_start, k_start, seqlen_q, seqlen_k = _sequence_bounds(CU_SEQLENS_Q, CU_SEQLENS_K, off_z, N_Q, N_K, IS_VARLEN)
    if IS_VARLEN:
        if start_n >= seqlen_k:  # this sequence is shorter than the longest
            return
    PAD_D: tl.constexpr = HEAD_DIM != HEAD_DIM_PAD
    PAD_DV: tl.constexpr = HEAD_DIM_V != HEAD_DIM_V_PAD
    MASK_RIGHT: tl.constexpr = IS_CAUSAL or HAS_WINDOW
    offset = seqlen_k - seqlen_q

    cols = tl.arange(0, BLOCK_N)
    offs_n = start_n + cols
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)  # q and k's head dim
    offs_dv = tl.arange(0, HEAD_DIM_V_PAD)  # v, o and their gradients
    k_row0 = k_start + start_n.to(tl.int64)  # 64-bit block start, 32-bit offsets within the block
    k = _load_tile(K + off_z * stride_kz + off_kvh * stride_kh + k_row0 * stride_kn + cols[:, None] * stride_kn
                   + offs_d[None, :] * stride_kk, offs_n, seqlen_k, offs_d, HEAD_DIM, True, PAD_D, UPCAST)
    v = _load_tile(V + off_z * stride_vz + off_kvh * stride_vh + k_row0 * stride_vn + cols[:, None] * stride_vn
                   + offs_dv[None, :] * stride_vk, offs_n, seqlen_k, offs_dv, HEAD_DIM_V, True, PAD_DV, UPCAST)
    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_V_PAD], dtype=ACC_DTYPE)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)

    # Which query blocks see this key block: [lo, full_lo) and [full_hi, hi) partly, [full_lo, full_hi) wholly;
    # or, with a block mask, the query blocks its (transposed) lists give for each query head.
    if MASK_BLOCK_M > 0:
        NUM_STAGES: tl.constexpr = 2
    else:
        lo, full_lo, full_hi, hi = _query_range(start_n, seqlen_q, seqlen_k, window_left, window_right,
                                                BLOCK_M, BLOCK_N, HAS_WINDOW, MASK_RIGHT)
        NUM_STAGES: tl.constexpr = 3

    # GQA: the query heads of this kv head are adjacent; visit them in order, no atomics.
    for g in range(split * HEADS_PER_PROGRAM, (split + 1) * HEADS_PER_PROGRAM):
        off_h = off_kvh * GROUP_SIZE + g
        q_ptrs = (Q + off_z * stride_qz + off_h * stride_qh + q_start * stride_qm
                  + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qk)
        do_ptrs = (DO + off_z * stride_doz + off_h * stride_doh + q_start * stride_dom
                   + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dok)
        dq_ptrs = (DQ + off_z * stride_dqz + off_h * stride_dqh + q_start * stride_dqm
                   + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqk)
        LSE_row = LSE + off_z * stride_lz + off_h * stride_lh + q_start
        DELTA_row = DELTA + off_z * stride_lz + off_h * stride_lh + q_start
        alibi_slope = 0.0
        if HAS_ALIBI:
            alibi_slope = tl.load(ALIBI_SLOPES + off_z * stride_az + off_h * stride_ah)
        if IS_VARLEN:
            stream = off_h
        else:
            stream = off_z * (H_KV * GROUP_SIZE) + off_h
        if MASK_BLOCK_M > 0:
            column = BLOCK_MASK + off_z * stride_bmz + off_h * stride_bmh + (start_n // MASK_BLOCK_N) * stride_bmr
        # Stages, as in the forward: a block mask's query blocks that see this key block partly (masked),
        # then wholly; or the partly visible query blocks (masked) around the wholly visible ones
        # (masked too where a mask_mod may hide any of them).
        for stage in tl.static_range(NUM_STAGES):
            if MASK_BLOCK_M > 0:
                q_list = column + stage * stride_bmk
                stage_lo, stage_hi = 0, tl.load(q_list) * (MASK_BLOCK_M // BLOCK_M)
                MASKED = stage == 0
            else:
                q_list = BLOCK_MASK
                stage_lo, stage_hi = _stage_range(stage, lo, full_lo, full_hi, hi)
                MASKED = stage != 1 or MASK_MOD is not None
            dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, dq_ptrs, LSE_row, DELTA_row, stride_qm,
                                          stride_dom, stride_dqm, offs_n, offs_m, offs_d, offs_dv, stage_lo, stage_hi,
                                          seqlen_q, seqlen_k, offset, sm_scale, softcap, alibi_slope, window_left,
                                          window_right, seed, stream, q_start, dropout_p, off_z, off_h, score_args,
                                          mask_args, grad_args, q_list, HEAD_DIM, HEAD_DIM_V, PAD_D, PAD_DV, BLOCK_M,
                                          HAS_WINDOW and MASK_BLOCK_M == 0, MASK_RIGHT and MASK_BLOCK_M == 0,
                                          HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, FUSED_DQ, MASKED, UPCAST, DOT_PRECISION,
                                          SCORE_MOD, SCORE_MOD_BWD, MASK_MOD, MASK_BLOCK_M, MOD_GRADS)

    dk = dk * sm_scale  # S = QK^T * sm_scale, so dK picks up the scale once, here
    store_mask = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    store_mask_v = (offs_n[:, None] < seqlen_k) & (offs_dv[None, :] < HEAD_DIM_V)
    DK += split.to(tl.int64) * stride_split  # 0 unless the group is split into partial sums
    DV += split.to(tl.int64) * stride_split
    tl.store(DK + off_z * stride_dkz + off_kvh * stride_dkh + k_row0 * stride_dkn + cols[:, None] * stride_dkn
             + offs_d[None, :] * stride_dkk, _cast_for_store(dk, DK.dtype.element_ty, UPCAST), mask=store_mask)
    tl.store(DV + off_z * stride_dvz + off_kvh * stride_dvh + k_row0 * stride_dvn + cols[:, None] * stride_dvn
             + offs_dv[None, :] * stride_dvk, _cast_for_store(dv, DV.dtype.element_ty, UPCAST), mask=store_mask_v)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d, offs_dv,
                       lo, hi, N_Q, N_K, offset, sm_scale, softcap, alibi_slope, window_left, window_right,
                       seed, stream, dropout_row0, dropout_p, off_z, off_h, score_args, mask_args, KV_LIST,
                       HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, PAD_D: tl.constexpr,
                       PAD_DV: tl.constexpr, BLOCK_N: tl.constexpr,
                       MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                       HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, MASKED: tl.constexpr,
                       UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, SCORE_MOD: tl.constexpr,
                       SCORE_MOD_BWD: tl.constexpr, MASK_MOD: tl.constexpr, SPARSE_BLOCK_N: tl.constexpr):
    """Walk key blocks for one query block, accumulating dQ: [lo, hi), or a block mask's list (see _attn_fwd_inner).

    The score_mod's derivative is taken without accumulating its tensors' gradients (the dK/dV kernel does).
    """
    if SPARSE_BLOCK_N > 0:
        STEP: tl.constexpr = 1
    else:
        STEP: tl.constexpr = BLOCK_N
    for it in range(lo, hi, STEP):
        start_n = _listed_block_start(it, KV_LIST, SPARSE_BLOCK_N, BLOCK_N)
        cur_n = start_n + offs_n
        k = _load_tile(k_ptrs + start_n.to(tl.int64) * stride_kn, cur_n, N_K, offs_d, HEAD_DIM, MASKED, PAD_D,
                       UPCAST)
        v = _load_tile(v_ptrs + start_n.to(tl.int64) * stride_vn, cur_n, N_K, offs_dv, HEAD_DIM_V, MASKED, PAD_DV,
                       UPCAST)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        s, tanh_s, s_in = _scores(qk, offs_m[:, None], cur_n[None, :], offset, sm_scale, softcap, alibi_slope,
                                  off_z, off_h, score_args, N_Q, N_K, HAS_SOFTCAP, HAS_ALIBI, SCORE_MOD)
        p = tl.math.exp2(s - lse[:, None])  # lse is in base-2 units here
        if MASKED:
            visible = _visible(offs_m[:, None], cur_n[None, :], N_K, offset, window_left, window_right,
                               MASK_LEFT, MASK_RIGHT)
            visible = _mask_mod_visible(visible, offs_m[:, None], cur_n[None, :], off_z, off_h, mask_args, N_Q, N_K,
                                        MASK_MOD)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, stream, offs_m[:, None] + dropout_row0, cur_n[None, :], dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        ds = _score_grad(ds, tanh_s, s_in, offs_m[:, None], cur_n[None, :], off_z, off_h, score_args, (), N_Q, N_K,
                         HAS_SOFTCAP, SCORE_MOD_BWD, False)
        if SCORE_MOD_BWD is not None and MASKED:
            ds = tl.where(visible, ds, 0.0)
        dq = tl.dot(ds.to(k.dtype), k, acc=dq, input_precision=DOT_PRECISION, out_dtype=dq.dtype)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, CU_SEQLENS_Q, CU_SEQLENS_K, ALIBI_SLOPES, SEED, BLOCK_MASK,
                 sm_scale, softcap, dropout_p, window_left, window_right,
                 stride_qz, stride_qh, stride_qm, stride_qk,
                 stride_kz, stride_kh, stride_kn, stride_kk,
                 stride_vz, stride_vh, stride_vn, stride_vk,
                 stride_doz, stride_doh, stride_dom, stride_dok,
                 stride_dqz, stride_dqh, stride_dqm, stride_dqk,
                 stride_lz, stride_lh, stride_az, stride_ah,
                 stride_bmk, stride_bmz, stride_bmh, stride_bmr,
                 H_Q, GROUP_SIZE, N_Q, N_K, score_args, mask_args,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                 HEAD_DIM_V_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                 HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr,
                 UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
                 SCORE_MOD: tl.constexpr = None, SCORE_MOD_BWD: tl.constexpr = None, MASK_MOD: tl.constexpr = None,
                 MASK_BLOCK_M: tl.constexpr = 0, MASK_BLOCK_N: tl.constexpr = 0):
    """One program: BLOCK_M query rows of one (batch, query head); the forward's loop, differentiated."""
    num_m_blocks = tl.cdiv(N_Q, BLOCK_M)
    off_zh = tl.program_id(0) // num_m_blocks
    block_m = tl.program_id(0) % num_m_blocks
    if IS_CAUSAL:
        block_m = num_m_blocks - 1 - block_m  # heaviest query blocks first, as in the forward
    start_m = block_m * BLOCK_M
    off_z = (off_zh // H_Q).to(tl.int64)
    off_h = (off_zh % H_Q).to(tl.int64)
    off_kvh = off_h // GROUP_SIZE
    q_start, k_start, seqlen_q, seqlen_k = _sequence_bounds(CU_SEQLENS_Q, CU_SEQLENS_K, off_z, N_Q, N_K, IS_VARLEN)
    stream = off_zh  # dropout counters, as in the forward
    if IS_VARLEN:
        if start_m >= seqlen_q:
            return
        stream = off_h
    PAD_D: tl.constexpr = HEAD_DIM != HEAD_DIM_PAD
    PAD_DV: tl.constexpr = HEAD_DIM_V != HEAD_DIM_V_PAD
    MASK_RIGHT: tl.constexpr = IS_CAUSAL or HAS_WINDOW
    offset = seqlen_k - seqlen_q

    rows = tl.arange(0, BLOCK_M)
    offs_m = start_m + rows
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)  # q and k's head dim
    offs_dv = tl.arange(0, HEAD_DIM_V_PAD)  # v and dO's
    q_row0 = q_start + start_m.to(tl.int64)  # 64-bit block start, 32-bit offsets within the block
    q = _load_tile(Q + off_z * stride_qz + off_h * stride_qh + q_row0 * stride_qm + rows[:, None] * stride_qm
                   + offs_d[None, :] * stride_qk, offs_m, seqlen_q, offs_d, HEAD_DIM, True, PAD_D, UPCAST)
    do = _load_tile(DO + off_z * stride_doz + off_h * stride_doh + q_row0 * stride_dom + rows[:, None] * stride_dom
                    + offs_dv[None, :] * stride_dok, offs_m, seqlen_q, offs_dv, HEAD_DIM_V, True, PAD_DV, UPCAST)
    row = off_z * stride_lz + off_h * stride_lh + q_start + offs_m
    # Rows past N_Q get lse = +inf, so their recomputed P is 0.
    lse = tl.load(LSE + row, mask=offs_m < seqlen_q, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + row, mask=offs_m < seqlen_q, other=0.0)
    k_ptrs = (K + off_z * stride_kz + off_kvh * stride_kh + k_start * stride_kn
              + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kk)
    v_ptrs = (V + off_z * stride_vz + off_kvh * stride_vh + k_start * stride_vn
              + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vk)
    alibi_slope = 0.0
    if HAS_ALIBI:
        alibi_slope = tl.load(ALIBI_SLOPES + off_z * stride_az + off_h * stride_ah)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=ACC_DTYPE)

    # The forward's stages (kernels/flash_fwd.py): a block mask's partly and wholly visible key
    # blocks; or the masked left edge, the unmasked middle (masked too with a mask_mod), and the
    # masked diagonal and ragged end.
    if MASK_BLOCK_N > 0:
        mask_row = BLOCK_MASK + off_z * stride_bmz + off_h * stride_bmh + (start_m // MASK_BLOCK_M) * stride_bmr
        NUM_STAGES: tl.constexpr = 2
    else:
        lo, full_lo, full_hi, hi = _key_range(start_m, seqlen_q, seqlen_k, window_left, window_right,
                                              BLOCK_M, BLOCK_N, HAS_WINDOW, MASK_RIGHT)
        NUM_STAGES: tl.constexpr = 3
    for stage in tl.static_range(NUM_STAGES):
        if MASK_BLOCK_N > 0:
            kv_list = mask_row + stage * stride_bmk
            stage_lo, stage_hi = 0, tl.load(kv_list) * (MASK_BLOCK_N // BLOCK_N)
            MASKED = stage == 0
        else:
            kv_list = BLOCK_MASK
            stage_lo, stage_hi = _stage_range(stage, lo, full_lo, full_hi, hi)
            MASKED = stage != 1 or MASK_MOD is not None
        dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n, offs_d,
                                offs_dv, stage_lo, stage_hi, seqlen_q, seqlen_k, offset, sm_scale, softcap,
                                alibi_slope, window_left, window_right, seed, stream, q_start, dropout_p, off_z, off_h,
                                score_args, mask_args, kv_list, HEAD_DIM, HEAD_DIM_V, PAD_D, PAD_DV, BLOCK_N,
                                HAS_WINDOW and MASK_BLOCK_N == 0, MASK_RIGHT and MASK_BLOCK_N == 0, HAS_SOFTCAP,
                                HAS_ALIBI, HAS_DROPOUT, MASKED, UPCAST, DOT_PRECISION, SCORE_MOD, SCORE_MOD_BWD,
                                MASK_MOD, MASK_BLOCK_N)
    dq = dq * sm_scale
    tl.store(DQ + off_z * stride_dqz + off_h * stride_dqh + q_row0 * stride_dqm + rows[:, None] * stride_dqm
             + offs_d[None, :] * stride_dqk, _cast_for_store(dq, DQ.dtype.element_ty, UPCAST),
             mask=(offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM))
