"""Grouped-query attention with rotary position embeddings, as in Llama 3.

Grouped-query attention (GQA): num_heads query heads, but only num_kv_groups
key/value heads, each shared by a group of num_heads // num_kv_groups query
heads (query head h uses kv head h // group). During generation the kv cache
is what fills memory, and it shrinks by that group factor, at a small cost in
quality. num_kv_groups == num_heads is ordinary multi-head attention;
num_kv_groups == 1 is multi-query attention.

Rotary position embeddings (RoPE): instead of adding a position vector to x,
rotate q and k. Feature pair i of a vector at position m is rotated by the
angle m * theta^(-2i / head_dim). A rotation by m followed by a dot product
with a vector rotated by n depends on m - n only, so the scores see relative
positions, and v is left alone. theta sets the slowest frequency: Llama 2
used 10_000, Llama 3 uses 500_000 for longer contexts.

Which features form a pair is a convention. Meta's Llama code pairs adjacent
features (2i, 2i+1), as complex numbers. Hugging Face's LlamaAttention, which
this module follows, pairs feature i with feature i + head_dim/2
(`rotate_half`); HF's checkpoint converter permutes the rows of the q and k
weights so both conventions produce the same scores. The tests reproduce a
Meta-style layer from HF-permuted weights.

Parameter names are HF's (q_proj, k_proj, v_proj, o_proj, all bias-free), so
a Llama checkpoint's `self_attn.*` tensors load directly; the mask and the
rotary tables are non-persistent buffers and stay out of the state_dict.
"""
import torch
import torch.nn as nn

from ._checks import check_divisible, check_tokens
from .causal import future_mask
from .decode import decode_attention
from .functional import repeat_kv
from .multi_head import merge_heads, split_heads
from .self_attention import explicit_attention


