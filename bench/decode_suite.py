"""The decode suite: one new query token per sequence against a KV cache (`python -m bench --suite decode`).

A decode step reads the whole cache and does about one FLOP per byte, so it
is judged by time per step and by the bandwidth it reaches:

    GB/s = bytes of K and V a decode step must read (2 * B * Hkv * N * D * element size) / time

the same count for every provider (effective bandwidth: a provider that
reads K and V more than once, or copies them, is charged only once). Side by side:

    copy                 dst.copy_(k); dst.copy_(v): the device's copy bandwidth, the
                         physical limit; its GB/s counts bytes read + written
    sdpa-<backend>       F.scaled_dot_product_attention with a single query (enable_gqa)
    flex                 FlexAttention under torch.compile (GPU only)
    triton-flash         kernels.flash_attention used for decoding (Nq = 1)
    triton-decode        kernels.decode_attention on the contiguous cache (B, Hkv, N, D)
    triton-decode-paged  kernels.decode_attention on a paged cache: vLLM's pool layout
                         (num_blocks, 16, Hkv, D), read through a permuted view, shuffled blocks

Every sequence of a case has N keys. With one query, causal masking changes
nothing (the last query sees every key), so every provider runs unmasked.
On the CPU there are correctness rows only, at one small shape (the Triton
kernels run under the interpreter); on a GPU the checks come first, then the
timings. GPU figures: not measured yet (no session has had a GPU). The
serving suite (bench/serving_suite.py) takes decoding on: ragged batches over
a paged cache, next to prefill chunks.
"""
from dataclasses import dataclass

import torch

from . import providers, registry
from .plan import DTYPES, Job, dtype_name
from .report import figure_title, number, provider_lines, ratio_text, timed_rows

SUITE = "decode"

KIB = 1024
PAGED_BLOCK_SIZE = 16  # vLLM's default block size, the hardest for the block lookups
# The suite's shapes (the issue's): Llama-3-8B-like heads, bf16.
HEADS_Q, HEADS_KV, HEAD_DIM = 32, 8, 128
GPU_BATCHES = (1, 8, 64)
GPU_LENGTHS = (1 * KIB, 4 * KIB, 16 * KIB, 32 * KIB, 64 * KIB, 128 * KIB)
GPU_QUICK = ((1, 8), (4 * KIB, 32 * KIB))
GPU_PROVIDERS = ("copy", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math", "flex", "triton-flash",
                 "triton-decode", "triton-decode-paged")
CHECKED = ("triton-flash", "triton-decode", "triton-decode-paged")


@dataclass(frozen=True)
class DecodeCase:
    batch: int
    heads_q: int
    heads_kv: int
    n: int  # keys per sequence
    head_dim: int
    dtype: torch.dtype

    @property
    def shape(self):
        return f"B{self.batch} H{self.heads_q}:{self.heads_kv} KV{self.n} D{self.head_dim}"

    def columns(self):
        return dict(dtype=dtype_name(self.dtype), batch=self.batch, heads_q=self.heads_q, heads_kv=self.heads_kv,
                    n=self.n, head_dim=self.head_dim, causal=False)

    @property
    def kv_bytes(self):
        """Bytes of K and V a decode step reads: every key and value of every sequence, once."""
        element_size = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.batch * self.heads_kv * self.n * self.head_dim * element_size


def bytes_moved(job):
    """The bytes behind a row's GB/s: K and V read once; for `copy`, read and written."""
    return 2 * job.case.kv_bytes if job.provider == "copy" else job.case.kv_bytes


# ----------------------------------------------------------------------------
# Inputs and providers: prepare(inputs) -> a zero-argument callable
# ----------------------------------------------------------------------------
@dataclass
class DecodeInputs:
    q: torch.Tensor  # (B, Hq, 1, D)
    k: torch.Tensor  # (B, Hkv, N, D), or the paged pool's (num_blocks, Hkv, block_size, D) view
    v: torch.Tensor
    seqlens: torch.Tensor  # (B,) int32, all N
    block_table: torch.Tensor | None  # (B, N / block_size) int32, or None


