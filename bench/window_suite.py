"""The sliding-window suite: causal attention where query i sees keys i - W + 1 .. i (Mistral).

With the key blocks outside the window skipped, the work is N * W, not
N^2 / 2: at a fixed window, time must grow linearly in N. Side by side, on
the same mask:

    triton-window   kernels.flash_attention(causal=True, window_size=(W - 1, 0))
    flex-window     FlexAttention under torch.compile with a block mask built from
                    the same mask_mod: block-sparse, empty blocks skipped (GPU only)
    sdpa-mask       SDPA with the explicit dense (N, N) bool mask: N^2 work and memory;
                    "skipped: memory" where the mask would not fit
    triton-causal   our full causal kernel without a window: the N^2 / 2 it avoids

FLOPs count the (query, key) pairs the window lets through, by FlashAttention's
convention otherwise (4 D per pair forward, x2.5 backward): every provider on
a case is credited the same useful work, so TFLOP/s ranks them like time.
`summary` shows the growth: time(N_max) / time(N_min) divided by
N_max / N_min, 1.0 for linear, larger as it turns quadratic.

On the CPU, only correctness rows at one tiny size (Triton runs under its
interpreter). The jobs run through bench/sweep.py like every suite's; the
suite registers itself at the end of this module (bench/registry.py).
"""
import dataclasses
import inspect
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import providers, registry, report, sweep
from .flops import MODE_FACTOR
from .plan import DTYPES, KIB, MODES, Job, dtype_name, parse_heads

SUITE = "window"
BASELINE = "flex-window"  # the GPU target: triton-window at >= 1.2x its speed (not measured yet)
DENSE_MASK_MEMORY_SHARE = 0.5  # SDPA's dense mask may use at most this share of the free memory


@dataclass(frozen=True)
class WindowCase:
    batch: int
    heads_q: int
    heads_kv: int
    n: int
    head_dim: int
    window: int  # W: keys a query sees, itself included
    dtype: torch.dtype
    causal: bool = True

    @property
    def heads(self):
        return str(self.heads_q) if self.heads_q == self.heads_kv else f"{self.heads_q}:{self.heads_kv}"

    @property
    def shape(self):
        return f"B{self.batch} H{self.heads} N{self.n} D{self.head_dim} W{self.window} causal"

    def columns(self):
        return dict(dtype=dtype_name(self.dtype), batch=self.batch, heads_q=self.heads_q, heads_kv=self.heads_kv,
                    n=self.n, head_dim=self.head_dim, causal=True, window=self.window)

    def pairs(self):
        """Visible (query, key) pairs per head: query i sees min(i + 1, W) keys."""
        w = min(self.window, self.n)
        return w * (w + 1) // 2 + (self.n - w) * w

    def flops(self, mode):
        return 4.0 * self.batch * self.heads_q * self.pairs() * self.head_dim * MODE_FACTOR[mode]


# ----------------------------------------------------------------------------
# Providers: prepare(q, k, v, window) -> a callable computing the output (B, Hq, N, D)
# ----------------------------------------------------------------------------
def _triton_window(q, k, v, window):
    from kernels import flash_attention

    providers._require_triton_runnable(q)
    if "window_size" not in inspect.signature(flash_attention).parameters:
        raise providers.Unsupported("kernels.flash_attention has no window_size yet")
    return lambda: flash_attention(q, k, v, causal=True, window_size=(window - 1, 0))


def _triton_causal(q, k, v, window):
    return providers._triton(q, k, v, causal=True)


_window_mask_mods = {}  # one function per W: torch.compile guards on the mask_mod, a new closure recompiles


def window_mask_mod(window):
    if window not in _window_mask_mods:
        def sliding_window_causal(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx - kv_idx < window)
        _window_mask_mods[window] = sliding_window_causal
    return _window_mask_mods[window]


