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
from .variants import SinkAttention, SlidingWindowAttention, SoftCappedAttention
from .padding import pad_input, padded_attention, unpad_input
from .llama import Llama
from .mla import MLAModel, MultiHeadLatentAttention
