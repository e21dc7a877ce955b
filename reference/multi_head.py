"""Multi-head causal attention, from the obvious version to the fast one.

Several heads attend in parallel, each in its own head_dim = d_out / num_heads
subspace, so one head can track syntax while another tracks coreference; the
cost is that of one head of width d_out. Four ways to write the same thing:

- MultiHeadAttentionWrapper: num_heads independent CausalAttention modules,
  outputs concatenated. Easy to read, slow: num_heads small matmuls each.
- MultiHeadAttention: one d_out-wide projection each for q, k, v, split into
  heads by a reshape, so every head runs in one batched matmul; then out_proj
  mixes the heads.
- FusedQKVMultiHeadAttention: a single (d_in -> 3 d_out) projection for all
  three, one matmul instead of three.
- EfficientMHA: the fused module with the attention step handed to
  F.scaled_dot_product_attention, which picks a fused kernel (FlashAttention,
  memory-efficient) when one exists for the device.

Without out_proj, MultiHeadAttention computes exactly what the wrapper
computes once head h's weights are the rows h*head_dim:(h+1)*head_dim of the
big projections; the tests check this, and the other equivalences.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import check_divisible, check_tokens
from .causal import CausalAttention, future_mask
from .self_attention import explicit_attention


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Give each head its own slice of the features: head h takes features h*head_dim:(h+1)*head_dim."""
    b, num_tokens, width = x.shape
    # (b, num_tokens, d_out) -> (b, num_tokens, num_heads, head_dim) -> (b, num_heads, num_tokens, head_dim)
    return x.view(b, num_tokens, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """Concatenate the heads' outputs again, the inverse of split_heads."""
    b, num_heads, num_tokens, head_dim = x.shape
    # (b, num_heads, num_tokens, head_dim) -> (b, num_tokens, num_heads, head_dim) -> (b, num_tokens, d_out)
    return x.transpose(1, 2).reshape(b, num_tokens, num_heads * head_dim)


class MultiHeadAttentionWrapper(nn.Module):
    """num_heads CausalAttention heads of width d_out // num_heads, side by side.

    The output is (B, N, d_out), as in the seed. There is no out_proj: the
    concatenated heads are the output. Each head runs its own `attend`;
    a twin swaps in another head type by overriding the class attribute
    `head_class`.
    """

    head_class = CausalAttention

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        check_divisible(d_out, "d_out", num_heads, "num_heads")
        self.d_in, self.d_out, self.num_heads = d_in, d_out, num_heads
        self.heads = nn.ModuleList(
            [self.head_class(d_in, d_out // num_heads, context_length, dropout, qkv_bias) for _ in range(num_heads)]
        )
        self.causal = True

    @property
    def dropout(self) -> nn.Dropout:
        """The heads' dropout (every head holds its own nn.Dropout with the same p)."""
        return self.heads[0].dropout

    def forward(self, x):
        # num_heads x (b, num_tokens, head_dim) -> (b, num_tokens, d_out)
        return torch.cat([head(x) for head in self.heads], dim=-1)


class _CausalMultiHead(nn.Module):
    """What the three batched multi-head modules share: sizes, out_proj, causal mask, dropout, `attend`.

    Subclasses add the q/k/v projections and a forward that calls
    self.attend(queries, keys, values) on (B, num_heads, N, head_dim) tensors.
    """

    def __init__(self, d_in, d_out, context_length, dropout, num_heads):
        super().__init__()
        check_divisible(d_out, "d_out", num_heads, "num_heads")
        self.d_in, self.d_out, self.context_length = d_in, d_out, context_length
        self.num_heads, self.head_dim = num_heads, d_out // num_heads
        # Mixes the heads: without it each output feature would come from one head only.
        self.out_proj = nn.Linear(d_out, d_out)
        self.causal = True
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", future_mask(context_length))

    def attend(self, queries, keys, values):
        """(B, H, Nq, head_dim), (B, H, Nk, head_dim) x2 -> (B, H, Nq, head_dim), top-left causal."""
        n_q, n_k = queries.shape[-2], keys.shape[-2]
        return explicit_attention(queries, keys, values, hidden=self.mask[:n_q, :n_k], dropout=self.dropout)


class MultiHeadAttention(_CausalMultiHead):
    """Causal multi-head attention with separate q, k, v projections and an output projection."""

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__(d_in, d_out, context_length, dropout, num_heads)
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)

    def forward(self, x):
        check_tokens(x, self.d_in, context_length=self.context_length)
        # Each: (b, num_tokens, d_in) -> (b, num_tokens, d_out) -> (b, num_heads, num_tokens, head_dim)
        queries = split_heads(self.W_query(x), self.num_heads)
        keys = split_heads(self.W_key(x), self.num_heads)
        values = split_heads(self.W_value(x), self.num_heads)
        context = self.attend(queries, keys, values)  # (b, num_heads, num_tokens, head_dim)
        return self.out_proj(merge_heads(context))  # (b, num_tokens, d_out)


class FusedQKVMultiHeadAttention(_CausalMultiHead):
    """Causal multi-head attention with one fused q/k/v projection.

    qkv.weight is W_query, W_key and W_value stacked along the output
    dimension, the layout of nn.MultiheadAttention's in_proj_weight.
    """

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__(d_in, d_out, context_length, dropout, num_heads)
        self.qkv = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)

    def forward(self, x):
        check_tokens(x, self.d_in, context_length=self.context_length)
        b, num_tokens, _ = x.shape
        qkv = self.qkv(x)  # (b, num_tokens, d_in) -> (b, num_tokens, 3 * d_out)
        # (b, num_tokens, 3 * d_out) -> (b, num_tokens, 3, num_heads, head_dim)
        qkv = qkv.view(b, num_tokens, 3, self.num_heads, self.head_dim)
        # (b, num_tokens, 3, num_heads, head_dim) -> (3, b, num_heads, num_tokens, head_dim)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        queries, keys, values = qkv.unbind(0)  # 3 x (b, num_heads, num_tokens, head_dim)
        context = self.attend(queries, keys, values)  # (b, num_heads, num_tokens, head_dim)
        return self.out_proj(merge_heads(context))  # (b, num_tokens, d_out)


class EfficientMHA(FusedQKVMultiHeadAttention):
    """FusedQKVMultiHeadAttention whose attention step is F.scaled_dot_product_attention.

    Same parameters and buffers as the fused module, so either loads the
    other's state_dict. SDPA's is_causal=True builds the same top-left
    triangle as the `mask` buffer inside the kernel, so the buffer is unused
    here. Dropout is passed as dropout_p, and only while training: SDPA,
    unlike nn.Dropout, does not look at self.training.
    """

    def attend(self, queries, keys, values):
        """(B, H, Nq, head_dim), (B, H, Nk, head_dim) x2 -> (B, H, Nq, head_dim), via SDPA."""
        dropout_p = self.dropout.p if self.training else 0.0
        return F.scaled_dot_product_attention(queries, keys, values, dropout_p=dropout_p, is_causal=self.causal)
