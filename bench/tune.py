"""Time every fitting config of every chosen kernel on the standard shapes, and write this GPU's tuned table.

    python -m bench.tune                      # every kernel, every config that fits this GPU, the standard shapes
    python -m bench.tune --kernels fwd --head-dim 128 --causal on --n 4096
    python -m bench.tune --time-budget 240    # skip what would not finish inside 240 s
    python -m bench.tune --list               # the kernels, candidates and shapes; runs anywhere

The standard shapes are the sweep's: bf16, 16 heads, B*N = 16k tokens, N =
1k, 4k, 16k, head dim 128 then 64, causal then not. For each shape, each
kernel of kernels.configs.KERNELS ("fwd", "bwd_dkdv", "bwd_dq") and each of
its candidates that fits this GPU and the shape (KernelConfigs.fitting,
pruned to the lengths as the launcher prunes), `only_config(name, config)`
restricts that kernel to the one config and

    fwd       flash_attention(q, k, v, causal) is timed under no_grad
    bwd_dkdv  out.backward(dout, retain_graph=True) is timed (autograd, the
    bwd_dq    whole backward): the kernel under test runs the config, the
              other backward kernel its default choice, the same for every
              config of the kernel under test

with triton.testing.do_bench (the median; bench/timing.py). A config that
fails to compile or launch is a row with its error, and the run goes on.
Before timing, worker processes compile every (kernel, config, head dim,
causal) in parallel at the smallest N (--jobs, --warm-limit), so the timed
loop mostly finds the kernels in Triton's cache.

Outputs, into --out, else $OUT, else bench/results/: tune_<device>_<date>.csv
(row by row) and tune_<device>_<date>.md: per kernel, each config's time
divided by the best config's at each shape (1.00 = the best), and how often
it was the best or within 5% of it; and the tuned table <device>.json: for
each (kernel, shape) the best config, under the key the launcher looks up
(configs.table_key). The table is also written to kernels/tuned/ (--table),
where every later run on this GPU model finds it: commit it. The same short
table is printed last. Without a GPU nothing is timed: the command says so,
lists the plan, and exits 0.
"""
import argparse
import contextlib
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from .flops import attention_flops, tflops_per_s
from .plan import DTYPES, KIB, dtype_name

KERNELS = ("fwd", "bwd_dkdv", "bwd_dq")
NEAR_BEST = 1.05  # "within 5% of the best": a config worth keeping for that shape
WARM_LIMIT_S = 120
CONTEXT = ["device", "torch", "triton", "commit", "date"]
COLUMNS = ["kernel", "config", "dtype", "batch", "heads", "n", "head_dim", "causal", "status", "time_ms", "tflops",
           "vs_best"] + CONTEXT


@dataclass(frozen=True)
class Shape:
    batch: int
    heads: int
    n: int
    head_dim: int
    causal: bool
    dtype: torch.dtype

    @property
    def label(self):
        return f"D{self.head_dim} {'causal' if self.causal else 'full'} N{self.n // KIB}k" if self.n % KIB == 0 else (
            f"D{self.head_dim} {'causal' if self.causal else 'full'} N{self.n}")


def config_label(config):
    """'M128 N64 w4 s3' for BLOCK_M=128, BLOCK_N=64, 4 warps, 3 stages; other meta-parameters as NAME=value."""
    short = {"BLOCK_M": "M", "BLOCK_N": "N"}
    parts = [f"{short[k]}{v}" if k in short else f"{k}={v}" for k, v in config.kwargs.items()]
    parts += [f"w{config.num_warps}", f"s{config.num_stages}"]
    for name in ("num_ctas", "maxnreg"):
        value = getattr(config, name, None)
        if value not in (None, 1):
            parts.append(f"{name}={value}")
    return " ".join(parts)