def make_inputs(case, device, paged=False, seed=0):
    """Random q and cache (never zeros: zeros hide unwritten outputs); paged: shuffled blocks of vLLM's pool."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape):
        return torch.randn(shape, generator=gen, device=device, dtype=case.dtype)

    q = rand(case.batch, case.heads_q, 1, case.head_dim)
    seqlens = torch.full((case.batch,), case.n, dtype=torch.int32, device=device)
    if not paged:
        return DecodeInputs(q, rand(case.batch, case.heads_kv, case.n, case.head_dim),
                            rand(case.batch, case.heads_kv, case.n, case.head_dim), seqlens, None)
    blocks_per_seq = -(-case.n // PAGED_BLOCK_SIZE)
    num_blocks = case.batch * blocks_per_seq
    table = torch.randperm(num_blocks, generator=gen, device=device).to(torch.int32).view(case.batch, blocks_per_seq)
    # vLLM's (num_blocks, block_size, Hkv, D) -> the kernel's (num_blocks, Hkv, block_size, D), a view
    k_pool = rand(num_blocks, PAGED_BLOCK_SIZE, case.heads_kv, case.head_dim).permute(0, 2, 1, 3)
    v_pool = rand(num_blocks, PAGED_BLOCK_SIZE, case.heads_kv, case.head_dim).permute(0, 2, 1, 3)
    return DecodeInputs(q, k_pool, v_pool, seqlens, table)


def _copy(inputs):
    if inputs.q.device.type != "cuda":
        raise providers.Unsupported("device bandwidth is measured on a GPU only")
    dst = torch.empty_like(inputs.k)

    def run():
        dst.copy_(inputs.k)
        dst.copy_(inputs.v)

    return run


def _attention_provider(name):
    """An attention provider of bench/providers.py, called with the single query and the full cache."""
    def prepare(inputs):
        return providers.ATTENTION[name](inputs.q, inputs.k, inputs.v, False)

    return prepare


def _triton_decode(inputs):
    from kernels import decode_attention

    providers._require_triton_runnable(inputs.q)
    return lambda: decode_attention(inputs.q, inputs.k, inputs.v, inputs.seqlens, inputs.block_table, causal=False)


DECODE = {
    "copy": _copy,
    **{name: _attention_provider(name) for name in ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math",
                                                    "flex")},
    "triton-flash": _attention_provider("triton"),
    "triton-decode": _triton_decode,
    "triton-decode-paged": _triton_decode,
}
PAGED = {"triton-decode-paged"}


def build(job, device):
    """The timed callable (forward only, under no_grad) and no gradient leaves."""
    inputs = make_inputs(job.case, device, paged=job.provider in PAGED)
    fn = DECODE[job.provider](inputs)

    def forward():
        with torch.no_grad():
            fn()

    return forward, []


def check(job, device):
    """Max abs error of the provider's output against reference.decode_attention in float64."""
    from reference.decode import decode_attention

    inputs = make_inputs(job.case, device, paged=job.provider in PAGED)
    with torch.no_grad():
        out = DECODE[job.provider](inputs)()
    expected = decode_attention(inputs.q, inputs.k, inputs.v, inputs.seqlens, inputs.block_table, causal=False,
                                dtype=torch.float64)
    diff = (out.double() - expected).abs()
    return float("inf") if torch.isnan(diff).any() else diff.max().item()


# ----------------------------------------------------------------------------
# The jobs
# ----------------------------------------------------------------------------
def build_jobs(args, device_type):
    """Checks first (small shapes), then, on a GPU, every provider at every (batch, length)."""
    if "all" not in args.suite and SUITE not in args.suite:
        return []
    if device_type == "cpu":
        # Interpreter-sized: GQA 4 like the sweep, 200 keys (a ragged last tile).
        dtype = DTYPES[args.dtype or "float32"]
        check_case = DecodeCase(2, 8, 2, 200, 64, dtype)
        return [Job(SUITE, "check", p, "fwd", check_case) for p in CHECKED]
    dtype = DTYPES[args.dtype or "bfloat16"]
    batches, lengths = GPU_QUICK if args.quick else (GPU_BATCHES, GPU_LENGTHS)
    # Next to ours, the error of PyTorch's own fused kernel in the same dtype.
    check_case = DecodeCase(2, HEADS_Q, HEADS_KV, 4 * KIB + 3, HEAD_DIM, dtype)
    jobs = [Job(SUITE, "check", p, "fwd", check_case) for p in ("sdpa-flash",) + CHECKED]
    for batch in batches:
        for n in lengths:
            case = DecodeCase(batch, HEADS_Q, HEADS_KV, n, HEAD_DIM, dtype)
            jobs += [Job(SUITE, "time", p, "fwd", case) for p in GPU_PROVIDERS]
    return jobs


# ----------------------------------------------------------------------------
# The plot: GB/s against the cache length, one panel per batch size
# ----------------------------------------------------------------------------
def plot_decode(records, ctx, path):
    import matplotlib.pyplot as plt

    rows_ok = [r for r in timed_rows(records, SUITE) if isinstance(r.get("gbps"), float)]
    if not rows_ok:
        return None
    batches = sorted({r["batch"] for r in rows_ok})
    fig, axes = plt.subplots(1, len(batches), squeeze=False, figsize=(4.6 * len(batches) + 1, 4.4))
    for ax, batch in zip(axes[0], batches):
        provider_lines(ax, [r for r in rows_ok if r["batch"] == batch], "gbps")
        ax.set_title(f"B = {batch:g}", fontsize=9)
        ax.set_xlabel("keys per sequence")
        ax.set_ylabel("GB/s of K and V read (copy: read + written)")
        ax.legend(fontsize=7)
    r0 = rows_ok[0]
    fig.suptitle(figure_title(ctx, f"Decode, one query: Hq {r0['heads_q']:g} over Hkv {r0['heads_kv']:g}, "
                                   f"D {r0['head_dim']:g}, {r0['dtype']}", fig, 10), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------
# The suite's record (bench/registry.py)
# ----------------------------------------------------------------------------
def _columns(base):
    us = lambda v: "" if v is None else (v if isinstance(v, str) else f"{v * 1e3:.1f}")  # noqa: E731
    return [("us/step", "time_ms", us), ("GB/s", "gbps", number(".1f")), (f"vs {base}", "ratio", ratio_text)]


def _rates(job, time_ms):
    return {"gbps": bytes_moved(job) / (time_ms * 1e-3) / 1e9}


registry.register(registry.Suite(
    SUITE, build_jobs, {DecodeCase: (build, check)}, baseline="sdpa-flash", early=True, columns=_columns,
    rates=_rates, plots=((SUITE, plot_decode),)))
