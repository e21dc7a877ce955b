"""Cross-attention: queries from one sequence, keys and values from another.

This is the encoder-decoder attention of the original Transformer and the
text-conditioning of diffusion models: the decoder tokens x ask, the context
(an encoded source sentence, a text prompt) answers. The two sequences may
differ in length and width; nothing is causal, since the whole context is
known in advance.
"""
import torch.nn as nn

from ._checks import check_same_batch, check_tokens
from .self_attention import explicit_attention


class CrossAttention(nn.Module):
    """Single-head attention of x (B, Nq, d_in) over context (B, Nk, d_context) -> (B, Nq, d_out)."""

    def __init__(self, d_in, d_context, d_out, dropout=0.0, qkv_bias=False):
        super().__init__()
        self.d_in, self.d_context, self.d_out = d_in, d_context, d_out
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_context, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_context, d_out, bias=qkv_bias)
        self.causal = False
        self.dropout = nn.Dropout(dropout)

    def attend(self, queries, keys, values):
        """(B, Nq, d_out), (B, Nk, d_out) x2 -> (B, Nq, d_out): every query sees the whole context."""
        return explicit_attention(queries, keys, values, dropout=self.dropout)

    def forward(self, x, context):
        check_tokens(x, self.d_in)
        check_tokens(context, self.d_context, name="context", d_name="d_context")
        check_same_batch(x, context)
        queries = self.W_query(x)  # (b, n_x, d_in) -> (b, n_x, d_out)
        keys = self.W_key(context)  # (b, n_context, d_context) -> (b, n_context, d_out)
        values = self.W_value(context)
        return self.attend(queries, keys, values)
