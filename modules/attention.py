"""Triton-backed twins of the reference attention modules.

Each twin subclasses its reference module and replaces one method, `attend`
(scores -> mask -> softmax -> dropout -> weighted sum), so parameters,
buffers and `state_dict` are the reference's own: weights load either way.
The projections, RoPE and head reshapes stay in the reference `forward`; the
attention itself runs on the backend chosen by `backend`:

    "triton"  kernels.flash_attention: fused, O(N) memory, native GQA/MQA
    "sdpa"    torch.nn.functional.scaled_dot_product_attention
    "naive"   the reference module's own explicit math

The Triton kernel has no attention dropout. Rather than ignore it, a twin in
training mode with dropout > 0 on the triton backend raises.
"""
import torch.nn.functional as F

import reference
from kernels import decode_attention, flash_attention

BACKENDS = ("triton", "sdpa", "naive")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    return backend


class _KernelBacked:
    """Mixin: run the reference module's `attend` step on a chosen backend."""

    def __init__(self, *args, backend: str = "triton", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = check_backend(backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"

    def attend(self, queries, keys, values):
        if self.backend == "naive":
            return super().attend(queries, keys, values)
        # Single-head modules pass (B, N, d); the kernels take (B, H, N, d).
        single_head = queries.dim() == 3
        if single_head:
            # (B, N, d) -> (B, 1, N, d)
            queries, keys, values = queries.unsqueeze(1), keys.unsqueeze(1), values.unsqueeze(1)
        dropout_p = self.dropout.p if self.training else 0.0
        if self.backend == "triton":
            if dropout_p > 0:
                raise ValueError(
                    f"backend='triton' has no attention dropout, and dropout={dropout_p} in training mode "
                    "would be silently ignored: use backend='sdpa' or 'naive', dropout=0.0, or .eval()"
                )
            out = flash_attention(queries, keys, values, causal=self.causal)
        else:
            out = F.scaled_dot_product_attention(queries, keys, values, dropout_p=dropout_p, is_causal=self.causal,
                                                 enable_gqa=queries.shape[1] != keys.shape[1])
        return out.squeeze(1) if single_head else out  # (B, 1, N, d) -> (B, N, d)


class SelfAttention(_KernelBacked, reference.SelfAttentionV2):
    """reference.SelfAttentionV2 with a `backend` argument (default "triton")."""


class CausalAttention(_KernelBacked, reference.CausalAttention):
    """reference.CausalAttention with a `backend` argument (default "triton")."""


class CrossAttention(_KernelBacked, reference.CrossAttention):
    """reference.CrossAttention with a `backend` argument (default "triton")."""


class MultiHeadAttention(_KernelBacked, reference.MultiHeadAttention):
    """reference.MultiHeadAttention with a `backend` argument (default "triton")."""


class FusedQKVMultiHeadAttention(_KernelBacked, reference.FusedQKVMultiHeadAttention):
    """reference.FusedQKVMultiHeadAttention with a `backend` argument (default "triton")."""


class GroupedQueryAttention(_KernelBacked, reference.GroupedQueryAttention):
    """reference.GroupedQueryAttention (Llama 3, RoPE) with a `backend` argument; K/V heads are never repeated."""

    def attend_cached(self, queries, keys, values, cache):
        """triton: a prefill (empty cache) runs flash_attention on its own tokens, a later step of up to
        16 tokens runs decode_attention on the cache; the other backends use the reference's plain math."""
        if self.backend != "triton":
            return super().attend_cached(queries, keys, values, cache)
        prefill = cache.is_empty
        cache.append(keys, values)
        if prefill:
            return flash_attention(queries, keys, values, causal=True)
        return decode_attention(queries, cache.k, cache.v, cache.seqlens, cache.block_table, causal=True)


class MultiQueryAttention(_KernelBacked, reference.MultiQueryAttention):
    """reference.MultiQueryAttention with a `backend` argument (default "triton")."""
