"""The one shared list of attention shapes every kernel test runs over.

Each case says why it is there. Under the interpreter (the CPU suite) the
kernels use BLOCK_M = 64 and BLOCK_N = 32, so lengths around 32/64/128 put
block edges in interesting places; on a GPU the chosen blocks differ and
the `gpu` set adds long sequences.
"""
from dataclasses import dataclass

import pytest
import torch


@dataclass(frozen=True)
class AttentionCase:
    batch: int
    h_q: int
    h_kv: int
    n_q: int
    n_k: int
    head_dim: int
    causal: bool

    @property
    def kind(self) -> str:
        return "mha" if self.h_q == self.h_kv else "mqa" if self.h_kv == 1 else "gqa"

    @property
    def id(self) -> str:
        lengths = f"n{self.n_q}" if self.n_q == self.n_k else f"q{self.n_q}-k{self.n_k}"
        mask = "causal" if self.causal else "full"
        return f"{self.kind}-b{self.batch}-h{self.h_q}x{self.h_kv}-{lengths}-d{self.head_dim}-{mask}"

    def make_inputs(self, dtype, device, requires_grad=False):
        """Random q, k, v (never zeros: zeros hide unwritten outputs)."""
        def rand(h, n):
            return torch.randn(self.batch, h, n, self.head_dim, dtype=dtype, device=device,
                               requires_grad=requires_grad)
        return rand(self.h_q, self.n_q), rand(self.h_kv, self.n_k), rand(self.h_kv, self.n_k)


def _both_masks(**shape):
    return [AttentionCase(**shape, causal=False), AttentionCase(**shape, causal=True)]


KINDS = {"mha": (2, 2), "gqa": (4, 2), "mqa": (4, 1)}

ATTENTION_CASES = [
    # mha, gqa and mqa on a length that is not a multiple of any block.
    *[case for h_q, h_kv in KINDS.values() for case in _both_masks(batch=2, h_q=h_q, h_kv=h_kv, n_q=97, n_k=97,
                                                                    head_dim=64)],
    # Ragged lengths: a single token; shorter than one block; one block and a bit
    # (130 = 2*64 + 2 leaves a 2-row tail); several blocks and a 1-row tail (257).
    *[case for n in (1, 7, 130, 257) for case in _both_masks(batch=1, h_q=2, h_kv=1, n_q=n, n_k=n, head_dim=32)],
    # Nq != Nk both ways. Causal aligns bottom-right: with Nq < Nk (decoding with a
    # cache) the last query sees every key; with Nq > Nk the first Nq - Nk queries see
    # no key at all and must output 0, not NaN.
    *[case for n_q, n_k in ((7, 130), (130, 7), (97, 257), (257, 97), (1, 130), (65, 64))
      for case in _both_masks(batch=1, h_q=4, h_kv=2, n_q=n_q, n_k=n_k, head_dim=32)],
    # Head dims: 8 is the seed's demo; 40 and 80 are not powers of two (padded to 64
    # and 128 inside the kernel); 256 is the largest supported.
    *[case for d in (8, 16, 40, 80, 128, 256) for case in _both_masks(batch=1, h_q=2, h_kv=1, n_q=70, n_k=70,
                                                                       head_dim=d)],
]

# A few cases for the slower checks (gradients in every dtype, strides, determinism).
SMALL_CASES = [
    AttentionCase(batch=2, h_q=4, h_kv=2, n_q=97, n_k=97, head_dim=40, causal=True),
    AttentionCase(batch=1, h_q=4, h_kv=1, n_q=130, n_k=33, head_dim=64, causal=True),
    AttentionCase(batch=1, h_q=2, h_kv=2, n_q=33, n_k=130, head_dim=16, causal=False),
]

# Long sequences, only where a GPU makes them affordable. Every (dtype, head dim, causal,
# integer specialisation) is a fresh Triton compile of the chosen configs, seconds
# of CPU for sm_90, and each case runs in fp16 and bf16: three cases keep `pytest -m gpu`
# inside gpu_check.sh's 140 s limit. The head dim 128 case specialises like the sweep's
# 32:8 GQA (Hq and every length a multiple of 16, group 4), so its bf16 kernels are usually
# already in the cache that bench.precompile fills alongside; it comes last to give it time.
# Not run on the GPU: head dims that need padding (80; the CPU cases cover them) and MHA at
# head dim 128 (the sweep's correctness rows report its error).
GPU_CASES = [
    # Non-causal MQA at 8k.
    AttentionCase(batch=1, h_q=8, h_kv=1, n_q=8192, n_k=8192, head_dim=64, causal=False),
    # Head dim 256 (small tiles); Nq > Nk: 7000 rows see no key; Nk not a multiple of 16.
    AttentionCase(batch=1, h_q=4, h_kv=4, n_q=8000, n_k=1000, head_dim=256, causal=True),
    # The sweep's head dim and causal GQA, with Nq < Nk: the causal mask aligned bottom-right.
    AttentionCase(batch=1, h_q=16, h_kv=4, n_q=4000, n_k=8000, head_dim=128, causal=True),
]

