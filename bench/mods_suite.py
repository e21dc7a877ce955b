"""The mods suite: attention patterns written as mods, against FlexAttention and SDPA with a dense mask.

Three patterns, each spelled by kernels/mods.py for the Triton kernels and by
its twin in reference/mods.py for FlexAttention and SDPA:

    document         a packed batch of documents of random lengths, causal inside each
    prefix_lm        the first N/4 tokens bidirectional, the rest causal
    sliding_window   causal, each query sees its last W keys (Mistral)

Providers, on the same inputs and the same pattern:

    triton-mods    kernels.flash_attention with a block mask from kernels.create_block_mask
    flex-mods      FlexAttention with its own create_block_mask (compiled on a GPU)
    sdpa-mask      SDPA with the dense (N, N) bool mask: N^2 work and memory ("skipped: memory"
                   where the mask would not fit)
    triton-build   kernels.create_block_mask alone          mode "build": rows of their own, so the
    flex-build     FlexAttention's create_block_mask alone  attention rows never include the build

FLOPs count the visible (query, key) pairs (4 D per pair forward, x2.5
backward), so every provider is credited the same useful work. On the CPU:
correctness rows only, at one tiny size: attention against naive attention in
float64 (FlexAttention's forward runs eagerly there; its backward does not
exist on the CPU, an "unsupported" row), and the build rows count the tiles
whose kind (empty, partial, full) differs from reference/block_mask.py's.

Standalone: `register()` describes it to bench/registry.py; listing the module in
bench/suites.py puts it in `python -m bench`.
"""
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from . import providers, registry, report, sweep
from .flops import MODE_FACTOR
from .plan import DTYPES, KIB, MODES, Job, dtype_name, parse_heads

SUITE = "mods"
BASELINE = "flex-mods"
PATTERNS = ("document", "prefix_lm", "sliding_window")
BUILD = "build"  # the mode of the block-mask build rows
DOC_SEED = 18