def standard_shapes(args):
    dtype = DTYPES[args.dtype]
    causal_flags = {"both": [True, False], "on": [True], "off": [False]}[args.causal]
    return [Shape(max(1, args.tokens // n), args.heads, n, d, causal, dtype)
            for d in args.head_dim for causal in causal_flags for n in sorted(args.n)]


# ----------------------------------------------------------------------------
# The candidates (kernels/configs.py) and the timed call
# ----------------------------------------------------------------------------
def registry():
    """(KERNELS, only_config) from kernels.configs: each kernel's candidates and the way to force one."""
    import importlib

    configs = importlib.import_module("kernels.configs")
    return configs.KERNELS, configs.only_config


def candidates(kernel, shape, chip):
    """The configs to time: on a GPU those that fit it and the shape, as the launcher would consider them;
    without one (chip None) every candidate of the shape's precision and head-dim class."""
    from kernels import configs

    head_dim_pad = max(16, 1 << (shape.head_dim - 1).bit_length())
    if chip is None:
        precision = configs.PRECISIONS[shape.dtype]
        return list(kernel.candidates.get((precision, configs.head_dim_class(head_dim_pad)), ()))
    fitting = kernel.fitting(chip, shape.dtype, head_dim_pad, tma=True, warp_specialize=not shape.causal)
    return configs.prune_to_lengths(fitting, shape.n, shape.n) if fitting else []


def attention_call(kernel, shape, device):
    """The callable that runs `kernel` once at `shape`, and the leaves whose .grad it fills."""
    from kernels import flash_attention

    grad = kernel != "fwd"

    def rand():
        return torch.randn(shape.batch, shape.heads, shape.n, shape.head_dim, device=device, dtype=shape.dtype,
                           requires_grad=grad)

    q, k, v = rand(), rand(), rand()
    if not grad:
        def forward():
            with torch.no_grad():
                flash_attention(q, k, v, causal=shape.causal)
        return forward, []
    out = flash_attention(q, k, v, causal=shape.causal)
    dout = torch.randn_like(out)
    return (lambda: out.backward(dout, retain_graph=True)), [q, k, v]


def _short_error(exc, chars=120):
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= chars else text[:chars - 3] + "..."


def measure(kernel, config, shape, device, timer, only_config):
    """One row: the kernel pinned to the config, timed at the shape; any failure becomes the status."""
    row = dict(kernel=kernel, config=config_label(config), dtype=dtype_name(shape.dtype), batch=shape.batch,
               heads=shape.heads, n=shape.n, head_dim=shape.head_dim, causal=shape.causal, status="ok",
               time_ms=None, tflops=None)
    try:
        with only_config(kernel, config):
            call, leaves = attention_call(kernel, shape, device)
            call()  # compile (or find in the cache) and warm up
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            row["time_ms"] = timer(call, leaves)
        mode = "fwd" if kernel == "fwd" else "bwd"
        flops = attention_flops(shape.batch, shape.heads, shape.n, shape.n, shape.head_dim, shape.causal, mode)
        row["tflops"] = tflops_per_s(flops, row["time_ms"])
    except Exception as exc:  # noqa: BLE001 - a config that cannot run is a row, the run goes on
        row["status"] = f"failed: {_short_error(exc)}"
    return row


# ----------------------------------------------------------------------------
# Running: warm the compile cache in parallel, then time one config at a time
# ----------------------------------------------------------------------------
def jobs_of(tuned, kernels, shapes, chip=None):
    """(kernel, config, shape) in the order they run: shape by shape (the first shapes matter most)."""
    return [(kernel, config, shape) for shape in shapes for kernel in kernels
            for config in candidates(tuned[kernel], shape, chip)]


def run(jobs, only_config, device, timer, time_budget_s=None, on_row=None, log=sys.stderr):
    """Time every job; skip those that would not finish inside the budget (judged from the last of the same kernel)."""
    started = time.perf_counter()
    rows, last = [], {}
    for i, (kernel, config, shape) in enumerate(jobs, 1):
        elapsed = time.perf_counter() - started
        if time_budget_s is not None and elapsed + last.get(kernel, 0.0) > time_budget_s:
            row = measure_skipped(kernel, config, shape)
        else:
            row = measure(kernel, config, shape, device, timer, only_config)
            last[kernel] = time.perf_counter() - started - elapsed
        rows.append(row)
        if on_row is not None:
            on_row(row)
        result = f"{row['time_ms']:8.3f} ms {row['tflops']:7.1f} TFLOP/s" if row["time_ms"] else row["status"]
        print(f"[{i:3}/{len(jobs)} {elapsed:5.0f}s] {kernel:8} {shape.label:18} {row['config']:22} {result}",
              file=log, flush=True)
    return rows


def measure_skipped(kernel, config, shape):
    return dict(kernel=kernel, config=config_label(config), dtype=dtype_name(shape.dtype), batch=shape.batch,
                heads=shape.heads, n=shape.n, head_dim=shape.head_dim, causal=shape.causal,
                status="skipped: time budget", time_ms=None, tflops=None)


def warm(args, shapes, tuned, chip, deadline_s, log=sys.stderr):
    """Compile every (kernel, config, head dim, causal) once, in parallel worker processes, at the smallest N."""
    n = min(args.n)
    combos = sorted({(shape.head_dim, shape.causal) for shape in shapes}, key=lambda c: (-c[0], not c[1]))
    work = []
    for head_dim, causal in combos:
        shape = Shape(max(1, args.tokens // n), args.heads, n, head_dim, causal, DTYPES[args.dtype])
        everyone = {kernel: tuned[kernel].all_configs() for kernel in args.kernels}
        work += [(kernel, everyone[kernel].index(config), head_dim, causal) for kernel in args.kernels
                 for config in candidates(tuned[kernel], replace_n(shape, max(args.n)), chip)]
    workers = max(1, min(args.jobs, len(work)))
    common = ["--dtype", args.dtype, "--heads", str(args.heads), "--tokens", str(args.tokens), "--n", str(n)]
    procs = []
    for w in range(workers):
        spec = ",".join(f"{kernel}:{i}:{d}:{int(c)}" for kernel, i, d, c in work[w::workers])
        log_file = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty worker never blocks
        procs.append((subprocess.Popen([sys.executable, "-m", "bench.tune", "--warm-only", spec, *common],
                                       stdout=log_file, stderr=subprocess.STDOUT, text=True), log_file))
    print(f"tune: compiling {len(work)} (kernel, config, head dim, causal) in {workers} workers at N={n}, "
          f"limit {deadline_s:.0f} s", file=log, flush=True)
    started = time.perf_counter()
    failed = 0
    for proc, log_file in procs:
        try:
            proc.wait(timeout=max(1.0, deadline_s - (time.perf_counter() - started)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.returncode:
            failed += 1
            log_file.seek(0)
            last = (log_file.read().strip().splitlines() or ["(no output)"])[-1]
            print(f"tune: a compile worker ended with {proc.returncode}: {last}", file=log)
        log_file.close()
    print(f"tune: compiled in {time.perf_counter() - started:.0f} s ({failed} workers failed or were stopped; "
          "what they missed compiles in the timed loop)", file=log, flush=True)


def replace_n(shape, n):
    return Shape(shape.batch, shape.heads, n, shape.head_dim, shape.causal, shape.dtype)


def warm_only(spec, args):
    """A worker: run each listed (kernel, config, head dim, causal) once; failures show again in the timed loop."""
    tuned, only_config = registry()
    device = torch.device("cuda")
    for item in spec.split(","):
        kernel, index, head_dim, causal = item.split(":")
        shape = Shape(max(1, args.tokens // args.n[0]), args.heads, args.n[0], int(head_dim), causal == "1",
                      DTYPES[args.dtype])
        with contextlib.suppress(Exception), only_config(kernel, tuned[kernel].all_configs()[int(index)]):
            call, _ = attention_call(kernel, shape, device)
            call()
    torch.cuda.synchronize()
    return 0


# ----------------------------------------------------------------------------
# The tuned table: for each (kernel, shape) the best config, under the launcher's key
# ----------------------------------------------------------------------------
def launcher_keys(shapes, kernels, device):
    """{(kernel, shape): the table key the launcher computes for that kernel at that shape}.

    Each shape runs once unforced with fresh choices, and each kernel tells
    the key of its last choice: the table is keyed exactly as it is looked up.
    """
    from kernels import configs

    keys = {}
    for shape in shapes:
        configs.reset()
        for kernel in kernels:
            call, _ = attention_call(kernel, shape, device)
            call()
            keys[(kernel, shape)] = configs.KERNELS[kernel].last_table_key
    configs.reset()
    return keys


def table_entries(rows, keys):
    """{table key: best config label} from the timed rows (a kernel's fastest config at each shape)."""
    best = {}
    for r in rows:
        if not r["time_ms"]:
            continue
        shape = Shape(r["batch"], r["heads"], r["n"], r["head_dim"], r["causal"], DTYPES[r["dtype"]])
        key = keys.get((r["kernel"], shape))
        if key is not None and (key not in best or r["time_ms"] < best[key][0]):
            best[key] = (r["time_ms"], r["config"])
    return {key: label for key, (_, label) in sorted(best.items())}


def write_table(entries, ctx, chip, paths):
    """The tuned table, as kernels/configs.py reads it: the GPU, its architecture, the run's context, the entries."""
    table = {"gpu": ctx["device"], "arch": chip.arch, "torch": ctx["torch"], "triton": ctx["triton"],
             "commit": ctx["commit"], "date": ctx["date"], "entries": entries}
    for path in paths:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
            f.write("\n")


# ----------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------
def add_vs_best(rows):
    """vs_best = time / the best time of the same kernel at the same shape (1.0: the best)."""
    def key(r):
        return r["kernel"], r["dtype"], r["batch"], r["heads"], r["n"], r["head_dim"], r["causal"]

    best = {}
    for r in rows:
        if r["time_ms"]:
            best[key(r)] = min(best.get(key(r), float("inf")), r["time_ms"])
    for r in rows:
        r["vs_best"] = r["time_ms"] / best[key(r)] if r["time_ms"] else None
    return rows


def _cell(r):
    if r["time_ms"]:
        return f"{r['vs_best']:.2f}"
    return "skipped" if r["status"].startswith("skipped") else "FAILED"


def kernel_tables(rows):
    """{kernel: (headers, table rows)}: configs down, shapes across, cells time / best, then the best's TFLOP/s."""
    tables = {}
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        mine = [r for r in rows if r["kernel"] == kernel]
        shapes = list(dict.fromkeys((r["head_dim"], r["causal"], r["n"]) for r in mine))
        configs = list(dict.fromkeys(r["config"] for r in mine))
        by = {(r["config"], (r["head_dim"], r["causal"], r["n"])): r for r in mine}
        table = []
        for config in configs:
            cells = [_cell(by[(config, s)]) if (config, s) in by else "" for s in shapes]
            ratios = [by[(config, s)]["vs_best"] for s in shapes if (config, s) in by and by[(config, s)]["vs_best"]]
            best = sum(1 for x in ratios if x == 1.0)
            near = sum(1 for x in ratios if x <= NEAR_BEST)
            worst = f"{max(ratios):.2f}" if ratios else ""
            median = f"{statistics.median(ratios):.2f}" if ratios else ""
            table.append([config, str(best), str(near), median, worst] + cells)
        fastest = [max((r["tflops"] for r in mine if (r["head_dim"], r["causal"], r["n"]) == s and r["tflops"]),
                       default=None) for s in shapes]
        table.append(["best, TFLOP/s", "", "", "", ""] + ["" if t is None else f"{t:.0f}" for t in fastest])
        headers = ["config", "best at", f"within {NEAR_BEST - 1:.0%}", "median", "worst"] + [
            f"D{d} {'causal' if c else 'full'} N{n // KIB}k" if n % KIB == 0 else f"D{d} {'causal' if c else 'full'} N{n}"
            for d, c, n in shapes]
        tables[kernel] = (headers, table)
    return tables


def short_table(rows):
    """The table printed last: per kernel and config, how often it was the best or near it."""
    from .report import text_table

    lines = []
    for kernel, (headers, table) in kernel_tables(rows).items():
        lines += [f"{kernel}:", text_table(headers[:5], [r[:5] for r in table[:-1]]), ""]  # not the TFLOP/s row
    return "\n".join(lines) if lines else "(no rows)"


def markdown(rows, ctx):
    from .report import markdown_table

    lines = [f"# Tuning the attention kernels on {ctx['device']}", "",
             "| context | |", "|---|---|", f"| device | {ctx['device']} |", f"| torch | {ctx['torch']} |",
             f"| triton | {ctx['triton']} |", f"| commit | {ctx['commit']} |", f"| date | {ctx['date']} |",
             f"| timing | {ctx.get('timer', '')} |", "",
             "Each cell is the config's time divided by the best config's time for that kernel at that shape "
             "(1.00: the best; FAILED: it did not compile or run, the CSV has the error). fwd times the forward "
             "call; bwd_dkdv and bwd_dq time the whole backward (autograd) with that kernel pinned to the config "
             "and the other backward kernel at its own choice. `best at` and `within 5%` count the shapes; the last "
             "row gives the best config's TFLOP/s (the backward's FLOPs for the bwd kernels). "
             "A config that is never within 5% of the best is a candidate to drop.", ""]
    for kernel, (headers, table) in kernel_tables(rows).items():
        lines += [f"## {kernel}", "", markdown_table(headers, table), ""]
    return "\n".join(lines)


class RowWriter:
    """The CSV, written row by row so a stopped run keeps its rows."""

    def __init__(self, path, ctx):
        self.ctx = ctx
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=COLUMNS, extrasaction="ignore")
        self.writer.writeheader()

    def write(self, row):
        values = {**row, **{k: self.ctx[k] for k in CONTEXT}}
        self.writer.writerow({k: "" if values.get(k) is None else (
            f"{values[k]:.6g}" if isinstance(values[k], float) else values[k]) for k in COLUMNS})
        self.file.flush()

    def close(self):
        self.file.close()


# ----------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------
def build_parser():
    parser = argparse.ArgumentParser(prog="python -m bench.tune", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    parser.add_argument("--n", type=int, nargs="+", default=[1 * KIB, 4 * KIB, 16 * KIB])
    parser.add_argument("--head-dim", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--causal", choices=("both", "on", "off"), default="both")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=16 * KIB, help="batch = tokens // N (at least 1)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: $OUT, else bench/results/)")
    parser.add_argument("--table", metavar="PATH",
                        help="where the launchers will read the tuned table (default: kernels/tuned/<gpu>.json)")
    parser.add_argument("--time-budget", type=float, metavar="S", help="skip what would not finish inside S s")
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 2), help="compile workers")
    parser.add_argument("--warm-limit", type=float, default=WARM_LIMIT_S, metavar="S",
                        help="stop the compile workers after S s (0: no parallel compile)")
    parser.add_argument("--list", action="store_true", help="print the kernels, configs and shapes, and exit")
    parser.add_argument("--warm-only", metavar="SPEC", help=argparse.SUPPRESS)  # a compile worker's share
    return parser


def print_plan(args, shapes, chip=None, log=None):
    """The shapes and, per kernel, the configs each shape will time (every candidate without a GPU)."""
    log = log or sys.stdout
    print(f"shapes ({len(shapes)}): {args.dtype}, {args.heads} heads, B*N = {args.tokens}: "
          + ", ".join(s.label for s in shapes), file=log)
    tuned, _ = registry()
    where = f"that fit {chip.describe()}" if chip is not None else "(all candidates: no GPU to fit them to)"
    print(f"configs {where}:", file=log)
    for kernel in args.kernels:
        labels = list(dict.fromkeys(config_label(c) for s in shapes for c in candidates(tuned[kernel], s, chip)))
        print(f"{kernel} ({len(labels)} configs): " + "; ".join(labels), file=log)
    print(f"{len(jobs_of(tuned, args.kernels, shapes, chip))} timings", file=log)


def main(argv=None):
    args = build_parser().parse_args(argv)
    shapes = standard_shapes(args)
    if args.warm_only:
        return warm_only(args.warm_only, args)
    if args.list or not torch.cuda.is_available():
        if not args.list:
            print("bench.tune: needs a CUDA GPU (it times each config with triton.testing.do_bench); "
                  "nothing timed. The plan:")
        print_plan(args, shapes)
        return 0

    from kernels.configs import chip_for

    from .report import REPO_ROOT, context
    from .timing import GpuTimer

    tuned, only_config = registry()
    device = torch.device("cuda", torch.cuda.current_device())
    chip = chip_for(device)
    timer = GpuTimer()
    ctx = context(device, timer.method)
    out_dir = args.out or os.environ.get("OUT") or os.path.join(REPO_ROOT, "bench", "results")
    os.makedirs(out_dir, exist_ok=True)
    print(f"tune: {ctx['device']} | torch {ctx['torch']}, triton {ctx['triton']} | {ctx['commit']} | {ctx['date']}",
          file=sys.stderr)
    print_plan(args, shapes, chip, log=sys.stderr)
    started = time.perf_counter()
    if args.warm_limit > 0:
        limit = args.warm_limit if args.time_budget is None else min(args.warm_limit, args.time_budget / 2)
        warm(args, shapes, tuned, chip, limit)
    budget = None if args.time_budget is None else args.time_budget - (time.perf_counter() - started)
    return report(args, ctx, out_dir, tuned, only_config, shapes, device, timer, budget, chip)


def report(args, ctx, out_dir, tuned, only_config, shapes, device, timer, budget, chip=None):
    """Time the jobs, write the CSV (row by row, then again with vs_best), the markdown and the tuned table."""
    from kernels.configs import TUNED_DIR

    from .report import file_name
    from .sweep import Stopped, stop_on_signals

    csv_path, md_path = (os.path.join(out_dir, file_name(ctx, "tune", ext)) for ext in ("csv", "md"))
    jobs = jobs_of(tuned, args.kernels, shapes, chip)
    rows, stopped = [], None
    with stop_on_signals():
        keys = launcher_keys(shapes, args.kernels, device)
        writer = RowWriter(csv_path, ctx)
        try:
            run(jobs, only_config, device, timer, budget, on_row=lambda r: (rows.append(r), writer.write(r)))
        except (Stopped, KeyboardInterrupt) as exc:
            stopped = getattr(exc, "signal_name", "SIGINT")
            print(f"tune: stopped by {stopped} after {len(rows)} of {len(jobs)} timings", file=sys.stderr)
        finally:
            writer.close()
        add_vs_best(rows)
        writer = RowWriter(csv_path, ctx)
        for r in rows:
            writer.write(r)
        writer.close()
        with open(md_path, "w") as f:
            f.write(markdown(rows, ctx))
        table_paths = [os.path.join(out_dir, f"{ctx['device_slug']}.json"),
                       args.table or os.path.join(TUNED_DIR, f"{ctx['device_slug']}.json")]
        if chip is not None:
            write_table(table_entries(rows, keys), ctx, chip, table_paths)
    print(f"files: {csv_path}, {md_path}" + (f", tuned table: {', '.join(table_paths)}" if chip else "") + "\n")
    print(short_table(rows))
    return 128 + signal.Signals[stopped].value if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
