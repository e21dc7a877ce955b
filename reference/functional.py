"""Functional attention in plain PyTorch: the ground truth every kernel is held to.

All tensors use the layout of `F.scaled_dot_product_attention`:
    q: (B, Hq, Nq, D)    k, v: (B, Hkv, Nk, D)    output: (B, Hq, Nq, D)
with Hq a multiple of Hkv (grouped-query attention; Hkv == 1 is multi-query).

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
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
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


def naive_attention(q, k, v, causal=False, sm_scale=None, dtype=None):
    """softmax(q k^T * sm_scale) v, materialising the full (Nq, Nk) score matrix.

    dtype: compute (and return) in this dtype, e.g. torch.float64 for the
    reference the tolerance rule measures against. By default, q's dtype.
    """
    check_attention_inputs(q, k, v)
    if dtype is not None:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    v = repeat_kv(v, q.shape[1] // v.shape[1])

    scores = (q @ k.transpose(-2, -1)) * sm_scale  # (B, Hq, Nq, Nk)
    if causal:
        visible = causal_visibility(q.shape[2], k.shape[2], q.device)
        scores = scores.masked_fill(~visible, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if causal:
        # A row with no visible key is softmax over all -inf, which is NaN; define it as 0.
        weights = weights.masked_fill(~visible.any(dim=-1, keepdim=True), 0.0)
    return weights @ v
