"""Functional attention in plain PyTorch: the ground truth every kernel is held to.

All tensors use the layout of `F.scaled_dot_product_attention`:
    q: (B, Hq, Nq, D)    k: (B, Hkv, Nk, D)    v: (B, Hkv, Nk, Dv)    output: (B, Hq, Nq, Dv)
with Hq a multiple of Hkv (grouped-query attention; Hkv == 1 is multi-query), and Dv = D
except in models such as DeepSeek's MLA (prefill: D = 192, Dv = 128).

Causal masking is aligned bottom-right, as in FlashAttention 2 and SDPA's
`causal_lower_right`: query i may see key j when j <= i + (Nk - Nq). With
Nq == Nk this is the usual lower triangle; with Nq < Nk (decoding with a
cache) the last query sees every key; with Nq > Nk the first Nq - Nk queries
see no key at all, and their output is defined as 0.
"""
import math

import torch


def check_attention_inputs(q, k, v):
    """Raise a clear error, naming the argument, for inputs attention cannot take."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have rank 4 (batch, heads, tokens, head_dim), got shape {tuple(t.shape)}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"k and v must have the same shape but for the head dim (MLA's values are narrower), "
                         f"got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must have the same head_dim, got {q.shape[3]} and {k.shape[3]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"the number of query heads ({q.shape[1]}) must be a multiple of the number of kv heads ({k.shape[1]})"
        )


def causal_visibility(n_q: int, n_k: int, device=None) -> torch.Tensor:
    """(Nq, Nk) bool: True where query i may see key j, aligned bottom-right (j <= i + Nk - Nq)."""
    return torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril(diagonal=n_k - n_q)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Repeat each kv head n_rep times, as Llama does: (B, Hkv, N, D) -> (B, Hkv * n_rep, N, D).

    Query head h then meets kv head h // n_rep. This copies K and V; the
    Triton kernel reaches the same kv head through its index instead.
    """
    if n_rep == 1:
        return x
    b, h_kv, n, d = x.shape
    # (B, Hkv, N, D) -> (B, Hkv, n_rep, N, D) -> (B, Hkv * n_rep, N, D)
    return x[:, :, None].expand(b, h_kv, n_rep, n, d).reshape(b, h_kv * n_rep, n, d)


def window_visibility(n_q: int, n_k: int, window_size, device=None) -> torch.Tensor:
    """(Nq, Nk) bool: query i sees key j when i + off - left <= j <= i + off + right, off = Nk - Nq.

    window_size = (left, right), None (or -1, FlashAttention's spelling) on a side
    meaning unlimited: Mistral's sliding window is (W - 1, 0) with causal.
    """
    left, right = window_size
    i = torch.arange(n_q, device=device)[:, None] + (n_k - n_q)  # each query's aligned diagonal
    j = torch.arange(n_k, device=device)[None, :]
    visible = torch.ones(n_q, n_k, dtype=torch.bool, device=device)
    if left is not None and left >= 0:
        visible &= j >= i - left
    if right is not None and right >= 0:
        visible &= j <= i + right
    return visible


def alibi_bias(alibi_slopes: torch.Tensor, n_q: int, n_k: int, dtype) -> torch.Tensor:
    """ALiBi (BLOOM, MPT): -slope * |i + Nk - Nq - j|, FlashAttention's convention.

    alibi_slopes (Hq,) or (B, Hq) -> bias (1 or B, Hq, Nq, Nk).
    """
    slopes = alibi_slopes.to(dtype)
    slopes = slopes[None] if slopes.dim() == 1 else slopes  # (Hq,) -> (1, Hq)
    i = torch.arange(n_q, device=slopes.device, dtype=dtype)[:, None] + (n_k - n_q)
    j = torch.arange(n_k, device=slopes.device, dtype=dtype)[None, :]
    return -slopes[:, :, None, None] * (i - j).abs()  # (b, Hq, 1, 1) * (Nq, Nk)