@dataclass(frozen=True)
class ModsCase:
    pattern: str
    batch: int
    heads_q: int
    heads_kv: int
    n: int
    head_dim: int
    dtype: torch.dtype
    param: int  # document: mean document length; prefix_lm: prefix length; sliding_window: W
    block_size: int = 128

    @property
    def heads(self):
        return str(self.heads_q) if self.heads_q == self.heads_kv else f"{self.heads_q}:{self.heads_kv}"

    @property
    def shape(self):
        what = {"document": "docs~", "prefix_lm": "prefix ", "sliding_window": "W"}[self.pattern]
        return f"{self.pattern} B{self.batch} H{self.heads} N{self.n} D{self.head_dim} {what}{self.param}"

    def columns(self):
        return dict(dtype=dtype_name(self.dtype), batch=self.batch, heads_q=self.heads_q, heads_kv=self.heads_kv,
                    n=self.n, head_dim=self.head_dim, causal=True)

    def doc_lengths(self):
        """Document lengths, uniform in [param / 2, 3 param / 2], the last one cut to fill N."""
        g = torch.Generator().manual_seed(DOC_SEED)
        lengths, total = [], 0
        while total < self.n:
            length = min(self.n - total, int(torch.randint(self.param // 2, 3 * self.param // 2 + 1, (1,),
                                                           generator=g)))
            lengths.append(length)
            total += length
        return lengths

    def doc_ids(self, device=None):
        lengths = self.doc_lengths()
        return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(device)

    def pairs(self):
        """Visible (query, key) pairs per head."""
        n, p = self.n, self.param
        if self.pattern == "document":
            return sum(length * (length + 1) // 2 for length in self.doc_lengths())
        if self.pattern == "prefix_lm":
            p = min(p, n)  # query i < p sees the p prefix keys; query i >= p sees i + 1 keys
            return p * p + (n * (n + 1) - p * (p + 1)) // 2
        w = min(p, n)  # sliding window: query i sees min(i + 1, W) keys
        return w * (w + 1) // 2 + (n - w) * w

    def flops(self, mode):
        return 4.0 * self.batch * self.heads_q * self.pairs() * self.head_dim * MODE_FACTOR[mode]

    def mods(self, library, device):
        """The pattern's mask_mod from `library`: kernels.mods (a MaskMod) or reference.mods (a function)."""
        if self.pattern == "document":
            return library.document(self.doc_ids(device), causal=True)
        if self.pattern == "prefix_lm":
            return library.prefix_lm(self.param)
        return library.sliding_window(self.param - 1, 0)


@dataclass(frozen=True)
class MaskBuildCase:
    """Building the block mask of `case`'s pattern alone: rows with times, no FLOPs."""
    case: ModsCase

    @property
    def shape(self):
        return f"{self.case.shape} block {self.case.block_size}"

    def columns(self):
        return self.case.columns()


# ----------------------------------------------------------------------------
# Providers: prepare(q, k, v, case) -> a callable computing the output (B, Hq, N, D)
# ----------------------------------------------------------------------------
_twins = {}  # one reference function per case: compiled FlexAttention guards on it, a new one recompiles


def twin(case, device):
    key = (case.pattern, case.n, case.param, str(device))
    if key not in _twins:
        import reference.mods

        _twins[key] = case.mods(reference.mods, device)
    return _twins[key]


def _triton_block_mask(case, device):
    import kernels

    return kernels.create_block_mask(case.mods(kernels.mods, device), None, None, case.n, case.n, device=device,
                                     BLOCK_SIZE=case.block_size)


def _flex_block_mask(case, device):
    from torch.nn.attention.flex_attention import create_block_mask

    # _compile=True on a GPU builds it without materialising the (N, N) mask.
    return create_block_mask(twin(case, device), None, None, case.n, case.n, device=device,
                             BLOCK_SIZE=case.block_size, _compile=device.type == "cuda")


def _triton_mods(q, k, v, case):
    from kernels import flash_attention

    providers._require_triton_runnable(q)
    block_mask = _triton_block_mask(case, q.device)
    return lambda: flash_attention(q, k, v, block_mask=block_mask)


def _flex_mods(q, k, v, case):
    if q.device.type != "cuda" and q.requires_grad:
        raise providers.Unsupported("FlexAttention has no backward on the CPU")
    block_mask = _flex_block_mask(case, q.device)
    if q.device.type == "cuda":
        flex = providers._compiled_flex_attention()
    else:
        from torch.nn.attention.flex_attention import flex_attention as flex  # eager: a correctness row
    gqa = q.shape[1] != k.shape[1]
    return lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def _sdpa_mask(q, k, v, case):
    from reference.mods import dense_mask

    from .window_suite import DENSE_MASK_MEMORY_SHARE, dense_mask_bytes, free_bytes

    need, free = dense_mask_bytes(case.n, q.dtype), free_bytes(q.device)
    if need > DENSE_MASK_MEMORY_SHARE * free:
        raise sweep.Skipped(f"memory (the dense {case.n}x{case.n} mask needs {need / 2**30:.1f} GiB, "
                            f"{free / 2**30:.1f} GiB free)")
    mask = dense_mask(twin(case, q.device), 1, 1, case.n, case.n, q.device)
    gqa = q.shape[1] != k.shape[1]
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


ATTENTION = {"triton-mods": _triton_mods, "flex-mods": _flex_mods, "sdpa-mask": _sdpa_mask}
BUILDS = {"triton-build": _triton_block_mask, "flex-build": _flex_block_mask}
PROVIDERS = (*ATTENTION, *BUILDS)


# ----------------------------------------------------------------------------
# Plan
# ----------------------------------------------------------------------------
# GPU: a 16k-token packed batch (batch 1: the documents are the batch), Llama-3-8B's 32:8 heads at D128.
PRESETS = {
    ("cuda", False): dict(n=[4 * KIB, 16 * KIB], heads=["32:8"], head_dim=[128], dtype="bfloat16",
                          modes=["fwd", "bwd"], check_n=2 * KIB),
    ("cuda", True): dict(n=[8 * KIB], heads=["32:8"], head_dim=[128], dtype="bfloat16", modes=["fwd"],
                         check_n=2 * KIB),
}
DOC_MEAN, WINDOW = 1 * KIB, 1 * KIB


def pattern_case(pattern, n, h_q, h_kv, head_dim, dtype, block_size=128):
    param = {"document": DOC_MEAN, "prefix_lm": n // 4, "sliding_window": WINDOW}[pattern]
    return ModsCase(pattern, 1, h_q, h_kv, n, head_dim, dtype, param, block_size)


# On the CPU: 130 tokens in 64-blocks (a ragged last block), GQA, documents of ~40 tokens, a window of 32.
CPU_CHECKS = [ModsCase("document", 1, 2, 1, 130, 32, torch.float32, 40, 64),
              ModsCase("prefix_lm", 1, 2, 1, 130, 32, torch.float32, 37, 64),
              ModsCase("sliding_window", 1, 2, 1, 130, 32, torch.float32, 32, 64)]


def check_modes(args):
    return ["fwd", "bwd"] if args.modes is None or any(m != "fwd" for m in args.modes) else ["fwd"]


def build_jobs(args, device_type):
    """This suite's jobs (none unless --suite names it or all): checks first, then timings (GPU only)."""
    if "all" not in args.suite and SUITE not in args.suite:
        return []
    if device_type == "cpu":
        cases = CPU_CHECKS
        if args.heads or args.head_dim:
            h_q, h_kv = parse_heads(args.heads[0]) if args.heads else (None, None)
            cases = [replace(c, heads_q=h_q or c.heads_q, heads_kv=h_kv or c.heads_kv,
                             head_dim=args.head_dim[0] if args.head_dim else c.head_dim) for c in cases]
        return ([Job(SUITE, "check", p, mode, c) for c in cases for p in ATTENTION for mode in check_modes(args)]
                + [Job(SUITE, "check", p, BUILD, MaskBuildCase(c)) for c in cases for p in BUILDS])
    preset = PRESETS[(device_type, bool(args.quick))]
    dtype = DTYPES[args.dtype or preset["dtype"]]
    modes = [m for m in (args.modes or preset["modes"]) if m in MODES]
    checks, timed = [], []
    for head_dim in args.head_dim or preset["head_dim"]:
        for heads in args.heads or preset["heads"]:
            h_q, h_kv = parse_heads(heads)
            for pattern in PATTERNS:
                check = pattern_case(pattern, preset["check_n"], h_q, h_kv, head_dim, dtype)
                checks += [Job(SUITE, "check", p, mode, check) for p in ("triton-mods", "sdpa-mask")
                           for mode in ("fwd", "bwd")]
                checks += [Job(SUITE, "check", p, BUILD, MaskBuildCase(check)) for p in BUILDS]
                for n in sorted(args.n or preset["n"]):
                    case = pattern_case(pattern, n, h_q, h_kv, head_dim, dtype)
                    timed += [Job(SUITE, "time", p, BUILD, MaskBuildCase(case)) for p in BUILDS]
                    timed += [Job(SUITE, "time", p, mode, case) for mode in modes for p in ATTENTION]
    return checks + timed


# ----------------------------------------------------------------------------
# Build, check
# ----------------------------------------------------------------------------
def _build(job, device):
    """The callable to time and its gradient leaves: a block-mask build, or one attention call."""
    if isinstance(job.case, MaskBuildCase):
        build = BUILDS[job.provider]
        case = job.case.case
        return (lambda: build(case, device)), []
    q, k, v = sweep.attention_inputs(job.case, device, requires_grad=job.mode != "fwd")
    return sweep.mode_call(ATTENTION[job.provider](q, k, v, job.case), job.mode, [q, k, v])


def tile_kinds_of(counts, indices, full_counts, full_indices, num_kv):
    """(rows, num_kv) tile kinds (0 empty, 1 partial, 2 full) from FlexAttention-style count and index lists."""
    rows = counts.numel()
    counts, indices = counts.reshape(rows).tolist(), indices.reshape(rows, -1).tolist()
    full_counts, full_indices = full_counts.reshape(rows).tolist(), full_indices.reshape(rows, -1).tolist()
    kinds = torch.zeros(rows, num_kv, dtype=torch.int8)
    for row in range(rows):
        kinds[row, indices[row][:counts[row]]] = 1
        kinds[row, full_indices[row][:full_counts[row]]] = 2
    return kinds


def _check(job, device):
    """Attention: max abs error against naive attention in float64 (fwd: output; bwd: dq, dk, dv).
    Build: the number of tiles whose kind differs from reference/block_mask.py's plain lists."""
    from reference.block_mask import create_block_mask as plain_block_mask
    from reference.mods import naive_attention_mods

    if isinstance(job.case, MaskBuildCase):
        case = job.case.case
        built = BUILDS[job.provider](case, device)
        plain = plain_block_mask(twin(case, device), None, None, case.n, case.n, device=device,
                                 BLOCK_SIZE=case.block_size)
        num_kv = plain.kv.shape[-1] - 1
        mine = tile_kinds_of(built.kv_num_blocks.cpu(), built.kv_indices.cpu(), built.full_kv_num_blocks.cpu(),
                             built.full_kv_indices.cpu(), num_kv)
        truth = tile_kinds_of(plain.kv[0, ..., 0], plain.kv[0, ..., 1:], plain.kv[1, ..., 0], plain.kv[1, ..., 1:],
                              num_kv)
        return float((mine != truth).sum().item())
    case = job.case
    q, k, v = sweep.attention_inputs(case, device, requires_grad=job.mode == "bwd")
    fn = ATTENTION[job.provider](q, k, v, case)
    leaves64 = [t.detach().double().requires_grad_(job.mode == "bwd") for t in (q, k, v)]

    def reference():
        return naive_attention_mods(*leaves64, mask_mod=twin(case, device))

    if job.mode == "fwd":
        with torch.no_grad():
            return sweep.max_abs_error(fn(), reference())
    out = fn()
    dout = torch.randn_like(out)
    out.backward(dout)
    reference().backward(dout.double())
    return max(sweep.max_abs_error(t.grad, t64.grad) for t, t64 in zip((q, k, v), leaves64))


def _rates(job, time_ms):
    """TFLOP/s of the visible pairs for attention rows; nothing for build rows."""
    from .flops import tflops_per_s

    return {} if isinstance(job.case, MaskBuildCase) else {"tflops": tflops_per_s(job.case.flops(job.mode), time_ms)}


# ----------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------
def summary(records):
    """Per pattern and N: each attention provider's ms per mode, and the block-mask builds' ms apart."""
    rows = [r for r in records if r["suite"] == SUITE]
    if not rows:
        return ""
    timed = [r for r in rows if r["kind"] == "time"]
    if not timed:
        errors = ", ".join(f"{r['provider']} {r['mode']} {r['max_err']:.1e}" for r in rows
                           if isinstance(r.get("max_err"), float))
        return f"Mods: correctness rows only on this device (max abs err vs float64): {errors}"
    table = {}
    for r in timed:
        key = (r["shape"].split(" ")[0], r["n"])
        cell = f"{r['time_ms']:.3f}" if r["time_ms"] else r["status"].split(" (")[0]
        table.setdefault(key, {})[f"{r['provider']} {r['mode']}"] = cell
    columns = [f"{p} {m}" for p in ATTENTION for m in MODES if any(f"{p} {m}" in c for c in table.values())]
    columns += [f"{p} {BUILD}" for p in BUILDS]
    body = [[pattern, str(n)] + [cells.get(c, "") for c in columns] for (pattern, n), cells in table.items()]
    return ("Mods: ms per call; the block-mask build is timed apart (mode build), never inside the attention\n"
            + report.text_table(["pattern", "N"] + [f"{c} ms" for c in columns], body))


NOTE = ("Attention patterns through mods (kernels/mods.py) against FlexAttention and SDPA with a dense mask; "
        "FLOPs count the visible pairs; block-mask builds are rows of their own (mode build).")


def register():
    """Describe this suite to bench/registry.py (once; again is harmless): `python -m bench --suite mods` then runs it
    once bench/suites.py lists this module."""
    return registry.register(registry.Suite(SUITE, build_jobs, {ModsCase: (_build, _check),
                                                                MaskBuildCase: (_build, _check)},
                                            baseline=BASELINE, rates=_rates, summary=summary, note=NOTE))
