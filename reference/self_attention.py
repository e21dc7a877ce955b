"""Self-attention, the starting point: every token looks at every token.

    attention(x) = softmax(Q K^T / sqrt(d_out)) V,   Q, K, V = x W_query, x W_key, x W_value

Dividing by sqrt(d_out) keeps the scores' variance near 1 whatever the width,
so the softmax does not saturate into a one-hot and its gradients stay alive.

`explicit_attention` is that formula written out once; every reference
module's `attend` method calls it (with a mask and dropout where the module
has them), so the math is readable in one place.

The `attend` hook: each module computes its projections in `forward` and
hands queries, keys and values to `self.attend(queries, keys, values)`,
which does scores -> mask -> softmax -> dropout -> weighted sum. A Triton
twin subclasses the module and overrides only `attend`, so the parameters,
buffers and state_dict stay those of the reference.
"""
import torch
import torch.nn as nn

from ._checks import check_tokens


def explicit_attention(queries, keys, values, hidden=None, dropout=None):
    """softmax(queries keys^T / sqrt(d)) values, over any leading dims.

    queries (..., Nq, d), keys (..., Nk, d), values (..., Nk, d_v) -> (..., Nq, d_v).
    hidden:  optional bool (Nq, Nk), True where a query must not see a key.
    dropout: optional nn.Dropout applied to the attention weights.
    """
    scores = queries @ keys.transpose(-2, -1)  # (..., Nq, d) @ (..., d, Nk) -> (..., Nq, Nk)
    if hidden is not None:
        # -inf becomes exactly 0 after the softmax.
        scores = scores.masked_fill(hidden, float("-inf"))
    weights = torch.softmax(scores / keys.shape[-1] ** 0.5, dim=-1)
    if dropout is not None:
        weights = dropout(weights)
    return weights @ values  # (..., Nq, Nk) @ (..., Nk, d_v) -> (..., Nq, d_v)


class SelfAttentionV1(nn.Module):
    """Self-attention with the three weight matrices as raw parameters: x @ W.

    The weights are drawn from torch.rand, as in the seed, which makes the
    point that they are plain matrices; nn.Linear (V2) initialises better.
    """

    def __init__(self, d_in, d_out):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.W_query = nn.Parameter(torch.rand(d_in, d_out))
        self.W_key = nn.Parameter(torch.rand(d_in, d_out))
        self.W_value = nn.Parameter(torch.rand(d_in, d_out))
        self.causal = False
        # No dropout here; a p=0 Dropout lets every module be read the same way.
        self.dropout = nn.Dropout(0.0)

    def attend(self, queries, keys, values):
        """(B, N, d_out) x3 -> (B, N, d_out): every query sees every key."""
        return explicit_attention(queries, keys, values, dropout=self.dropout)

    def forward(self, x):
        check_tokens(x, self.d_in)
        queries = x @ self.W_query  # (b, num_tokens, d_in) -> (b, num_tokens, d_out)
        keys = x @ self.W_key
        values = x @ self.W_value
        return self.attend(queries, keys, values)


class SelfAttentionV2(nn.Module):
    """Self-attention with nn.Linear projections (better init, optional bias).

    nn.Linear stores its weight transposed, (d_out, d_in), so V1's W_query is
    V2's W_query.weight.T.
    """

    def __init__(self, d_in, d_out, qkv_bias=False):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.causal = False
        # No dropout here; a p=0 Dropout lets every module be read the same way.
        self.dropout = nn.Dropout(0.0)

    def attend(self, queries, keys, values):
        """(B, N, d_out) x3 -> (B, N, d_out): every query sees every key."""
        return explicit_attention(queries, keys, values, dropout=self.dropout)

    def forward(self, x):
        check_tokens(x, self.d_in)
        queries = self.W_query(x)  # (b, num_tokens, d_in) -> (b, num_tokens, d_out)
        keys = self.W_key(x)
        values = self.W_value(x)
        return self.attend(queries, keys, values)


SelfAttention = SelfAttentionV2
