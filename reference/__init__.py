"""Plain-PyTorch attention: the readable ground truth for every Triton kernel."""
from .functional import causal_visibility, check_attention_inputs, naive_attention, repeat_kv
from .softmax import naive_softmax, online_softmax, safe_softmax
from .tiled import tiled_flash_attention
