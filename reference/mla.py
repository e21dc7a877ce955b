"""Multi-head latent attention (MLA), DeepSeek-V2/V3's attention, and a small decoder model on it.

What MLA caches
---------------
Multi-head attention caches, per token and layer, a key and a value for
every head: num_heads * (qk_head_dim + v_head_dim) numbers. MLA caches one
latent vector per token instead, shared by every head:

    c_kv  = RMSNorm(x W_DKV)        (kv_lora_rank,)       the compressed keys and values
    k_pe  = RoPE(x W_KR)            (qk_rope_head_dim,)   one rotary key, shared by all heads

and decompresses it into per-head keys and values with one up-projection,
kv_b_proj = [W_UK; W_UV] (Hugging Face's names throughout):

    k_h = [c_kv W_UK,h ; k_pe]      qk_nope_head_dim + qk_rope_head_dim (DeepSeek-V3: 128 + 64 = 192)
    v_h = c_kv W_UV,h               v_head_dim (DeepSeek-V3: 128)

Queries come from x directly (q_proj) or through a low-rank bottleneck of
their own, q_lora_rank (q_a_proj, q_a_layernorm, q_b_proj), and split the same
way into a no-position part q_nope and a rotary part q_pe. The rotary part
is kept apart ("decoupled") because a rotation by the token's position
cannot be folded into a fixed matrix, and the trick below needs fixed ones.

Two ways to compute the same attention
--------------------------------------
naive (training, prefill): decompress k_h and v_h for every head and run
ordinary attention with q/k head dim 192 and v head dim 128 (the kernels
take v's head dim apart from q's).

absorbed (decode): the score of query head h against a cached token is

    q_h . k_h = q_nope,h . (c_kv W_UK,h) + q_pe,h . k_pe = (q_nope,h W_UK,h^T) . c_kv + q_pe,h . k_pe

so W_UK moves into the query ("absorbed"): q_h' = [q_nope,h W_UK,h^T ; q_pe,h],
kv_lora_rank + rope dims (DeepSeek-V3: 512 + 64 = 576), attends to the latent
cache row [c_kv ; k_pe] itself, and the same holds for the output:
sum_j p_j (c_kv,j W_UV,h) = (sum_j p_j c_kv,j) W_UV,h, so attention returns a
latent (kv_lora_rank,) per head and W_UV is applied after it. Attention then
runs with q/k head dim 576, v head dim 512 and a single kv head shared by all
128 query heads; v is the first 512 columns of k, one tensor read once
(`LatentCache`: v_cache = k_cache[..., :kv_lora_rank], a view). The softmax
scale stays 1 / sqrt(qk_head_dim), the dot product's true length before
absorbing. Both forms are the same math; the tests check them equal in
float64.

Sizes here are tiny (defaults: 8 heads, kv_lora_rank 64, rope 16, nope 32,
v 32, so q/k 48 and v 32 naive, 80 and 64 absorbed), the structure is
DeepSeek's; DEEPSEEK_V3 has the real dims. The rotary pairs follow
reference/gqa.py (rotate_half), not DeepSeek's interleaved checkpoint
layout, and there is no YaRN scaling. `modules.MultiHeadLatentAttention` and
`modules.MLAModel` are the twins on the kernels.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

from ._checks import check_tokens
from .causal import future_mask
from .gqa import apply_rope, rope_tables
from .kv_cache import KVCache
from .llama import Llama, LlamaBlock, RMSNorm
from .multi_head import merge_heads
from .paged import paged_attention
from .self_attention import explicit_attention


@dataclass(frozen=True)
class MLAConfig:
    """A DeepSeek-V2/V3-shaped decoder, scaled down for the CPU (defaults: 2 layers of width 64, 8 heads)."""

    vocab_size: int = 256
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 8
    q_lora_rank: int | None = 48  # None: q_proj straight from x (DeepSeek-V2-Lite)
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    hidden_dim: int = 176  # the MLP's width (DeepSeek's MoE layers are out of scope: one dense SwiGLU)
    context_length: int = 256
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6

    @property
    def qk_head_dim(self):
        """q and k head dim of the naive form: 32 + 16 = 48 here, 128 + 64 = 192 in DeepSeek-V3."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self):
        """One latent cache row, and the absorbed q/k head dim: 64 + 16 = 80 here, 512 + 64 = 576 in DeepSeek-V3."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def attention_kwargs(self):
        return dict(d_model=self.d_model, num_heads=self.num_heads, kv_lora_rank=self.kv_lora_rank,
                    qk_nope_head_dim=self.qk_nope_head_dim, qk_rope_head_dim=self.qk_rope_head_dim,
                    v_head_dim=self.v_head_dim, context_length=self.context_length, q_lora_rank=self.q_lora_rank,
                    rope_theta=self.rope_theta, norm_eps=self.norm_eps)


# DeepSeek-V3's dims (its config.json); its MoE MLPs, 3 dense first layers and YaRN are not modelled here.
DEEPSEEK_V3 = MLAConfig(vocab_size=129_280, d_model=7168, num_layers=61, num_heads=128, q_lora_rank=1536,
                        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                        hidden_dim=18_432, context_length=4096)


def cache_bytes_per_token(config, element_size):
    """(latent, mha): bytes one token adds to the caches of all layers, MLA's latent cache against the
    naive form's per-head K and V (what multi-head attention of the same model would cache)."""
    latent = config.num_layers * config.latent_dim * element_size
    mha = config.num_layers * config.num_heads * (config.qk_head_dim + config.v_head_dim) * element_size
    return latent, mha


