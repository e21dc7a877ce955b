"""The small Llama of reference/llama.py with its attention on the Triton kernels.

Same parameters and state_dict as `reference.Llama`; each layer's attention
is `modules.GroupedQueryAttention(backend=...)`. With backend="triton" and a
KV cache, the prefill runs `kernels.flash_attention` and every later step
`kernels.decode_attention` (see GroupedQueryAttention.attend_cached).
"""
import reference

from .attention import GroupedQueryAttention, check_backend


class Llama(reference.Llama):
    """reference.Llama with a `backend` argument (default "triton") for every attention layer."""

    attention_class = GroupedQueryAttention

    def __init__(self, config=None, dtype=None, backend="triton"):
        super().__init__(config, dtype, backend=check_backend(backend))
