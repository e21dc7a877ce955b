"""A small Llama-3-shaped language model on the reference blocks, and greedy generation.

    tokens -> embed_tokens -> num_layers x [ x = x + self_attn(RMSNorm(x))
                                             x = x + mlp(RMSNorm(x)) ] -> RMSNorm -> lm_head -> logits

self_attn is `GroupedQueryAttention` (causal GQA with RoPE, Llama 3's
rope_theta), mlp is SwiGLU, every projection is bias-free and the parameter
names are Hugging Face's. The weights are random, made here from the seed
of the caller's torch generator: nothing is downloaded. `modules.Llama` is
the same model with the Triton-backed attention twin.

Generation is greedy: each step appends the argmax of the last position's
logits. `generate(..., use_cache=False)` recomputes the whole sequence at
every step, the ground truth; `use_cache=True` keeps a KVCache per layer,
runs the prompts once (the prefill), then one token per step.

Prompts of different lengths are right-padded into one batch. Causal
attention never lets a real token see the padding after it, so the padded
rows change nothing; each sequence's next token is read at its own last real
position. With a cache, the prefill appends the padded rows too, then
`KVCache.truncate` sets each sequence's length back to its prompt's, so the
padding is never attended to and the first generated tokens overwrite it.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .gqa import GroupedQueryAttention
from .kv_cache import KVCache


@dataclass(frozen=True)
class LlamaConfig:
    """Llama 3's shape, scaled down until the CPU runs it in a blink (defaults: 2 layers of width 64)."""

    vocab_size: int = 256
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_groups: int = 2
    hidden_dim: int = 176  # SwiGLU's width: about 8/3 of d_model, as in Llama
    context_length: int = 256
    rope_theta: float = 500_000.0
    norm_eps: float = 1e-5


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: LayerNorm without the mean and the bias, computed in fp32."""

    def __init__(self, dim, eps=1e-5, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x):
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): a gated MLP, (b, n, d_model) -> (b, n, hidden_dim) -> (b, n, d_model)."""

    def __init__(self, d_model, hidden_dim, dtype=None):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden_dim, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(d_model, hidden_dim, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(hidden_dim, d_model, bias=False, dtype=dtype)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    """Pre-norm residual block: attention, then the MLP."""

    def __init__(self, config, self_attn, dtype=None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps, dtype)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps, dtype)
        self.mlp = SwiGLU(config.d_model, config.hidden_dim, dtype)

    def forward(self, x, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def right_pad(sequences, pad_id=0, device=None):
    """Lists of token ids of different lengths -> (b, longest) LongTensor, padded at the end."""
    longest = max(len(s) for s in sequences)
    return torch.tensor([list(s) + [pad_id] * (longest - len(s)) for s in sequences], dtype=torch.long,
                        device=device)


class Llama(nn.Module):
    """(b, n) token ids -> (b, n, vocab_size) logits. A twin swaps the attention through `attention_class`."""

    attention_class = GroupedQueryAttention

    def __init__(self, config=None, dtype=None, **attention_kwargs):
        super().__init__()
        self.config = config = config or LlamaConfig()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model, dtype=dtype)
        self.layers = nn.ModuleList(
            LlamaBlock(config, self.attention_class(config.d_model, config.d_model, config.num_heads,
                                                    config.num_kv_groups, config.context_length,
                                                    rope_theta=config.rope_theta, dtype=dtype, **attention_kwargs),
                       dtype)
            for _ in range(config.num_layers)
        )
        self.norm = RMSNorm(config.d_model, config.norm_eps, dtype)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False, dtype=dtype)

    def forward(self, tokens, caches=None):
        """caches: None, or one KVCache per layer (from `new_caches`), filled as a side effect."""
        x = self.embed_tokens(tokens)  # (b, n) -> (b, n, d_model)
        for i, layer in enumerate(self.layers):
            x = layer(x, None if caches is None else caches[i])
        return self.lm_head(self.norm(x))  # (b, n, d_model) -> (b, n, vocab_size)

    def new_caches(self, batch, capacity, block_size=None):
        """One empty KVCache per layer, on the model's device and in its dtype (paged if block_size is given)."""
        weight = self.lm_head.weight
        attn = self.layers[0].self_attn
        return [KVCache(batch, attn.num_kv_groups, attn.head_dim, capacity, dtype=weight.dtype, device=weight.device,
                        block_size=block_size) for _ in self.layers]

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, use_cache=True, block_size=None):
        """Greedy decoding: prompts (lists of token ids, any lengths) -> (b, max_new_tokens) new token ids.

        use_cache=False recomputes every sequence in full at each step; use_cache=True keeps a
        KVCache per layer (paged with blocks of block_size when given).
        """
        lengths = [len(p) for p in prompts]
        if not lengths or min(lengths) < 1:
            raise ValueError("prompts must hold at least one prompt, each of at least one token")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        device = self.lm_head.weight.device
        rows = torch.arange(len(prompts), device=device)
        last = torch.tensor(lengths, device=device) - 1  # each sequence's last real position
        if not use_cache:
            sequences = [list(p) for p in prompts]
            new = []
            for _ in range(max_new_tokens):
                logits = self(right_pad(sequences, device=device))  # (b, longest, vocab)
                token = logits[rows, last].argmax(dim=-1)  # (b,)
                new.append(token)
                sequences = [s + [t] for s, t in zip(sequences, token.tolist())]
                last = last + 1
            return torch.stack(new, dim=1)
        caches = self.new_caches(len(prompts), max(lengths) + max_new_tokens, block_size)
        logits = self(right_pad(prompts, device=device), caches)  # the prefill: all prompts at once
        for cache in caches:
            cache.truncate(lengths)  # forget the padding: the next tokens overwrite it
        token = logits[rows, last].argmax(dim=-1)
        new = [token]
        for _ in range(max_new_tokens - 1):
            token = self(token[:, None], caches)[:, -1].argmax(dim=-1)  # (b, 1) -> (b, 1, vocab) -> (b,)
            new.append(token)
        return torch.stack(new, dim=1)