# ----------------------------------------------------------------------------
# The latent cache: one row of kv_lora_rank + rope per token, k and v two views of it
# ----------------------------------------------------------------------------
class LatentCache(KVCache):
    """MLA's cache for one layer: (batch, 1, capacity, kv_lora_rank + rope), or paged like KVCache.

    `k` is the whole latent row [c_kv ; k_pe] and `v` a view of its first kv_lora_rank columns
    (c_kv): one tensor, which the attention functions read once. A single kv head, shared by every
    query head of the absorbed form.
    """

    def __init__(self, batch, kv_lora_rank, qk_rope_head_dim, capacity, *, dtype=None, device=None,
                 block_size=None, num_blocks=None):
        for name, n in (("kv_lora_rank", kv_lora_rank), ("qk_rope_head_dim", qk_rope_head_dim)):
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"{name} must be an int >= 1, got {n!r}")
        self.kv_lora_rank = kv_lora_rank
        super().__init__(batch, 1, kv_lora_rank + qk_rope_head_dim, capacity, dtype=dtype, device=device,
                         block_size=block_size, num_blocks=num_blocks)

    def _new_storage(self, shape, dtype, device):
        latent = torch.zeros(shape, dtype=dtype, device=device)
        return latent, latent[..., :self.kv_lora_rank]  # v: c_kv, the first kv_lora_rank columns

    @property
    def latent_dim(self):
        return self.k.shape[-1]

    def append(self, latent: torch.Tensor) -> None:
        """Write latent (batch, 1, num_tokens, kv_lora_rank + rope) after each sequence's cached tokens."""
        if not isinstance(latent, torch.Tensor):
            raise TypeError(f"latent must be a torch.Tensor, got {type(latent).__name__}")
        if latent.dim() != 4 or latent.shape[:2] != (self.batch, 1) or latent.shape[3] != self.latent_dim:
            raise ValueError(f"latent must have shape ({self.batch}, 1, num_tokens, {self.latent_dim}), "
                             f"got {tuple(latent.shape)}")
        if latent.dtype != self.k.dtype:
            raise TypeError(f"latent has dtype {latent.dtype} but the cache has {self.k.dtype}")
        num_tokens = latent.shape[2]
        positions = self.positions(num_tokens)  # (B, n): each sequence's next positions, from the host's lengths
        new_lengths = self._make_room(num_tokens)  # pages first: the table may grow
        if self.block_table is None:
            rows, slots = torch.arange(self.batch, device=positions.device)[:, None].expand_as(positions), positions
        else:  # position p of sequence b: page block_table[b, p // block_size], row p % block_size
            rows = self.block_table.to(torch.int64).gather(1, positions // self.block_size)
            slots = positions % self.block_size
        # One write: k and v are views of the same rows (KVCache.append writes K and V apart).
        # Two index tensors around a slice: the indexed view is (B, n, 1, L+R).
        self.k[rows, :, slots] = latent.transpose(1, 2)  # (B, 1, n, L+R) -> (B, n, 1, L+R)
        self.seqlens = self.seqlens + num_tokens
        self.lengths = new_lengths


# ----------------------------------------------------------------------------
# The attention block
# ----------------------------------------------------------------------------
class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V2/V3 attention, causal: (b, num_tokens, d_model) -> (b, num_tokens, d_model).

    Without a cache it runs the naive form (keys and values decompressed per head); with a
    LatentCache, the absorbed form over the cache (`attend_cached`). Parameter names are Hugging
    Face's DeepseekV3Attention's.
    """

    def __init__(self, d_model, num_heads, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim,
                 context_length, q_lora_rank=None, rope_theta=10_000.0, norm_eps=1e-6, dtype=None, dropout=0.0):
        super().__init__()
        for name, n in (("d_model", d_model), ("num_heads", num_heads), ("kv_lora_rank", kv_lora_rank),
                        ("qk_nope_head_dim", qk_nope_head_dim), ("qk_rope_head_dim", qk_rope_head_dim),
                        ("v_head_dim", v_head_dim), ("context_length", context_length)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{name} must be an int >= 1, got {n!r}")
        if q_lora_rank is not None and (isinstance(q_lora_rank, bool) or not isinstance(q_lora_rank, int)
                                        or q_lora_rank < 1):
            raise ValueError(f"q_lora_rank must be None (no query compression) or an int >= 1, got {q_lora_rank!r}")
        if qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even: RoPE rotates pairs of features, got {qk_rope_head_dim}")
        self.d_model, self.num_heads, self.context_length = d_model, num_heads, context_length
        self.q_lora_rank, self.kv_lora_rank = q_lora_rank, kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.softmax_scale = self.qk_head_dim ** -0.5  # the naive dot product's length, in both forms
        if q_lora_rank is None:
            self.q_proj = nn.Linear(d_model, num_heads * self.qk_head_dim, bias=False, dtype=dtype)
        else:
            self.q_a_proj = nn.Linear(d_model, q_lora_rank, bias=False, dtype=dtype)
            self.q_a_layernorm = RMSNorm(q_lora_rank, norm_eps, dtype)
            self.q_b_proj = nn.Linear(q_lora_rank, num_heads * self.qk_head_dim, bias=False, dtype=dtype)
        # W_DKV and W_KR side by side: x -> [c_kv (kv_lora_rank) ; k_pe (rope)], "with MQA": k_pe has one head.
        self.kv_a_proj_with_mqa = nn.Linear(d_model, kv_lora_rank + qk_rope_head_dim, bias=False, dtype=dtype)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, norm_eps, dtype)
        # [W_UK ; W_UV] per head: c_kv -> (num_heads, qk_nope_head_dim + v_head_dim)
        self.kv_b_proj = nn.Linear(kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim), bias=False, dtype=dtype)
        self.o_proj = nn.Linear(num_heads * v_head_dim, d_model, bias=False, dtype=dtype)
        self.causal = True
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", future_mask(context_length), persistent=False)
        cos, sin = rope_tables(qk_rope_head_dim, context_length, rope_theta, dtype)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    # --- projections -------------------------------------------------------------------------
    def project_queries(self, x):
        """x (b, n, d_model) -> q_nope (b, H, n, qk_nope_head_dim), q_pe (b, H, n, qk_rope_head_dim), unrotated."""
        b, n, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        # (b, n, H * qk_head_dim) -> (b, n, H, qk_head_dim) -> (b, H, n, qk_head_dim)
        q = q.view(b, n, self.num_heads, self.qk_head_dim).transpose(1, 2)
        return q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

    def project_latent(self, x):
        """x (b, n, d_model) -> c_kv (b, 1, n, kv_lora_rank), normalised, and k_pe (b, 1, n, rope), unrotated."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        # (b, n, L) -> (b, 1, n, L): one "kv head" shared by every query head
        return self.kv_a_layernorm(c_kv).unsqueeze(1), k_pe.unsqueeze(1)

    def up_weights(self):
        """kv_b_proj split per head: W_UK (H, qk_nope_head_dim, kv_lora_rank), W_UV (H, v_head_dim, kv_lora_rank)."""
        # (H * (nope + v), L) -> (H, nope + v, L)
        w = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)

    # --- the naive form ---------------------------------------------------------------------
    def decompress(self, q_nope, q_pe, c_kv, k_pe):
        """Per-head queries, keys (b, H, n, nope + rope) and values (b, H, n, v_head_dim) from the latents."""
        b, _, n, _ = c_kv.shape
        # (b, 1, n, L) -> (b, 1, n, H * (nope + v)) -> (b, n, H, nope + v) -> (b, H, n, nope + v)
        kv = self.kv_b_proj(c_kv).view(b, n, self.num_heads, -1).transpose(1, 2)
        k_nope, values = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        # The rotary key is shared: (b, 1, n, rope) -> (b, H, n, rope), then beside each head's k_nope.
        keys = torch.cat([k_nope, k_pe.expand(-1, self.num_heads, -1, -1)], dim=-1)
        return torch.cat([q_nope, q_pe], dim=-1), keys, values

    def attend(self, queries, keys, values):
        """Causal attention, (b, H, Nq, qk_head_dim) x2, (b, H, Nk, v_head_dim) -> (b, H, Nq, v_head_dim)."""
        n_q, n_k = queries.shape[-2], keys.shape[-2]
        return explicit_attention(queries, keys, values, hidden=self.mask[:n_q, :n_k], dropout=self.dropout)

    # --- the absorbed form ------------------------------------------------------------------
    def absorb_queries(self, q_nope, q_pe):
        """[q_nope W_UK^T ; q_pe]: (b, H, n, nope), (b, H, n, rope) -> (b, H, n, kv_lora_rank + rope)."""
        w_uk, _ = self.up_weights()
        q_latent = torch.einsum("bhnd,hdl->bhnl", q_nope, w_uk)  # (b, H, n, nope) -> (b, H, n, L)
        return torch.cat([q_latent, q_pe], dim=-1)

    def absorb_output(self, o_latent):
        """Attention's latent output times W_UV: (b, H, n, kv_lora_rank) -> (b, H, n, v_head_dim)."""
        _, w_uv = self.up_weights()
        return torch.einsum("bhnl,hvl->bhnv", o_latent, w_uv)

    def attend_cached(self, q_nope, q_pe, c_kv, k_pe, cache):
        """Append this step's latent rows, then the absorbed form over the whole cache, per sequence.

        Bottom-right causal: new token t of sequence b sees its cached tokens and new tokens up to t.
        """
        cache.append(torch.cat([c_kv, k_pe], dim=-1))  # (b, 1, n, L + rope)
        queries = self.absorb_queries(q_nope, q_pe)
        # q/k head dim L + rope, v head dim L, one kv head for all H query heads
        o_latent = paged_attention(queries, cache.k, cache.v, cache.seqlens, cache.block_table, causal=True,
                                   sm_scale=self.softmax_scale)
        return self.absorb_output(o_latent)

    # --- forward ----------------------------------------------------------------------------
    def check_cache(self, cache):
        if not isinstance(cache, LatentCache):
            raise TypeError(f"cache must be a reference.LatentCache (one latent row per token), "
                            f"got {type(cache).__name__}")
        if (cache.kv_lora_rank, cache.latent_dim) != (self.kv_lora_rank, self.kv_lora_rank + self.qk_rope_head_dim):
            raise ValueError(f"cache holds latent rows of {cache.kv_lora_rank} + {cache.latent_dim - cache.kv_lora_rank}"
                             f" dims but this layer makes {self.kv_lora_rank} + {self.qk_rope_head_dim}")
        if self.training and self.dropout.p > 0:
            raise ValueError("a KV cache is for inference: attention dropout is not applied with one; "
                             "call .eval() or set dropout=0.0")

    def forward(self, x, cache=None):
        """x: (b, num_tokens, d_model). cache: a LatentCache, or None to attend within x only (naive form)."""
        check_tokens(x, self.d_model, d_name="d_model", context_length=self.context_length)
        num_tokens = x.shape[1]
        q_nope, q_pe = self.project_queries(x)
        c_kv, k_pe = self.project_latent(x)
        if cache is None:
            cos, sin = self.cos[:num_tokens], self.sin[:num_tokens]  # (n, rope): positions 0..n-1
        else:
            self.check_cache(cache)
            if max(cache.lengths) + num_tokens > self.context_length:
                raise ValueError(f"{num_tokens} new tokens after {max(cache.lengths)} cached ones pass "
                                 f"context_length ({self.context_length})")
            positions = cache.positions(num_tokens)  # (b, n): each sequence continues from its own length
            cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)  # (b, 1, n, rope)
        q_pe, k_pe = apply_rope(q_pe, cos, sin), apply_rope(k_pe, cos, sin)
        if cache is None:
            context = self.attend(*self.decompress(q_nope, q_pe, c_kv, k_pe))
        else:
            context = self.attend_cached(q_nope, q_pe, c_kv, k_pe, cache)
        return self.o_proj(merge_heads(context))  # (b, H, n, v) -> (b, n, H * v) -> (b, n, d_model)


