"""Flash attention in plain PyTorch: the blueprint of the Triton kernel.

This computes exactly what `naive_attention` computes, but the way
`kernels/flash_attention.py` does: one query block at a time, walking the key
blocks with an online softmax, so the (Nq, Nk) score matrix only ever exists
one (BLOCK_M, BLOCK_N) tile at a time. The names (`m_i`, `l_i`, `acc`,
`qk_scale`, `start_m`, `start_n`) are the kernel's, so the two read side by
side. Where the kernel runs one program per (query block, batch*head), this
loops over query blocks and lets PyTorch broadcast over batch and heads.

The online-softmax step, for one query row and a new key block with scores s:
    m_new = max(m_i, max(s))
    p     = exp(s - m_new)                 # this block's unnormalised weights
    alpha = exp(m_i - m_new)               # rescales everything summed under m_i
    l_i   = l_i * alpha + sum(p)
    acc   = acc * alpha + p @ v
and after the last block  output = acc / l_i,  lse = m_i + log(l_i).
The kernel uses exp2, which is a single hardware instruction: with
qk_scale = sm_scale * LOG2E, exp(x * sm_scale) == exp2(x * qk_scale), so all
maxima live in base-2 units and the natural lse is (m_i + log2(l_i)) * LN2.
"""
import math

import torch

from .functional import check_attention_inputs

LOG2E = 1.4426950408889634  # 1 / ln 2, so exp(x) == exp2(x * LOG2E)
LN2 = 0.6931471805599453  # ln 2, so log(x) == log2(x) * LN2


