"""Causal (masked) self-attention: token t sees tokens 0..t only.

A language model predicts token t+1 from tokens up to t, so during training
no position may read a later one. The mask is the strict upper triangle of a
(context_length, context_length) matrix, precomputed once and sliced to the
actual sequence length. Dropout on the attention weights zeroes random
query-key links during training (and rescales the rest by 1/(1-p)).
"""
import torch
import torch.nn as nn

from ._checks import check_tokens
from .self_attention import explicit_attention


def future_mask(context_length: int) -> torch.Tensor:
    """(context_length, context_length) bool, True above the diagonal: the keys a query must not see."""
    return torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), diagonal=1)


class CausalAttention(nn.Module):
    """Single-head causal self-attention with dropout on the attention weights."""

    def __init__(self, d_in, d_out, context_length, dropout, qkv_bias=False):
        super().__init__()
        self.d_in, self.d_out, self.context_length = d_in, d_out, context_length
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.causal = True
        self.dropout = nn.Dropout(dropout)
        # A buffer moves with .to(device) and is saved in the state_dict, as in the seed.
        self.register_buffer("mask", future_mask(context_length))

    def attend(self, queries, keys, values):
        """(B, Nq, d_out), (B, Nk, d_out) x2 -> (B, Nq, d_out), with the top-left causal mask."""
        n_q, n_k = queries.shape[-2], keys.shape[-2]
        return explicit_attention(queries, keys, values, hidden=self.mask[:n_q, :n_k], dropout=self.dropout)

    def forward(self, x):
        check_tokens(x, self.d_in, context_length=self.context_length)
        queries = self.W_query(x)  # (b, num_tokens, d_in) -> (b, num_tokens, d_out)
        keys = self.W_key(x)
        values = self.W_value(x)
        return self.attend(queries, keys, values)
