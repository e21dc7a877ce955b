"""Multi-head latent attention (reference/mla.py) and its small decoder on the Triton kernels.

Same parameters and state_dict as the references. With backend="triton":

    no cache        the naive form on kernels.flash_attention (q/k head dim nope + rope, v head dim apart)
    prefill         (an empty LatentCache) the same, on the prompt's own decompressed keys and values,
                    after its latent rows are written to the cache
    later steps     the absorbed form on kernels.decode_attention over the latent cache: q/k head dim
                    kv_lora_rank + rope, one kv head, v_cache a view of k_cache's first kv_lora_rank
                    columns, so the kernel reads each latent row once for every query head

The prefill stays naive because it is bound by compute, where decompressing is
cheaper than attending with the wide absorbed head dim (DeepSeek-V3: 192
instead of 576 per score); a decode step is bound by reading the cache,
which the absorbed form shrinks.
"""
import torch

import reference
from kernels import decode_attention

from .attention import _KernelBacked, check_backend


class MultiHeadLatentAttention(_KernelBacked, reference.MultiHeadLatentAttention):
    """reference.MultiHeadLatentAttention with a `backend` argument (default "triton")."""

    def attend_cached(self, q_nope, q_pe, c_kv, k_pe, cache):
        """triton: a prefill (empty cache) runs the naive form on flash_attention, a later step of any number
        of tokens the absorbed form on decode_attention; the other backends use the reference's plain math."""
        if self.backend != "triton":
            return super().attend_cached(q_nope, q_pe, c_kv, k_pe, cache)
        prefill = cache.is_empty
        cache.append(torch.cat([c_kv, k_pe], dim=-1))  # (b, 1, n, kv_lora_rank + rope)
        if prefill:
            return self.attend(*self.decompress(q_nope, q_pe, c_kv, k_pe))
        queries = self.absorb_queries(q_nope, q_pe)  # (b, H, n, kv_lora_rank + rope)
        o_latent = decode_attention(queries, cache.k, cache.v, cache.seqlens, cache.block_table, causal=True,
                                    sm_scale=self.softmax_scale)  # (b, H, n, kv_lora_rank)
        return self.absorb_output(o_latent)


class MLAModel(reference.MLAModel):
    """reference.MLAModel with a `backend` argument (default "triton") for every attention layer."""

    attention_class = MultiHeadLatentAttention

    def __init__(self, config=None, dtype=None, backend="triton"):
        super().__init__(config, dtype, backend=check_backend(backend))