def _flex_window(q, k, v, window):
    if q.device.type != "cuda":
        raise providers.Unsupported("benchmarked on a GPU only (compiled)")
    from torch.nn.attention.flex_attention import create_block_mask

    # _compile=True builds the block mask without materialising the (N, N) mask (64k^2 would not fit).
    block_mask = create_block_mask(window_mask_mod(window), None, None, q.shape[2], k.shape[2], device=q.device,
                                   _compile=True)
    flex = providers._compiled_flex_attention()
    gqa = q.shape[1] != k.shape[1]
    return lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def free_bytes(device):
    """Memory free for a new allocation: the GPU's, or the host's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def dense_mask_bytes(n, dtype):
    """The bool (N, N) mask, and the additive mask of q's dtype SDPA's fused kernels turn it into."""
    return n * n * (1 + torch.empty((), dtype=dtype).element_size())


def _sdpa_mask(q, k, v, window):
    n_q, n_k = q.shape[2], k.shape[2]
    need = dense_mask_bytes(n_k, q.dtype)
    free = free_bytes(q.device)
    if need > DENSE_MASK_MEMORY_SHARE * free:
        raise sweep.Skipped(f"memory (the dense {n_q}x{n_k} mask needs {need / 2**30:.1f} GiB, "
                            f"{free / 2**30:.1f} GiB free)")
    from reference import causal_visibility, window_visibility

    mask = window_visibility(n_q, n_k, (window - 1, 0), q.device) & causal_visibility(n_q, n_k, q.device)
    gqa = q.shape[1] != k.shape[1]
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


# name -> (prepare, whether it applies the window: triton-causal is checked against plain causal)
PROVIDERS = {
    "triton-window": (_triton_window, True),
    "flex-window": (_flex_window, True),
    "sdpa-mask": (_sdpa_mask, True),
    "triton-causal": (_triton_causal, False),
}
CPU_PROVIDERS = ("triton-window", "sdpa-mask", "triton-causal")  # flex is compiled, on a GPU only


# ----------------------------------------------------------------------------
# Plan: the cases per device
# ----------------------------------------------------------------------------
# (N, windows, heads, head dim, dtype, modes) per (device, quick). Batch 1: time grows with N itself.
PRESETS = {
    ("cuda", False): dict(n=[4 * KIB, 8 * KIB, 16 * KIB, 32 * KIB, 64 * KIB], windows=[1 * KIB, 4 * KIB],
                          heads=["16"], head_dim=[128], dtype="bfloat16", modes=["fwd", "bwd"], check_n=2 * KIB),
    ("cuda", True): dict(n=[4 * KIB, 16 * KIB], windows=[1 * KIB], heads=["16"], head_dim=[128], dtype="bfloat16",
                         modes=["fwd"], check_n=2 * KIB),
}
# On the CPU: correctness only, one tiny GQA case (a window of 32 over 96 tokens crosses block edges).
CPU_CHECK = WindowCase(1, 2, 1, 96, 32, 32, torch.float32)


def check_modes(args):
    return ["fwd", "bwd"] if args.modes is None or any(m != "fwd" for m in args.modes) else ["fwd"]


def cpu_check(args, case):
    """The tiny CPU case, with the first --heads and --head-dim given (they shrink it further in tests)."""
    h_q, h_kv = parse_heads(args.heads[0]) if args.heads else (case.heads_q, case.heads_kv)
    return dataclasses.replace(case, heads_q=h_q, heads_kv=h_kv,
                               head_dim=args.head_dim[0] if args.head_dim else case.head_dim)


def build_jobs(args, device_type):
    """This suite's jobs (none unless --suite names it or all): checks first, then timings."""
    if "all" not in args.suite and SUITE not in args.suite:
        return []
    if device_type == "cpu":
        return [Job(SUITE, "check", p, mode, cpu_check(args, CPU_CHECK)) for p in CPU_PROVIDERS
                for mode in check_modes(args)]
    preset = PRESETS[(device_type, bool(args.quick))]
    dtype = DTYPES[args.dtype or preset["dtype"]]
    modes = [m for m in (args.modes or preset["modes"]) if m in MODES]
    jobs = []
    cases = []
    for head_dim in args.head_dim or preset["head_dim"]:
        for heads in args.heads or preset["heads"]:
            h_q, h_kv = parse_heads(heads)
            check = WindowCase(1, h_q, h_kv, preset["check_n"], head_dim, min(preset["windows"]), dtype)
            jobs += [Job(SUITE, "check", p, mode, check) for p in ("triton-window", "sdpa-mask")
                     for mode in ("fwd", "bwd")]
            cases += [WindowCase(1, h_q, h_kv, n, head_dim, w, dtype) for w in preset["windows"]
                      for n in sorted(preset["n"])]
    jobs += [Job(SUITE, "time", p, mode, case) for case in cases for mode in modes for p in PROVIDERS]
    return jobs


