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
exp(x * sm_scale) = exp2(x * sm_scale * LOG2E), so the kernel folds LOG2E
into the scale once (qk_scale) and keeps m_i in base-2 units.

Reading guide: `reference/tiled.py` is this forward pass in plain PyTorch,
with the same names (m_i, l_i, acc, qk_scale, start_m, start_n). The launcher,
`_flash_fwd` in `kernels/flash_attention.py`, checks the inputs and builds the grid.
"""
import triton
import triton.language as tl

from .tiles import LN2, _causal_key_range, _load_tile


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