def rope_tables(head_dim: int, context_length: int, theta: float, dtype=None):
    """cos and sin of the rotation angles, each (context_length, head_dim), in HF's rotate_half layout.

    Angles are computed in float64 whatever `dtype` is: position * frequency
    loses digits fast in low precision at large positions.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (head_dim/2,)
    positions = torch.arange(context_length, dtype=torch.float64)
    angles = torch.outer(positions, inv_freq)  # (context_length, head_dim/2)
    # Feature i and feature i + head_dim/2 share an angle: (context_length, head_dim/2) -> (context_length, head_dim)
    angles = torch.cat([angles, angles], dim=-1)
    dtype = dtype or torch.get_default_dtype()
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim: the 90-degree turn of every pair."""
    x1, x2 = x.chunk(2, dim=-1)  # (..., head_dim) -> 2 x (..., head_dim/2)
    return torch.cat([-x2, x1], dim=-1)  # 2 x (..., head_dim/2) -> (..., head_dim)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate every feature pair of x by its position's angle.

    x: (b, heads, num_tokens, head_dim); cos, sin: (num_tokens, head_dim), broadcast over b and heads.
    """
    return x * cos + rotate_half(x) * sin


class GroupedQueryAttention(nn.Module):
    """Llama-3 attention: causal GQA with RoPE and bias-free projections. (B, N, d_in) -> (B, N, d_out).

    dropout is HF's attention_dropout (0 in every Llama config); dtype is the
    dtype of the weights and of the rotary tables.
    """

    def __init__(self, d_in, d_out, num_heads, num_kv_groups, context_length, rope_theta=500_000.0, dtype=None,
                 dropout=0.0):
        super().__init__()
        check_divisible(d_out, "d_out", num_heads, "num_heads")
        check_divisible(num_heads, "num_heads", num_kv_groups, "num_kv_groups")
        head_dim = d_out // num_heads
        if head_dim % 2 != 0:
            raise ValueError(
                f"head_dim (d_out // num_heads = {head_dim}) must be even: RoPE rotates pairs of features"
            )
        self.d_in, self.d_out, self.context_length = d_in, d_out, context_length
        self.num_heads, self.num_kv_groups, self.head_dim = num_heads, num_kv_groups, head_dim
        self.q_proj = nn.Linear(d_in, d_out, bias=False, dtype=dtype)
        self.k_proj = nn.Linear(d_in, num_kv_groups * head_dim, bias=False, dtype=dtype)
        self.v_proj = nn.Linear(d_in, num_kv_groups * head_dim, bias=False, dtype=dtype)
        self.o_proj = nn.Linear(d_out, d_out, bias=False, dtype=dtype)
        self.causal = True
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", future_mask(context_length), persistent=False)
        cos, sin = rope_tables(head_dim, context_length, rope_theta, dtype)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def attend(self, queries, keys, values):
        """(B, num_heads, Nq, head_dim), (B, num_kv_groups, Nk, head_dim) x2 -> (B, num_heads, Nq, head_dim).

        keys and values arrive with their num_kv_groups heads only; they are
        copied out to one per query head here, which a kernel avoids by
        indexing kv head h // group directly.
        """
        group = queries.shape[1] // keys.shape[1]
        keys = repeat_kv(keys, group)  # (b, num_kv_groups, Nk, head_dim) -> (b, num_heads, Nk, head_dim)
        values = repeat_kv(values, group)
        n_q, n_k = queries.shape[-2], keys.shape[-2]
        return explicit_attention(queries, keys, values, hidden=self.mask[:n_q, :n_k], dropout=self.dropout)

    def forward(self, x, cache=None):
        """x: (b, num_tokens, d_in). cache: a reference.KVCache, or None to attend within x only.

        With a cache, x holds each sequence's next tokens: they are rotated at
        their positions (tokens already cached + t), their keys and values are
        appended, and they attend to everything cached (`attend_cached`).
        """
        check_tokens(x, self.d_in, context_length=self.context_length)
        num_tokens = x.shape[1]
        # (b, num_tokens, d_in) -> (b, num_tokens, d_out) -> (b, num_heads, num_tokens, head_dim)
        queries = split_heads(self.q_proj(x), self.num_heads)
        # (b, num_tokens, d_in) -> (b, num_tokens, num_kv_groups * head_dim)
        #                      -> (b, num_kv_groups, num_tokens, head_dim)
        keys = split_heads(self.k_proj(x), self.num_kv_groups)
        values = split_heads(self.v_proj(x), self.num_kv_groups)
        if cache is None:
            # Positions enter through q and k only; the rows of the tables are token positions 0..num_tokens-1.
            cos, sin = self.cos[:num_tokens], self.sin[:num_tokens]
        else:
            cos, sin = self.cached_rope_tables(cache, num_tokens)
        queries, keys = apply_rope(queries, cos, sin), apply_rope(keys, cos, sin)
        if cache is None:
            context = self.attend(queries, keys, values)  # (b, num_heads, num_tokens, head_dim)
        else:
            if self.training and self.dropout.p > 0:
                raise ValueError("a KV cache is for inference: attention dropout is not applied with one; "
                                 "call .eval() or set dropout=0.0")
            context = self.attend_cached(queries, keys, values, cache)
        return self.o_proj(merge_heads(context))  # (b, num_tokens, d_out)

    def cached_rope_tables(self, cache, num_tokens):
        """cos, sin at each sequence's next positions: (b, num_tokens) -> (b, 1, num_tokens, head_dim)."""
        if max(cache.lengths) + num_tokens > self.context_length:
            raise ValueError(f"{num_tokens} new tokens after {max(cache.lengths)} cached ones pass "
                             f"context_length ({self.context_length})")
        positions = cache.positions(num_tokens)  # (b, num_tokens)
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def attend_cached(self, queries, keys, values, cache):
        """Append this step's keys and values to the cache, then attend to all of it, per sequence.

        Bottom-right causal: new token t of sequence b sees its cached tokens and new tokens up to t.
        """
        cache.append(keys, values)
        return decode_attention(queries, cache.k, cache.v, cache.seqlens, cache.block_table, causal=True)


class MultiQueryAttention(GroupedQueryAttention):
    """Multi-query attention: GQA with a single key/value head shared by every query head."""

    def __init__(self, d_in, d_out, num_heads, context_length, rope_theta=500_000.0, dtype=None, dropout=0.0):
        super().__init__(d_in, d_out, num_heads, 1, context_length, rope_theta=rope_theta, dtype=dtype,
                         dropout=dropout)
