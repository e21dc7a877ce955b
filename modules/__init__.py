"""Thin nn.Modules backed by the Triton kernels, interchangeable with the references' state_dicts."""
from .attention import (
    BACKENDS,
    CausalAttention,
    CrossAttention,
    FusedQKVMultiHeadAttention,
    GroupedQueryAttention,
    MultiHeadAttention,
    MultiQueryAttention,
    SelfAttention,
)
from .llama import Llama
