"""Triton-backed twins of the reference attention modules.

Each twin subclasses its reference module and replaces one method, `attend`
(scores -> mask -> softmax -> dropout -> weighted sum), so parameters,
buffers and `state_dict` are the reference's own: weights load either way.
The projections, RoPE and head reshapes stay in the reference `forward`; the
attention itself runs on the backend chosen by `backend`:

    "triton"  kernels.flash_attention: fused, O(N) memory, native GQA/MQA
    "sdpa"    torch.nn.functional.scaled_dot_product_attention
    "naive"   the reference module's own explicit math

In training mode with dropout > 0 the triton backend passes dropout_p to the
kernel, which draws its mask from torch's default generator (torch.manual_seed
makes it repeatable).

Each twin's constructor shows the reference's parameters plus `backend` to
help() and inspect.signature (see `_KernelBacked.__init_subclass__`).
"""
import inspect

import torch.nn as nn
import torch.nn.functional as F

import reference
from kernels import decode_attention, flash_attention

BACKENDS = ("triton", "sdpa", "naive")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    return backend


def kernel_dropout(dropout_p: float) -> dict:
    """flash_attention's dropout keyword: {} when off."""
    return {"dropout_p": dropout_p} if dropout_p else {}


def _twin_init(cls):
    """An __init__ for twin `cls` whose signature is its reference's constructor plus keyword-only `backend`."""
    reference_init = next(base.__dict__["__init__"] for base in cls.__mro__
                          if not issubclass(base, _KernelBacked) and "__init__" in base.__dict__)
    signature = inspect.signature(reference_init)  # (self, ...): the reference's own parameters

    def __init__(self, *args, backend="triton", **kwargs):
        super(cls, self).__init__(*args, backend=backend, **kwargs)

    __init__.__signature__ = signature.replace(parameters=[
        *signature.parameters.values(), inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default="triton")
    ])
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    __init__.__doc__ = (f"reference.{reference_init.__qualname__.split('.')[0]}'s arguments, then the backend: "
                        f"{', '.join(map(repr, BACKENDS))}.")
    return __init__


class _KernelBacked:
    """Mixin: run the reference module's `attend` step on a chosen backend."""

    def __init__(self, *args, backend: str = "triton", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = check_backend(backend)

    def __init_subclass__(cls, **kwargs):
        """Give each twin an __init__ that shows its reference's parameters (not *args, **kwargs) to help()."""
        super().__init_subclass__(**kwargs)
        if "__init__" not in cls.__dict__ and issubclass(cls, nn.Module):  # a twin, not a further mixin
            cls.__init__ = _twin_init(cls)

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
            out = flash_attention(queries, keys, values, causal=self.causal, **kernel_dropout(dropout_p))
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
        """triton: a prefill (empty cache) runs flash_attention on its own tokens, a later step of any
        number of tokens (a decode step, a chunk of a longer prompt) runs decode_attention on the cache;
        the other backends use the reference's plain math."""
        prefill = cache.is_empty
        if self.backend != "triton":
            return super().attend_cached(queries, keys, values, cache)
        cache.append(keys, values)
        if prefill:
            return flash_attention(queries, keys, values, causal=True)
        return decode_attention(queries, cache.k, cache.v, cache.seqlens, cache.block_table, causal=True)


class MultiQueryAttention(_KernelBacked, reference.MultiQueryAttention):
    """reference.MultiQueryAttention with a `backend` argument (default "triton")."""