# ----------------------------------------------------------------------------
# Build, check: the suite's handlers of its case type
# ----------------------------------------------------------------------------
def _build(job, device):
    q, k, v = sweep.attention_inputs(job.case, device, requires_grad=job.mode != "fwd")
    prepare, _ = PROVIDERS[job.provider]
    return sweep.mode_call(prepare(q, k, v, job.case.window), job.mode, [q, k, v])


def _check(job, device):
    """Max abs error against naive_attention in float64 with the provider's own mask (fwd: output; bwd: dq, dk, dv)."""
    from reference import naive_attention

    case = job.case
    prepare, windowed = PROVIDERS[job.provider]
    q, k, v = sweep.attention_inputs(case, device, requires_grad=job.mode == "bwd")
    fn = prepare(q, k, v, case.window)
    leaves64 = [t.detach().double().requires_grad_(job.mode == "bwd") for t in (q, k, v)]
    window_size = (case.window - 1, 0) if windowed else None

    def reference():
        return naive_attention(*leaves64, causal=True, window_size=window_size)

    if job.mode == "fwd":
        with torch.no_grad():
            return sweep.max_abs_error(fn(), reference())
    out = fn()
    dout = torch.randn_like(out)
    out.backward(dout)
    reference().backward(dout.double())
    return max(sweep.max_abs_error(t.grad, t64.grad) for t, t64 in zip((q, k, v), leaves64))




# ----------------------------------------------------------------------------
# Summary: does the time grow linearly in N?
# ----------------------------------------------------------------------------
def summary(records):
    """ms per N for each (mode, provider, W), and the growth: (time ratio) / (N ratio), 1.0 when linear."""
    timed = [r for r in records if r["suite"] == SUITE and r["kind"] == "time"]
    if not timed:
        return ""
    ns = sorted({r["n"] for r in timed})
    groups = {}
    for r in timed:
        groups.setdefault((r["mode"], r["provider"], r["window"]), {})[r["n"]] = r
    rows = []
    for (mode, provider, window), by_n in groups.items():
        cells = [f"{by_n[n]['time_ms']:.3f}" if n in by_n and by_n[n]["time_ms"] else
                 (by_n[n]["status"].split(" (")[0] if n in by_n else "") for n in ns]
        ok = sorted(n for n, r in by_n.items() if r["time_ms"])
        growth = ""
        if len(ok) >= 2:
            growth = f"{(by_n[ok[-1]]['time_ms'] / by_n[ok[0]]['time_ms']) / (ok[-1] / ok[0]):.2f}"
        rows.append([mode, provider, str(window)] + cells + [growth])
    headers = ["mode", "provider", "W"] + [f"N={n // KIB}k ms" if n >= KIB else f"N={n} ms" for n in ns]
    return ("Sliding window: time against N (growth = time ratio / N ratio over the timed N; 1.00 is linear)\n"
            + report.text_table(headers + ["growth"], rows))


registry.register(registry.Suite(SUITE, build_jobs, {WindowCase: (_build, _check)}, baseline=BASELINE,
                                 summary=summary))
