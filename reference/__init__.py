"""Plain-PyTorch attention: the readable ground truth for every Triton kernel."""
from .functional import (alibi_bias, causal_visibility, check_attention_inputs, naive_attention,
                         naive_attention_varlen, repeat_kv, window_visibility)
from .mods import naive_attention_mods
from .softmax import naive_softmax, online_softmax, safe_softmax
from .tiled import tiled_flash_attention, tiled_flash_attention_backward
from .self_attention import SelfAttention, SelfAttentionV1, SelfAttentionV2, explicit_attention
from .causal import CausalAttention, future_mask
from .cross_attention import CrossAttention
from .multi_head import (
    EfficientMHA,
    FusedQKVMultiHeadAttention,
    MultiHeadAttention,
    MultiHeadAttentionWrapper,
    merge_heads,
    split_heads,
)
from .gqa import GroupedQueryAttention, MultiQueryAttention, apply_rope, rope_tables, rotate_half
from .model_variants import SinkAttention, SlidingWindowAttention, SoftCappedAttention
from .decode import append_kv, decode_attention
from .kv_cache import KVCache
from .llama import Llama, LlamaConfig, RMSNorm, SwiGLU
from .mla import DEEPSEEK_V3, LatentCache, MLAConfig, MLAModel, MultiHeadLatentAttention, cache_bytes_per_token