# ----------------------------------------------------------------------------
# The model: reference/llama.py's decoder with MLA in every layer
# ----------------------------------------------------------------------------
class MLAModel(Llama):
    """(b, n) token ids -> (b, n, vocab_size) logits: Llama's pre-norm blocks and SwiGLU with MLA attention.

    `generate(prompts, max_new_tokens, use_cache=True, block_size=None)` is Llama's: greedy, ragged
    prompts right-padded for one prefill, then one token per step; the caches are LatentCaches.
    """

    attention_class = MultiHeadLatentAttention

    def __init__(self, config=None, dtype=None, **attention_kwargs):
        nn.Module.__init__(self)  # Llama's layers take GQA arguments: built here instead
        self.config = config = config or MLAConfig()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model, dtype=dtype)
        self.layers = nn.ModuleList(
            LlamaBlock(config, self.attention_class(**config.attention_kwargs(), dtype=dtype, **attention_kwargs),
                       dtype)
            for _ in range(config.num_layers)
        )
        self.norm = RMSNorm(config.d_model, config.norm_eps, dtype)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False, dtype=dtype)

    def new_caches(self, batch, capacity, block_size=None):
        """One empty LatentCache per layer, in the model's dtype, on its device (paged if block_size is given)."""
        weight = self.lm_head.weight
        return [LatentCache(batch, self.config.kv_lora_rank, self.config.qk_rope_head_dim, capacity,
                            dtype=weight.dtype, device=weight.device, block_size=block_size) for _ in self.layers]
