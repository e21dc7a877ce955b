"""The attention options of today's models, on the Llama-3 GQA block: sliding window, soft-capping, sinks.

Each class is `GroupedQueryAttention` (GQA, RoPE, bias-free projections,
HF parameter names) with one thing changed in how the scores become weights.
The change lives in `attention_options()`, the keyword arguments both
`naive_attention` (here) and `kernels.flash_attention` (the twins in
modules/variants.py) take, so the reference and its twin cannot drift apart:

    SlidingWindowAttention  Mistral: query i sees keys i - W + 1 .. i, window_size (W - 1, 0)
    SoftCappedAttention     Gemma 2: scores -> softcap * tanh(scores / softcap), 50.0 in
                            Gemma 2; every other layer also has a sliding window (4096)
    SinkAttention           gpt-oss: one learned logit per head joins each row's softmax
                            normaliser without a value, so a head can attend to "nothing";
                            every other layer has a sliding window (128)

A window of W keys costs N * W instead of N^2 / 2 once a kernel skips the
key blocks outside it. The sink lets a row's weights sum to less than 1
(see `naive_attention`).

Dropout: in training, `nn.Dropout` is applied to a tensor of ones of the
weights' shape and its non-zero pattern becomes `naive_attention`'s
dropout_mask. That is the very draw `explicit_attention` makes on the
weights, so with the same seed these modules drop the same weights as
`GroupedQueryAttention`.
"""
import torch
import torch.nn as nn

from .functional import naive_attention
from .gqa import GroupedQueryAttention


def check_sliding_window(sliding_window):
    """None (no window) or an int W >= 1, the number of keys a query sees, itself included."""
    if sliding_window is None:
        return None
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int):
        raise TypeError(f"sliding_window must be an int or None, got {type(sliding_window).__name__}")
    if sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 (keys a query sees, itself included), got {sliding_window}")
    return sliding_window


def sliding_window_size(sliding_window):
    """Mistral's W -> the (left, right) window_size of the kernels: W - 1 keys back, none ahead."""
    return None if sliding_window is None else (sliding_window - 1, 0)


class _OptionsGQA(GroupedQueryAttention):
    """GroupedQueryAttention whose `attend` is `naive_attention` with `attention_options()`."""

    def attention_options(self):
        """Keyword arguments of naive_attention and kernels.flash_attention (besides causal)."""
        raise NotImplementedError

    def attend(self, queries, keys, values):
        """(B, num_heads, Nq, head_dim), (B, num_kv_groups, Nk, head_dim) x2 -> (B, num_heads, Nq, head_dim)."""
        dropout_p = self.dropout.p if self.training else 0.0
        dropout_mask = None
        if dropout_p > 0:
            # (B, num_heads, Nq, Nk): nn.Dropout's own Bernoulli draw, kept where it is non-zero.
            weights_shape = (*queries.shape[:-1], keys.shape[-2])
            dropout_mask = self.dropout(queries.new_ones(weights_shape)) != 0
        return naive_attention(queries, keys, values, causal=self.causal, dropout_mask=dropout_mask,
                               dropout_p=dropout_p, **self.attention_options())


class SlidingWindowAttention(_OptionsGQA):
    """Mistral attention: causal GQA with RoPE where each query sees only the last `sliding_window` keys.

    sliding_window W (Mistral 7B v0.1: 4096): query i sees keys i - W + 1 .. i;
    None is plain causal attention.
    """

    def __init__(self, d_in, d_out, num_heads, num_kv_groups, context_length, sliding_window=4096,
                 rope_theta=10_000.0, dtype=None, dropout=0.0):
        super().__init__(d_in, d_out, num_heads, num_kv_groups, context_length, rope_theta=rope_theta, dtype=dtype,
                         dropout=dropout)
        self.sliding_window = check_sliding_window(sliding_window)

    def attention_options(self):
        return {"window_size": sliding_window_size(self.sliding_window)}

    def extra_repr(self):
        return f"sliding_window={self.sliding_window}"


class SoftCappedAttention(_OptionsGQA):
    """Gemma 2 attention: causal GQA with RoPE and logit soft-capping, optionally in a sliding window.

    softcap (Gemma 2: attn_logit_softcapping = 50.0): each scaled score s
    becomes softcap * tanh(s / softcap), smooth and bounded by softcap; None
    turns it off. sliding_window: as in SlidingWindowAttention (Gemma 2's
    local layers: 4096; its global layers: None).
    """

    def __init__(self, d_in, d_out, num_heads, num_kv_groups, context_length, softcap=50.0, sliding_window=None,
                 rope_theta=10_000.0, dtype=None, dropout=0.0):
        super().__init__(d_in, d_out, num_heads, num_kv_groups, context_length, rope_theta=rope_theta, dtype=dtype,
                         dropout=dropout)
        if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or softcap <= 0):
            raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")
        self.softcap = softcap
        self.sliding_window = check_sliding_window(sliding_window)

    def attention_options(self):
        return {"softcap": self.softcap, "window_size": sliding_window_size(self.sliding_window)}

    def extra_repr(self):
        return f"softcap={self.softcap}, sliding_window={self.sliding_window}"


class SinkAttention(_OptionsGQA):
    """gpt-oss attention: causal GQA with RoPE and a learned sink logit per query head.

    `sinks` (num_heads,) is a parameter, in the state_dict as "sinks" (gpt-oss's
    name), initialised to 0: a sink of 0 weighs as much as a key whose score
    is 0. sliding_window: as in SlidingWindowAttention (gpt-oss: 128 on every
    other layer, None on the rest).
    """

    def __init__(self, d_in, d_out, num_heads, num_kv_groups, context_length, sliding_window=None,
                 rope_theta=150_000.0, dtype=None, dropout=0.0):
        super().__init__(d_in, d_out, num_heads, num_kv_groups, context_length, rope_theta=rope_theta, dtype=dtype,
                         dropout=dropout)
        self.sliding_window = check_sliding_window(sliding_window)
        self.sinks = nn.Parameter(torch.zeros(num_heads, dtype=dtype))

    def attention_options(self):
        return {"sinks": self.sinks, "window_size": sliding_window_size(self.sliding_window)}

    def extra_repr(self):
        return f"sliding_window={self.sliding_window}"
