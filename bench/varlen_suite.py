"""The varlen suite: a packed batch of ragged sequences against the same batch padded to its longest.

Every case is causal (a prefill). Right padding keeps the padded providers
exact on the real tokens: under a causal mask a real query never reaches
a padded key, which sits after every real one.

    triton-varlen   kernels.flash_attention_varlen on the packed (total, H, D) batch:
                    no work on padding
    triton-unpad    modules.padded_attention from the padded batch: unpad, varlen, pad
                    back (what a model with a padding mask calls); the copies are timed
    triton-padded   kernels.flash_attention on the padded (B, H, N_max, D) batch
    sdpa-padded     SDPA on the padded batch with its dense (B, 1, N_max, N_max) mask
                    (causal and key-is-real), as Hugging Face builds it

TFLOP/s count the real tokens only, by FlashAttention's convention per
sequence (4 H L^2 D, x0.5 causal, x2.5 backward): a padded provider is
credited no work for its padding. Each batch also runs as one long sequence
of the same total ("B1"), the rate the GPU target compares the varlen
forward with (within 10%; not measured yet).

On the CPU, only correctness rows at one tiny batch. The jobs run through
bench/sweep.py; the suite registers itself at the end of this module
(bench/registry.py).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import providers, registry, sweep
from .flops import attention_flops
from .plan import DTYPES, KIB, MODES, Job, dtype_name, parse_heads
from .window_suite import check_modes, cpu_check

SUITE = "varlen"
BASELINE = "triton-padded"


@dataclass(frozen=True)
class VarlenCase:
    lengths: tuple  # tokens per sequence
    heads_q: int
    heads_kv: int
    head_dim: int
    dtype: torch.dtype
    causal: bool = True

    @property
    def total(self):
        return sum(self.lengths)

    @property
    def heads(self):
        return str(self.heads_q) if self.heads_q == self.heads_kv else f"{self.heads_q}:{self.heads_kv}"

    @property
    def shape(self):
        return (f"B{len(self.lengths)} tokens{self.total} max{max(self.lengths)} H{self.heads} D{self.head_dim} "
                "causal")

    def columns(self):
        return dict(dtype=dtype_name(self.dtype), batch=len(self.lengths), heads_q=self.heads_q,
                    heads_kv=self.heads_kv, n=self.total, head_dim=self.head_dim, causal=True)

    def flops(self, mode):
        """The real tokens' work: each sequence's own causal attention."""
        return sum(attention_flops(1, self.heads_q, n, n, self.head_dim, True, mode) for n in self.lengths)


# ----------------------------------------------------------------------------
# Inputs: one packed batch, and the same values padded on the right
# ----------------------------------------------------------------------------
@dataclass
class Batch:
    q: torch.Tensor  # packed (total, Hq, D) or padded (B, Hq, N_max, D)
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens: torch.Tensor  # (B + 1,) int32
    max_seqlen: int
    mask: torch.Tensor  # (B, N_max) bool, True = a real token
    indices: torch.Tensor  # the real tokens' positions in the flattened B * N_max


def make_batch(case, device, padded, requires_grad=False):
    """Random packed q, k, v (or the same values padded on the right), with the batch's bookkeeping."""
    from modules import pad_input, unpad_input

    lengths = torch.tensor(case.lengths, device=device)
    n_max = max(case.lengths)
    mask = torch.arange(n_max, device=device)[None, :] < lengths[:, None]  # (B, N_max), right padding
    _, indices, cu_seqlens, max_seqlen = unpad_input(mask[:, :, None], mask)
    tensors = []
    for heads in (case.heads_q, case.heads_kv, case.heads_kv):
        t = torch.randn(case.total, heads, case.head_dim, device=device, dtype=case.dtype)
        if padded:
            # (total, H, D) -> (B, N_max, H, D) -> (B, H, N_max, D), zeros at the padding
            t = pad_input(t, indices, len(case.lengths), n_max).transpose(1, 2).contiguous()
        tensors.append(t.requires_grad_(requires_grad))
    return Batch(*tensors, cu_seqlens, max_seqlen, mask, indices)


def to_packed(out, batch):
    """A padded provider's (B, Hq, N_max, D) output -> (total, Hq, D), its real rows."""
    # (B, H, N, D) -> (B, N, H, D) -> (B * N, H, D) -> (total, H, D)
    return out.transpose(1, 2).flatten(0, 1)[batch.indices]


def pad_output(packed, batch):
    """(total, Hq, D) -> (B, Hq, N_max, D), zeros at the padding: to_packed's inverse."""
    from modules import pad_input

    b, n = batch.mask.shape
    return pad_input(packed, batch.indices, b, n).transpose(1, 2)  # (B, N, H, D) -> (B, H, N, D)


# ----------------------------------------------------------------------------
# Providers: (padded inputs?, prepare(batch) -> a callable computing the output in that layout)
# ----------------------------------------------------------------------------
def _require_varlen_kernel(t):
    import kernels

    providers._require_triton_runnable(t)
    if not hasattr(kernels, "flash_attention_varlen"):
        raise providers.Unsupported("kernels.flash_attention_varlen does not exist yet")


def _triton_varlen(b):
    _require_varlen_kernel(b.q)
    from kernels import flash_attention_varlen

    return lambda: flash_attention_varlen(b.q, b.k, b.v, b.cu_seqlens, b.cu_seqlens, b.max_seqlen, b.max_seqlen,
                                          causal=True)


