"""The plain PyTorch twin of kernels/mods.py: the same patterns, the same names, as ordinary functions.

Each constructor returns a FlexAttention-style function,

    mask_mod(b, h, q_idx, kv_idx) -> bool           score_mod(score, b, h, q_idx, kv_idx) -> score

written with tensor operations only, so it works on index tensors that
broadcast (q_idx (Nq, 1) and kv_idx (1, Nk), b (B, 1, 1, 1), h (1, H, 1, 1):
`dense_mask` and `apply_score_mod` build the full (B, H, Nq, Nk) mask and
scores the float64 reference uses) and, unchanged, as a mod of
torch.nn.attention.flex_attention, which calls it on scalar indices.

Positions follow FlexAttention (q_idx and kv_idx from 0); `offset` puts query
i at key position i + offset, offset = Nk - Nq being FlashAttention's
bottom-right alignment. A position outside an id array has no id: it matches
nothing.
"""
import math

import torch

from .functional import check_attention_inputs, repeat_kv


# ----------------------------------------------------------------------------
# Mask mods
# ----------------------------------------------------------------------------
def causal(offset=0):
    def causal_mask(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset
    return causal_mask


def sliding_window(left, right=0, offset=0):
    """None (or -1) leaves a side unlimited."""
    def sliding_window_mask(b, h, q_idx, kv_idx):
        diagonal = q_idx + offset
        visible = kv_idx >= 0  # all True, shaped like kv_idx
        if left is not None and left != -1:
            visible = visible & (kv_idx >= diagonal - left)
        if right is not None and right != -1:
            visible = visible & (kv_idx <= diagonal + right)
        return visible
    return sliding_window_mask


def prefix_lm(prefix_length, offset=0):
    """prefix_length: an int, or a (B,) tensor of one length per sequence."""
    def prefix_lm_mask(b, h, q_idx, kv_idx):
        prefix = prefix_length[b] if isinstance(prefix_length, torch.Tensor) else prefix_length
        return (kv_idx < prefix) | (kv_idx <= q_idx + offset)
    return prefix_lm_mask


def _id_at(ids, b, position):
    """ids[b, position] of a (N,) or (B, N) id array, and whether position lies inside it."""
    n = ids.shape[-1]
    inside = (position >= 0) & (position < n)
    clamped = position.clamp(0, n - 1)
    row = ids if ids.dim() == 2 else ids[None]  # (N,) -> (1, N): one row for every sequence
    value = row[b if row.shape[0] > 1 else b * 0, clamped]
    return value, inside


def document(doc_ids, kv_doc_ids=None, causal=False, offset=0):
    """A query sees the keys of its own document (and only earlier ones, if causal)."""
    kv_ids, q_shift = (doc_ids, offset) if kv_doc_ids is None else (kv_doc_ids, 0)

    def document_mask(b, h, q_idx, kv_idx):
        q_doc, q_inside = _id_at(doc_ids, b, q_idx + q_shift)
        kv_doc, kv_inside = _id_at(kv_ids, b, kv_idx)
        visible = (q_doc == kv_doc) & q_inside & kv_inside
        if causal:
            visible = visible & (kv_idx <= q_idx + offset)
        return visible
    return document_mask


def chunked(chunk_size, offset=0):
    """Llama 4: causal inside chunks of chunk_size positions."""
    def chunked_mask(b, h, q_idx, kv_idx):
        q_pos = q_idx + offset
        same_chunk = torch.div(q_pos, chunk_size, rounding_mode="floor") == torch.div(kv_idx, chunk_size,
                                                                                      rounding_mode="floor")
        return (kv_idx <= q_pos) & same_chunk
    return chunked_mask


def bidirectional_spans(span_ids, offset=0):
    """Gemma 3: causal, and tokens of the same nonzero span (one image) see each other."""
    def bidirectional_spans_mask(b, h, q_idx, kv_idx):
        q_pos = q_idx + offset
        q_span, q_inside = _id_at(span_ids, b, q_pos)
        kv_span, kv_inside = _id_at(span_ids, b, kv_idx)
        same_span = (q_span == kv_span) & (q_span != 0) & q_inside & kv_inside
        return (kv_idx <= q_pos) | same_span
    return bidirectional_spans_mask


def tree(ancestors, prefix=0):
    """Draft token i sees the `prefix` cached keys and key prefix + j where ancestors[(b,) i, j]."""
    def tree_mask(b, h, q_idx, kv_idx):
        n = ancestors.shape[-1]
        j = kv_idx - prefix
        in_tree = (j >= 0) & (j < n) & (q_idx < n)
        table = ancestors if ancestors.dim() == 3 else ancestors[None]  # (N, N) -> (1, N, N)
        is_ancestor = table[b if table.shape[0] > 1 else b * 0, q_idx.clamp(0, n - 1), j.clamp(0, n - 1)]
        return (kv_idx < prefix) | (in_tree & (is_ancestor != 0))
    return tree_mask


# ----------------------------------------------------------------------------
# Score mods
# ----------------------------------------------------------------------------
def t5_bucket(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
    """T5's bucket of each relative position (key position minus query position), as Hugging Face computes it.

    Bidirectional: half the buckets for keys after the query. Distances below
    max_exact = (buckets of a side) // 2 get their own bucket; larger ones share
    logarithmically wider buckets up to max_distance, and beyond it the last one.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).to(relative_position.dtype) * num_buckets
        distance = relative_position.abs()
    else:
        distance = -torch.clamp(relative_position, max=0)  # keys after the query: distance 0
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # float32, as T5 computes it, so the truncation lands where it lands in the original.
    large = max_exact + (torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).to(relative_position.dtype)
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


def t5_relative_bias(table, bidirectional=True, num_buckets=None, max_distance=128, offset=0):
    """score + table[h, bucket(kv - (q + offset))], table (Hq, num_buckets)."""
    num_buckets = table.shape[1] if num_buckets is None else num_buckets

    def t5_bias(score, b, h, q_idx, kv_idx):
        bucket = t5_bucket(kv_idx - (q_idx + offset), bidirectional, num_buckets, max_distance)
        return score + table[h, bucket]
    return t5_bias


def alibi(slopes, offset=0):
    """score - slope * |q + offset - kv|, slopes (Hq,) or (B, Hq)."""
    def alibi_bias(score, b, h, q_idx, kv_idx):
        slope = slopes[h] if slopes.dim() == 1 else slopes[b, h]
        return score - slope * (q_idx + offset - kv_idx).abs()
    return alibi_bias


def softcap(value):
    def softcap_score(score, b, h, q_idx, kv_idx):
        return value * torch.tanh(score / value)
    return softcap_score


# ----------------------------------------------------------------------------
# Dense forms and the attention that uses them
# ----------------------------------------------------------------------------
def index_grids(batch, heads, n_q, n_k, device=None):
    """b (B, 1, 1, 1), h (1, H, 1, 1), q_idx (Nq, 1), kv_idx (1, Nk): they broadcast to (B, H, Nq, Nk)."""
    b = torch.arange(batch, device=device).view(batch, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, heads, 1, 1)
    q_idx = torch.arange(n_q, device=device).view(n_q, 1)
    kv_idx = torch.arange(n_k, device=device).view(1, n_k)
    return b, h, q_idx, kv_idx


def dense_mask(mask_mod, batch, heads, n_q, n_k, device=None):
    """(B, H, Nq, Nk) bool: mask_mod evaluated on every (b, h, query, key)."""
    visible = mask_mod(*index_grids(batch, heads, n_q, n_k, device))
    return torch.as_tensor(visible, device=device).expand(batch, heads, n_q, n_k)


def apply_score_mod(score_mod, scores):
    """score_mod on every score of a (B, H, Nq, Nk) tensor, returned in the scores' dtype."""
    b, h, q_idx, kv_idx = index_grids(*scores.shape, scores.device)
    return score_mod(scores, b, h, q_idx, kv_idx).to(scores.dtype).expand(scores.shape)


def naive_attention_mods(q, k, v, score_mod=None, mask_mod=None, sm_scale=None, dtype=None, *, attn_mask=None,
                         attn_bias=None, return_lse=False):
    """softmax(score_mod(q k^T * sm_scale) masked by mask_mod) v on the full score matrix: the mods' reference.

    score_mod, mask_mod: the functions of this module (or any of FlexAttention's signature).
    attn_mask (bool, True = visible) and attn_bias (added) broadcast to (B, Hq, Nq, Nk), as in SDPA.
    dtype: compute in it (float64 for the tolerance rule's reference). A row that sees no key
    outputs 0 with lse -inf, as the kernels define it.
    """
    check_attention_inputs(q, k, v)
    if dtype is not None:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    batch, heads, n_q, n_k = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    k = repeat_kv(k, heads // k.shape[1])  # (B, Hkv, Nk, D) -> (B, Hq, Nk, D)
    v = repeat_kv(v, heads // v.shape[1])
    scores = (q @ k.transpose(-2, -1)) * sm_scale  # (B, Hq, Nq, Nk)
    if score_mod is not None:
        scores = apply_score_mod(score_mod, scores)
    if attn_bias is not None:
        scores = scores + attn_bias.to(scores.dtype)
    visible = torch.ones(batch, heads, n_q, n_k, dtype=torch.bool, device=q.device)
    if mask_mod is not None:
        visible = visible & dense_mask(mask_mod, batch, heads, n_q, n_k, q.device)
    if attn_mask is not None:
        visible = visible & attn_mask
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, Hq, Nq)
    # A row with no visible key is softmax over all -inf, NaN: define it as 0.
    weights = torch.softmax(scores, dim=-1).masked_fill(~visible.any(dim=-1, keepdim=True), 0.0)
    out = weights @ v
    return (out, lse) if return_lse else out