def naive_attention(q, k, v, causal=False, sm_scale=None, dtype=None, *, window_size=None, softcap=None,
                    alibi_slopes=None, sinks=None, dropout_mask=None, dropout_p=0.0, p_dtype=None, return_lse=False):
    """softmax(q k^T * sm_scale) v, materialising the full (Nq, Nk) score matrix.

    dtype: compute (and return) in this dtype, e.g. torch.float64 for the
    reference the tolerance rule measures against. By default, q's dtype.

    The variants, applied in FlashAttention's order to the scaled scores s:
      softcap       s = softcap * tanh(s / softcap)              (Gemma 2)
      alibi_slopes  s = s - slope * |i + Nk - Nq - j|             (BLOOM, MPT)
      causal, window_size   masked keys get -inf                  (Mistral: window (W - 1, 0))
      sinks         one logit per head that joins each row's softmax normaliser
                    but has no value (gpt-oss); a row with no visible key then
                    outputs 0 with lse = the sink
      dropout_mask  bool (B, Hq, Nq, Nk), True = kept: P * mask / (1 - dropout_p)
      p_dtype       round the unnormalised probabilities exp(s - row max) to this dtype before
                    P.V, dividing by their unrounded sum after (what an fp8 kernel does: reference/fp8.py)
    With return_lse, also the natural-log normaliser of each row (the sink included).
    """
    check_attention_inputs(q, k, v)
    if dtype is not None:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    n_q, n_k = q.shape[2], k.shape[2]
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    v = repeat_kv(v, q.shape[1] // v.shape[1])

    scores = (q @ k.transpose(-2, -1)) * sm_scale  # (B, Hq, Nq, Nk)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, n_q, n_k, scores.dtype)
    visible = None
    if causal:
        visible = causal_visibility(n_q, n_k, q.device)
    if window_size is not None:
        window = window_visibility(n_q, n_k, window_size, q.device)
        visible = window if visible is None else visible & window
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        # (Hq,) -> (B, Hq, Nq, 1): one more column that joins the softmax and is then dropped.
        sink_column = sinks.to(scores.dtype)[None, :, None, None].expand(*scores.shape[:3], 1)
        scores = torch.cat([scores, sink_column], dim=-1)
    lse = torch.logsumexp(scores, dim=-1)  # (B, Hq, Nq)
    if p_dtype is None:
        weights = torch.softmax(scores, dim=-1)
    else:
        row_max = scores.amax(dim=-1, keepdim=True)
        p = torch.exp(scores - row_max.masked_fill(row_max == float("-inf"), 0.0))
        weights = p.to(p_dtype).to(p.dtype) / p.sum(dim=-1, keepdim=True)
    if sinks is not None:
        weights = weights[..., :-1]
    if visible is not None:
        # A row with no visible key (and no sink) is softmax over all -inf, which is NaN; define it as 0.
        weights = weights.masked_fill(~visible.any(dim=-1, keepdim=True), 0.0)
    if dropout_mask is not None:
        weights = weights * dropout_mask.to(weights.dtype) / (1.0 - dropout_p)
    out = weights @ v
    return (out, lse) if return_lse else out


def naive_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=False, sm_scale=None, dtype=None,
                           **options):
    """Packed sequences, attended one at a time: q (total_q, Hq, D), k and v (total_k, Hkv, D).

    Sequence b owns rows cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q (and likewise
    for k, v); it never sees another sequence's keys. Options are those of
    `naive_attention`; alibi_slopes may be (B, Hq) and dropout_mask is a list
    with one (1, Hq, Nq_b, Nk_b) mask per sequence. Returns (total_q, Hq, D),
    and with return_lse also the lse as (Hq, total_q), FlashAttention's varlen layout.
    """
    out, lse = [], []
    dropout_masks = options.pop("dropout_mask", None)
    slopes = options.pop("alibi_slopes", None)
    return_lse = options.pop("return_lse", False)
    for b in range(len(cu_seqlens_q) - 1):
        q_b = q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]]
        k_b = k[cu_seqlens_k[b]:cu_seqlens_k[b + 1]]
        v_b = v[cu_seqlens_k[b]:cu_seqlens_k[b + 1]]
        # (N_b, H, D) -> (1, H, N_b, D)
        q_b, k_b, v_b = (t.transpose(0, 1)[None] for t in (q_b, k_b, v_b))
        slopes_b = None if slopes is None else (slopes[b] if slopes.dim() == 2 else slopes)
        mask_b = None if dropout_masks is None else dropout_masks[b]
        o_b, lse_b = naive_attention(q_b, k_b, v_b, causal, sm_scale, dtype, alibi_slopes=slopes_b,
                                     dropout_mask=mask_b, return_lse=True, **options)
        out.append(o_b[0].transpose(0, 1))  # (1, H, N_b, D) -> (N_b, H, D)
        lse.append(lse_b[0])  # (1, H, N_b) -> (H, N_b)
    out = torch.cat(out, dim=0)
    return (out, torch.cat(lse, dim=1)) if return_lse else out