def _triton_unpad(b):
    _require_varlen_kernel(b.q)
    from modules import padded_attention

    return lambda: padded_attention(b.q, b.k, b.v, b.mask, causal=True)


def _triton_padded(b):
    return providers._triton(b.q, b.k, b.v, causal=True)


def _sdpa_padded(b):
    n = b.mask.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=b.q.device).tril()
    mask = (causal[None] & b.mask[:, None, :])[:, None]  # (B, 1, N_max, N_max): causal and the key is real
    gqa = b.q.shape[1] != b.k.shape[1]
    return lambda: F.scaled_dot_product_attention(b.q, b.k, b.v, attn_mask=mask, enable_gqa=gqa)


PROVIDERS = {
    "triton-varlen": (False, _triton_varlen),
    "triton-unpad": (True, _triton_unpad),
    "triton-padded": (True, _triton_padded),
    "sdpa-padded": (True, _sdpa_padded),
}


# ----------------------------------------------------------------------------
# Plan
# ----------------------------------------------------------------------------
# Two ragged batches of 16k real tokens: 8 long sequences (the padded batch is twice as big)
# and 32 short ones of odd lengths (never a multiple of a block).
LONG = (4 * KIB, 3 * KIB, 2560, 2 * KIB, 1536, 1280, 1 * KIB, 768)
SHORT = tuple(100 + (97 * i) % 900 for i in range(32))
PRESETS = {
    ("cuda", False): dict(batches=[LONG, SHORT], heads=["16"], head_dim=[128], dtype="bfloat16",
                          modes=["fwd", "bwd"]),
    ("cuda", True): dict(batches=[LONG], heads=["16"], head_dim=[128], dtype="bfloat16", modes=["fwd"]),
}
GPU_CHECK_LENGTHS = (1000, 17, 513, 64)
# On the CPU: correctness only, one tiny GQA batch with a 1-token and a block-crossing sequence.
CPU_CHECK = VarlenCase((5, 1, 33, 17), 2, 1, 32, torch.float32)


def build_jobs(args, device_type):
    """This suite's jobs (none unless --suite names it or all): checks first, then timings."""
    if "all" not in args.suite and SUITE not in args.suite:
        return []
    if device_type == "cpu":
        return [Job(SUITE, "check", p, mode, cpu_check(args, CPU_CHECK)) for p in PROVIDERS
                for mode in check_modes(args)]
    preset = PRESETS[(device_type, bool(args.quick))]
    dtype = DTYPES[args.dtype or preset["dtype"]]
    modes = [m for m in (args.modes or preset["modes"]) if m in MODES]
    jobs, timed = [], []
    for head_dim in args.head_dim or preset["head_dim"]:
        for heads in args.heads or preset["heads"]:
            h_q, h_kv = parse_heads(heads)
            check = VarlenCase(GPU_CHECK_LENGTHS, h_q, h_kv, head_dim, dtype)
            jobs += [Job(SUITE, "check", p, mode, check) for p in ("triton-varlen", "sdpa-padded")
                     for mode in ("fwd", "bwd")]
            for lengths in preset["batches"]:
                timed += [Job(SUITE, "time", p, mode, VarlenCase(lengths, h_q, h_kv, head_dim, dtype))
                          for mode in modes for p in PROVIDERS]
                one = VarlenCase((sum(lengths),), h_q, h_kv, head_dim, dtype)  # one sequence of the same total
                timed += [Job(SUITE, "time", "triton-varlen", mode, one) for mode in modes]
    return jobs + timed


# ----------------------------------------------------------------------------
# Build, check: the suite's handlers of its case type
# ----------------------------------------------------------------------------
def _prepared(job, device, requires_grad):
    padded, prepare = PROVIDERS[job.provider]
    batch = make_batch(job.case, device, padded, requires_grad)
    return batch, padded, prepare(batch)


def _build(job, device):
    batch, _, fn = _prepared(job, device, requires_grad=job.mode != "fwd")
    return sweep.mode_call(fn, job.mode, [batch.q, batch.k, batch.v])


def _check(job, device):
    """Max abs error on the real tokens against naive_attention_varlen in float64 (bwd: over dq, dk, dv)."""
    from reference import naive_attention_varlen

    batch, padded, fn = _prepared(job, device, requires_grad=job.mode == "bwd")
    pack = (lambda t: to_packed(t, batch)) if padded else (lambda t: t)
    leaves64 = [pack(t.detach()).double().requires_grad_(job.mode == "bwd") for t in (batch.q, batch.k, batch.v)]

    def reference():
        return naive_attention_varlen(*leaves64, batch.cu_seqlens, batch.cu_seqlens, causal=True)

    if job.mode == "fwd":
        with torch.no_grad():
            return sweep.max_abs_error(pack(fn()), reference())
    out = fn()
    case = job.case
    dout = torch.randn(case.total, case.heads_q, case.head_dim, device=device, dtype=out.dtype)  # (total, Hq, D)
    out.backward(pad_output(dout, batch) if padded else dout)  # padded rows get no gradient
    reference().backward(dout.double())
    return max(sweep.max_abs_error(pack(t.grad), t64.grad) for t, t64 in zip((batch.q, batch.k, batch.v), leaves64))


registry.register(registry.Suite(SUITE, build_jobs, {VarlenCase: (_build, _check)}, baseline=BASELINE))
