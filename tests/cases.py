"""The one shared list of attention shapes every kernel test runs over.

Each case says why it is there. Under the interpreter (the CPU suite) the
kernels use BLOCK_M = 64 and BLOCK_N = 32, so lengths around 32/64/128 put
block edges in interesting places; on a GPU the autotuned blocks differ and
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
# integer specialisation) is a fresh Triton compile of some 19 autotune configs, 10 to 20 s
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