# The forward's Hopper options (descriptor loads, warp specialization), forced under the
# interpreter with its 64 x 32 tiles: where a TMA copy's zero fill replaces _load_tile's masks.
HOPPER_CASES = [
    # GQA with Nq != Nk, both ragged: the last key block runs past N_K (rows the descriptor
    # zero-fills, whose scores must still be masked), head dim 80 padded to 128 by the
    # descriptor's column bound; causal and not.
    *_both_masks(batch=1, h_q=4, h_kv=2, n_q=97, n_k=130, head_dim=80),
    # Causal with Nq > Nk, MQA, batch 2: 97 rows see no key and output 0; the key length is
    # one block and a row; each (batch, head) builds its descriptors from its own start.
    AttentionCase(batch=2, h_q=2, h_kv=1, n_q=130, n_k=33, head_dim=32, causal=True),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def params(cases):
    """pytest.param for each case, with a readable id."""
    return [pytest.param(case, id=case.id) for case in cases]


def dtype_params():
    return [pytest.param(dtype, id=str(dtype).replace("torch.", "")) for dtype in DTYPES]


# ----------------------------------------------------------------------------
# Attention variants (window, softcap, ALiBi, sinks): each case is one shape with
# its options; tests run it causal and not, in every dtype, forward and backward.
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class VariantCase:
    shape: AttentionCase  # its `causal` is overridden by the test's parameter
    window_size: tuple | None = None
    softcap: float | None = None
    alibi: str | None = None  # "heads": slopes (Hq,); "batch": slopes (B, Hq)
    sinks: bool = False
    why: str = ""

    @property
    def id(self) -> str:
        parts = [f"window{self.window_size[0]}-{self.window_size[1]}" if self.window_size else "",
                 f"softcap{self.softcap:g}" if self.softcap else "", f"alibi-{self.alibi}" if self.alibi else "",
                 "sinks" if self.sinks else ""]
        s = self.shape
        return "+".join(p for p in parts if p) + f"-{s.kind}-q{s.n_q}-k{s.n_k}-d{s.head_dim}"

    def options(self, device, requires_grad=False):
        """The keyword options for flash_attention / naive_attention, with fresh random slopes and sinks."""
        s = self.shape
        options = {}
        if self.window_size:
            options["window_size"] = self.window_size
        if self.softcap:
            options["softcap"] = self.softcap
        if self.alibi:
            shape = (s.h_q,) if self.alibi == "heads" else (s.batch, s.h_q)
            options["alibi_slopes"] = torch.rand(shape, device=device) * 0.5  # BLOOM's slopes are in (0, 1)
        if self.sinks:
            options["sinks"] = torch.randn(s.h_q, device=device).requires_grad_(requires_grad)
        return options


def _shape(batch, h_q, h_kv, n_q, n_k, head_dim):
    return AttentionCase(batch=batch, h_q=h_q, h_kv=h_kv, n_q=n_q, n_k=n_k, head_dim=head_dim, causal=False)


VARIANT_CASES = [
    VariantCase(_shape(1, 4, 2, 97, 130, 40), window_size=(16, 8),
                why="a two-sided window narrower than the sequence: edge blocks masked on both sides, GQA, Nq < Nk"),
    VariantCase(_shape(1, 4, 1, 130, 97, 32), window_size=(24, -1),
                why="left limit only (-1: FlashAttention's unlimited), MQA, Nq > Nk"),
    VariantCase(_shape(2, 2, 2, 70, 70, 16), window_size=(3, 0),
                why="a window far narrower than a block: no key block is ever wholly visible"),
    VariantCase(_shape(1, 4, 2, 70, 97, 64), softcap=5.0, why="soft-capping with GQA; its gradient carries 1 - tanh^2"),
    VariantCase(_shape(1, 2, 1, 33, 33, 80), softcap=0.5,
                why="a cap below the scores' spread: tanh saturates; head dim 80 is padded to 128"),
    VariantCase(_shape(2, 4, 2, 97, 97, 32), alibi="heads", why="ALiBi with one slope per head, GQA"),
    VariantCase(_shape(2, 2, 2, 33, 70, 16), alibi="batch", why="ALiBi slopes per (batch, head), Nq < Nk"),
    VariantCase(_shape(1, 4, 1, 130, 33, 32), sinks=True,
                why="sinks with Nq > Nk: causal rows that see no key output 0 with lse = the sink; MQA"),
    VariantCase(_shape(1, 4, 2, 57, 57, 24), sinks=True, window_size=(20, 0),
                why="gpt-oss: sinks with a sliding window"),
    VariantCase(_shape(1, 4, 2, 97, 70, 48), window_size=(32, 4), softcap=2.0, alibi="heads",
                why="window, softcap and ALiBi together, as FlashAttention orders them"),
]


# ----------------------------------------------------------------------------
# Paged attention over a KV cache (kernels/paged.py): decode steps, verification, prefill chunks
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class PagedCase:
    """One serving step: each sequence's new tokens against its cached keys [leftpad, seqlens).

    new: an int, the dense layout (B, Hq, Nq, D) with that many new tokens per sequence; or a tuple
    of counts, the packed layout (total_q, Hq, D) with cu_seqlens_q. block_size None is the
    contiguous cache; an int is a paged one (any page size), with a shuffled block table,
    `shared_blocks` leading blocks of sequence 0 reused by sequence 1, and, with `vllm_pool`, the
    pool stored (num_blocks, block_size, Hkv, D) and passed as a permuted view. leftpad: each
    sequence's first key (a left-padded batch). options: flash_attention's variants, as pairs;
    alibi and sinks are drawn per head. num_splits None lets the launcher choose.
    """
    seqlens: tuple
    h_q: int
    h_kv: int
    new: object
    head_dim: int
    causal: bool
    num_splits: int | None
    block_size: int | None = None
    shared_blocks: int = 0
    vllm_pool: bool = False
    leftpad: tuple | None = None
    options: tuple = ()

    @property
    def packed(self) -> bool:
        return isinstance(self.new, tuple)

    @property
    def counts(self) -> tuple:
        return self.new if self.packed else (self.new,) * len(self.seqlens)

    @property
    def id(self) -> str:
        layout = "contig" if self.block_size is None else f"paged{self.block_size}"
        if self.shared_blocks:
            layout += f"-shared{self.shared_blocks}"
        if self.vllm_pool:
            layout += "-vllm"
        if self.leftpad:
            layout += "-leftpad"
        lengths = "-".join(map(str, self.seqlens))
        new = "q" + ("-".join(map(str, self.new)) + "packed" if self.packed else str(self.new))
        extras = "".join(f"-{name}" for name, _ in self.options)
        return (f"{layout}-n{lengths}-h{self.h_q}x{self.h_kv}-{new}-d{self.head_dim}-"
                f"{'causal' if self.causal else 'full'}-s{self.num_splits}{extras}")

    def kwargs(self, device):
        """The call's keyword arguments beyond the tensors: the variants, alibi slopes and sinks drawn here."""
        gen = torch.Generator().manual_seed(1)
        options = {}
        for name, value in self.options:
            if name == "alibi":
                options["alibi_slopes"] = torch.rand(self.h_q, generator=gen).to(device)
            elif name == "sinks":
                options["sinks"] = torch.randn(self.h_q, generator=gen).to(device)
            else:
                options[name] = value
        return options

    def make_inputs(self, dtype, device, seed=0):
        """dict: q (a strided view), k_cache, v_cache, seqused_k, block_table, cu_seqlens_q, max_seqlen_q,
        cache_leftpad.

        Every cache row no sequence owns (past its end, before its leftpad, in a spare page) is NaN:
        a kernel that reads one, or a wrong page, turns its output to NaN.
        """
        gen = torch.Generator().manual_seed(seed)
        batch, d = len(self.seqlens), self.head_dim
        if self.packed:
            # (total_q, Hq, D) as the rows of a (total_q, Hq * D + 8) projection: strided, not contiguous.
            total = sum(self.new)
            q = torch.randn(total, self.h_q * d + 8, generator=gen)[:, :self.h_q * d].view(total, self.h_q, d)
            cu = torch.tensor([0, *torch.tensor(self.new).cumsum(0).tolist()], dtype=torch.int32, device=device)
            max_new = max(self.new)
        else:
            # (B, Nq, Hq, D) -> (B, Hq, Nq, D), strided like the projections' views.
            q = torch.randn(batch, self.new, self.h_q, d, generator=gen).transpose(1, 2)
            cu, max_new = None, None
        q = q.to(dtype).to(device)
        seqlens = torch.tensor(self.seqlens, dtype=torch.int32, device=device)
        starts = self.leftpad or (0,) * batch
        leftpad = torch.tensor(self.leftpad, dtype=torch.int32, device=device) if self.leftpad else None
        inputs = dict(q=q, seqused_k=seqlens, cu_seqlens_q=cu, max_seqlen_q=max_new, cache_leftpad=leftpad)
        if self.block_size is None:
            capacity = max(self.seqlens) + 5
            k, v = (torch.randn(batch, self.h_kv, capacity, d, generator=gen) for _ in range(2))
            rows = torch.arange(capacity)[None, :]
            owned = (rows < torch.tensor(self.seqlens)[:, None]) & (rows >= torch.tensor(starts)[:, None])
            for t in (k, v):
                t.masked_fill_(~owned[:, None, :, None], float("nan"))
            return dict(inputs, k_cache=k.to(dtype).to(device), v_cache=v.to(dtype).to(device), block_table=None)
        bs = self.block_size
        blocks_per_seq = [-(-n // bs) for n in self.seqlens]
        num_blocks = sum(blocks_per_seq) + 3  # three spare blocks, never referenced
        order = torch.randperm(num_blocks, generator=gen).tolist()
        table = torch.full((batch, max(blocks_per_seq) + 1), -1, dtype=torch.int32)  # -1 past the end: never read
        for b, n_blocks in enumerate(blocks_per_seq):
            table[b, :n_blocks] = torch.tensor([order.pop() for _ in range(n_blocks)])
        if self.shared_blocks:  # prefix sharing: sequence 1 starts with sequence 0's blocks
            table[1, :self.shared_blocks] = table[0, :self.shared_blocks]
        shape = (num_blocks, bs, self.h_kv, d) if self.vllm_pool else (num_blocks, self.h_kv, bs, d)
        k_pool, v_pool = (torch.randn(shape, generator=gen) for _ in range(2))
        owned = torch.zeros(num_blocks, bs, dtype=torch.bool)
        for b, (start, n) in enumerate(zip(starts, self.seqlens)):
            rows = torch.arange(start, n)
            owned[table[b, rows // bs].long(), rows % bs] = True
        mask = owned[:, :, None, None] if self.vllm_pool else owned[:, None, :, None]
        for t in (k_pool, v_pool):
            t.masked_fill_(~mask, float("nan"))
        k_pool, v_pool = k_pool.to(dtype).to(device), v_pool.to(dtype).to(device)
        if self.vllm_pool:  # (num_blocks, bs, Hkv, D) -> (num_blocks, Hkv, bs, D), a view
            k_pool, v_pool = k_pool.permute(0, 2, 1, 3), v_pool.permute(0, 2, 1, 3)
        return dict(inputs, k_cache=k_pool, v_cache=v_pool, block_table=table.to(device))


# Under the interpreter a tile is 16 to 64 rows (new tokens x the heads of a kv group) by 64 keys
# (32 when a key row passes 256 bytes: fp32 with D > 64, D = 256), and a split takes at least 256
# keys: ceil(keys / splits) rounded up to a tile.
PAGED_CASES = [
    # Decode: ragged lengths in one batch (one key, less than a tile, several tiles, 1000 keys over
    # 3 splits of 384, the last short).
    PagedCase(seqlens=(1, 7, 300, 1000), h_q=8, h_kv=2, new=1, head_dim=64, causal=True, num_splits=3),
    # The same lengths paged in blocks of 16 with a shuffled table (a tile spans four blocks), the
    # launcher's own split count, a head dim that is not a power of two, no mask.
    PagedCase(seqlens=(1, 7, 300, 1000), h_q=8, h_kv=2, new=1, head_dim=40, causal=False, num_splits=None,
              block_size=16),
    # A mixed serving batch, packed: a decode step, 4 speculative tokens to verify, a 40-token chunk
    # over a cached prefix, a whole 70-token prompt (no prefix), a sequence with no new token.
    # Group 3 (not a power of two) packs 5 tokens into each 16-row tile.
    PagedCase(seqlens=(300, 45, 100, 70, 12), h_q=6, h_kv=2, new=(1, 4, 40, 70, 0), head_dim=64, causal=True,
              num_splits=None, block_size=16),
    # The same batch over a token-granular pool (page size 1, as SGLang's), vLLM's layout.
    PagedCase(seqlens=(300, 45, 100, 70, 12), h_q=6, h_kv=2, new=(1, 4, 40, 70, 0), head_dim=64, causal=True,
              num_splits=None, block_size=1, vllm_pool=True),
    # A page size that is no power of two, prefix sharing, MHA, the largest head dim, split.
    PagedCase(seqlens=(100, 130), h_q=2, h_kv=2, new=3, head_dim=256, causal=True, num_splits=3, block_size=12,
              shared_blocks=4),
    # A left-padded batch (prompts right-aligned in a contiguous cache); MQA; 3 tokens, no mask;
    # fp32 at D 80 takes 32-key tiles.
    PagedCase(seqlens=(48, 128, 17), h_q=4, h_kv=1, new=3, head_dim=80, causal=False, num_splits=2,
              leftpad=(20, 0, 9)),
    # More splits than tiles: of 8 splits, 2 hold keys of the 600-key sequence; the rest are empty
    # and must weigh nothing in the merge, sinks or not. Head dim 1.
    PagedCase(seqlens=(600, 20), h_q=8, h_kv=2, new=3, head_dim=1, causal=True, num_splits=8,
              options=(("sinks", None),)),
    # Nq 16, causal, with a sequence of exactly 16 keys: query i sees keys 0..i only.
    PagedCase(seqlens=(16, 33), h_q=4, h_kv=2, new=16, head_dim=16, causal=True, num_splits=2),
    # Mistral, Gemma 2 and gpt-oss decode steps: window, softcap + window, sinks + window, split.
    PagedCase(seqlens=(700, 90), h_q=8, h_kv=2, new=1, head_dim=64, causal=True, num_splits=None,
              block_size=16, options=(("window_size", (127, 0)),)),
    PagedCase(seqlens=(700, 90), h_q=8, h_kv=2, new=2, head_dim=64, causal=True, num_splits=3,
              options=(("softcap", 20.0), ("window_size", (63, 0)))),
    PagedCase(seqlens=(300, 45, 100), h_q=8, h_kv=2, new=(1, 4, 40), head_dim=48, causal=True, num_splits=None,
              block_size=16, options=(("sinks", None), ("window_size", (32, 0)))),
    # ALiBi over a chunk and a left-padded decode row (distances from each new token's position).
    PagedCase(seqlens=(80, 64), h_q=4, h_kv=2, new=5, head_dim=32, causal=True, num_splits=None,
              leftpad=(3, 30), options=(("alibi", None),)),
]


# ----------------------------------------------------------------------------
# fp8 attention (kernels/fp8.py): e4m3 or e5m2 q, k, v with descales, a 16-bit output
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Fp8Case:
    shape: AttentionCase
    fp8: torch.dtype = torch.float8_e4m3fn
    out: torch.dtype = torch.bfloat16
    per_head: bool = True  # descales (B, Hkv) per sequence and kv head, else one per tensor
    why: str = ""

    @property
    def id(self) -> str:
        fp8 = "e4m3" if self.fp8 == torch.float8_e4m3fn else "e5m2"
        out = str(self.out).removeprefix("torch.")
        return f"{self.shape.id}-{fp8}-{out}-{'per_head' if self.per_head else 'per_tensor'}"


FP8_CASES = [
    Fp8Case(AttentionCase(2, 4, 2, 97, 97, 64, False), why="GQA over a ragged length, per-head descales"),
    Fp8Case(AttentionCase(2, 4, 2, 97, 97, 64, True), out=torch.float16, per_head=False,
            why="causal, fp16 out, one descale per tensor"),
    Fp8Case(AttentionCase(1, 4, 1, 7, 130, 32, True), why="MQA, a short query over a long cache (bottom-right)"),
    Fp8Case(AttentionCase(1, 4, 2, 130, 7, 32, True), per_head=False,
            why="Nq > Nk, causal: 123 rows see no key and output exactly 0"),
    Fp8Case(AttentionCase(1, 2, 2, 257, 257, 80, False), fp8=torch.float8_e5m2,
            why="e5m2, head dim 80 padded to 128, a 1-row tail block"),
    Fp8Case(AttentionCase(1, 2, 1, 70, 70, 256, True), why="the largest head dim"),
    Fp8Case(AttentionCase(1, 2, 2, 70, 33, 16, False), out=torch.float16, per_head=False,
            why="head dim 16, padded to 32 (the fp8 MMA's K)"),
    Fp8Case(AttentionCase(2, 2, 1, 1, 130, 40, False), fp8=torch.float8_e5m2, out=torch.float16,
            why="a decode-shaped single query, e5m2, head dim 40"),
]