def causal_key_bounds(start_m, block_m, block_n, n_q, n_k):
    """Which key blocks a causal query block [start_m, start_m + block_m) needs.

    Returns (full_end, end): key blocks starting before `full_end` are wholly
    visible to every query of the block (no mask needed); blocks in
    [full_end, end) straddle the diagonal (element mask needed); blocks from
    `end` on are wholly above the diagonal and are never visited.
    With bottom-right alignment, query i sees keys j <= i + (n_k - n_q).
    """
    offset = n_k - n_q
    # The last query of the block sees keys up to start_m + block_m - 1 + offset.
    end = min(n_k, max(0, start_m + block_m + offset))
    # A key block [s, s + block_n) is wholly visible if its last key is seen by
    # the block's first query: s + block_n - 1 <= start_m + offset.
    full_end = max(0, (start_m + offset + 1) // block_n * block_n)
    return min(full_end, end), end


def tiled_flash_attention(q, k, v, causal=False, sm_scale=None, block_m=64, block_n=64, return_lse=False):
    """Flash attention forward, tile by tile. Returns o (and the natural-log lse)."""
    check_attention_inputs(q, k, v)
    batch, h_q, n_q, head_dim = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    group = h_q // h_kv
    sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    qk_scale = sm_scale * LOG2E
    # Accumulate in fp32 like the kernel (or in float64 when given float64).
    acc_dtype = torch.promote_types(q.dtype, torch.float32)

    # GQA without copying K and V: query head h = kv_head * group + g, so
    # (B, Hq, N, D) -> (B, Hkv, group, N, D) lines each query head up with its
    # kv head, and k[:, :, None] broadcasts over the group.
    q = q.reshape(batch, h_kv, group, n_q, head_dim)
    k = k[:, :, None]  # (B, Hkv, 1, Nk, D)
    v = v[:, :, None]  # (B, Hkv, 1, Nk, D)
    o = torch.empty_like(q)
    lse = torch.empty(batch, h_kv, group, n_q, dtype=acc_dtype, device=q.device)

    for start_m in range(0, n_q, block_m):  # the kernel's program id along the queries
        q_blk = q[..., start_m:start_m + block_m, :].to(acc_dtype)  # (B, Hkv, group, BLOCK_M, D)
        offs_m = torch.arange(start_m, start_m + q_blk.shape[-2], device=q.device)
        m_i = torch.full(q_blk.shape[:-1], float("-inf"), dtype=acc_dtype, device=q.device)  # running max (base 2)
        l_i = torch.zeros(q_blk.shape[:-1], dtype=acc_dtype, device=q.device)  # running normaliser
        acc = torch.zeros_like(q_blk)  # unnormalised output

        end = n_k
        if causal:
            _, end = causal_key_bounds(start_m, block_m, block_n, n_q, n_k)
        for start_n in range(0, end, block_n):  # the kernel's inner loop
            k_blk = k[..., start_n:start_n + block_n, :].to(acc_dtype)
            v_blk = v[..., start_n:start_n + block_n, :].to(acc_dtype)
            qk = (q_blk @ k_blk.transpose(-2, -1)) * qk_scale  # (..., BLOCK_M, BLOCK_N)
            if causal:
                offs_n = torch.arange(start_n, start_n + k_blk.shape[-2], device=q.device)
                visible = offs_n[None, :] <= offs_m[:, None] + (n_k - n_q)
                qk = qk.masked_fill(~visible, float("-inf"))
            m_new = torch.maximum(m_i, qk.amax(dim=-1))
            # A row that has seen no visible key yet keeps m = -inf; subtracting
            # 0 instead keeps exp2(-inf - -inf) = NaN out of p and alpha.
            m_safe = torch.where(m_new == float("-inf"), 0.0, m_new)
            p = torch.exp2(qk - m_safe[..., None])
            alpha = torch.exp2(m_i - m_safe)  # rescales what was summed under the old max
            l_i = l_i * alpha + p.sum(dim=-1)
            acc = acc * alpha[..., None] + p @ v_blk
            m_i = m_new

        # Normalise once at the end. A row with no visible key has l_i == 0 and acc == 0: output 0, lse -inf.
        no_key = l_i == 0
        o[..., start_m:start_m + block_m, :] = (acc / torch.where(no_key, 1.0, l_i)[..., None]).to(o.dtype)
        lse[..., start_m:start_m + block_m] = torch.where(no_key, float("-inf"), (m_i + torch.log2(l_i)) * LN2)

    o = o.reshape(batch, h_q, n_q, head_dim)  # (B, Hkv, group, Nq, D) -> (B, Hq, Nq, D)
    lse = lse.reshape(batch, h_q, n_q)
    return (o, lse) if return_lse else o


def tiled_flash_attention_backward(q, k, v, o, lse, do, causal=False, sm_scale=None, block_m=64, block_n=64):
    """dq, dk, dv of flash attention, tile by tile: the blueprint of the backward kernels.

    With S = q k^T * sm_scale and P = softmax(S), the gradients are
        dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   delta = rowsum(dO * O),
        dQ = dS K * sm_scale,   dK = dS^T Q * sm_scale.
    P is never stored: each tile is recomputed from the forward's lse as
    exp2(qk * qk_scale - lse * LOG2E). Two loop nests, like the two kernels:
    one per key block accumulates dK and dV over the query blocks (and over
    every query head of its GQA group, in order, so nothing needs atomics);
    one per query block accumulates dQ over the key blocks.
    """
    check_attention_inputs(q, k, v)
    batch, h_q, n_q, head_dim = q.shape
    h_kv, n_k = k.shape[1], k.shape[2]
    group = h_q // h_kv
    sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    qk_scale = sm_scale * LOG2E
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    offset = n_k - n_q  # causal: query i sees keys j <= i + offset

    # (B, Hq, N, ...) -> (B, Hkv, group, N, ...): query heads lined up with their kv head.
    q, o, do = (t.to(acc_dtype).reshape(batch, h_kv, group, n_q, head_dim) for t in (q, o, do))
    k, v = k.to(acc_dtype)[:, :, None], v.to(acc_dtype)[:, :, None]  # (B, Hkv, 1, Nk, D)
    lse2 = lse.to(acc_dtype).reshape(batch, h_kv, group, n_q) * LOG2E  # base-2 units, like qk
    delta = (do * o).sum(dim=-1)  # (B, Hkv, group, Nq): the kernels' _attn_bwd_preprocess
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k[:, :, 0]), torch.zeros_like(v[:, :, 0])

    def recompute_p(start_m, start_n, qk):
        """P tile from the saved lse; 0 where the causal mask hides a key (also on rows that see none)."""
        p = torch.exp2(qk - lse2[..., start_m:start_m + qk.shape[-2], None])
        if causal:
            offs_m = torch.arange(start_m, start_m + qk.shape[-2], device=q.device)
            offs_n = torch.arange(start_n, start_n + qk.shape[-1], device=q.device)
            p = torch.where(offs_n[None, :] <= offs_m[:, None] + offset, p, 0.0)
        return p

    # dK and dV: one "program" per key block, walking the query blocks that see it.
    for start_n in range(0, n_k, block_n):
        k_blk, v_blk = k[..., start_n:start_n + block_n, :], v[..., start_n:start_n + block_n, :]
        first_m = (max(0, start_n - offset) // block_m) * block_m if causal else 0
        for start_m in range(first_m, n_q, block_m):
            rows = slice(start_m, start_m + block_m)
            p = recompute_p(start_m, start_n, (q[..., rows, :] @ k_blk.transpose(-2, -1)) * qk_scale)
            ds = p * (do[..., rows, :] @ v_blk.transpose(-2, -1) - delta[..., rows, None])
            # .sum(2) adds the group's query heads into their shared kv head, in a fixed order.
            dv[..., start_n:start_n + block_n, :] += (p.transpose(-2, -1) @ do[..., rows, :]).sum(2)
            dk[..., start_n:start_n + block_n, :] += (ds.transpose(-2, -1) @ q[..., rows, :]).sum(2) * sm_scale

    # dQ: one "program" per query block, walking the key blocks it sees (the forward's loop).
    for start_m in range(0, n_q, block_m):
        rows = slice(start_m, start_m + block_m)
        end = causal_key_bounds(start_m, block_m, block_n, n_q, n_k)[1] if causal else n_k
        for start_n in range(0, end, block_n):
            k_blk, v_blk = k[..., start_n:start_n + block_n, :], v[..., start_n:start_n + block_n, :]
            p = recompute_p(start_m, start_n, (q[..., rows, :] @ k_blk.transpose(-2, -1)) * qk_scale)
            ds = p * (do[..., rows, :] @ v_blk.transpose(-2, -1) - delta[..., rows, None])
            dq[..., rows, :] += (ds @ k_blk) * sm_scale

    # (B, Hkv, group, Nq, D) -> (B, Hq, Nq, D)
    return dq.reshape(batch, h_q, n_q, head_dim), dk, dv


def band_key_bounds(start_m, block_m, block_n, n_q, n_k, left=None, right=None):
    """Which key blocks a query block needs when each query sees a band of keys (kernels/tiles.py: _key_range).

    Query i sees keys i + off - left .. i + off + right, off = n_k - n_q, a side
    being unlimited when None; causal is right = 0. Returns (lo, full_lo,
    full_hi, hi): key blocks in [lo, full_lo) and [full_hi, hi) are partly
    visible (masked), blocks in [full_lo, full_hi) wholly visible to every row
    of the block, and the rest are never loaded. With a window of W keys the
    block visits about (block_m + W) / block_n key blocks whatever n_k is:
    the cost grows as N * W, not N^2.
    """
    offset, last_m = n_k - n_q, start_m + block_m - 1
    # Some row of the block sees [first_seen, last_seen]; every row sees [first_full, last_full].
    first_seen = 0 if left is None else start_m + offset - left
    first_full = 0 if left is None else last_m + offset - left
    last_seen = n_k if right is None else last_m + offset + right
    last_full = n_k if right is None else start_m + offset + right
    lo = max(first_seen, 0) // block_n * block_n
    hi = min(n_k, max(last_seen + 1, 0))
    full_lo = -(-max(first_full, 0) // block_n) * block_n
    full_hi = min(max(last_full + 1, 0) // block_n * block_n, n_k // block_n * block_n)
    full_lo = min(max(full_lo, lo), hi)
    full_hi = min(max(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi
