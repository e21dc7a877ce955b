"""The benchmark's entry point: `python -m bench` (also the second half of `make bench`).

    python -m bench                          # every suite, sizes for this machine
    python -m bench --quick                  # a smoke run: two sizes each
    python -m bench --suite attention --n 1024 4096 --head-dim 128 --heads 16 32:8 --causal on
    python -m bench --device cuda --modes fwd bwd fwd+bwd --providers sdpa-flash flex triton
    python -m bench --suite decode           # one query against a KV cache: us/step and GB/s
    python -m bench --suite serving          # a serving step over a paged cache: mixed batch, decode, prefill
    python -m bench --list                   # print the jobs and exit
    python -m bench --threads 0              # on the CPU, torch's own thread count instead of one
    python -m bench.report RESULTS.csv       # the short table of a finished run

--device auto picks CUDA when present, else the CPU. Without CUDA, Triton
runs under its interpreter (TRITON_INTERPRET=1, set here before `kernels` is
imported), at one tiny size, for correctness only. Results go to --out, else
$OUT, else bench/results/: a CSV (written row by row), a markdown report and
PNG plots, named with the device and the date (see bench/report.py).
--time-budget S skips every job that would not finish inside S seconds
(judged from the jobs measured so far); they are recorded as "skipped: time
budget". SIGTERM or SIGINT stops the run: the job in flight and the rest are
recorded as stopped, the CSV, the markdown and the plots are still written,
and the exit code is 128 + the signal's number.

On the CPU every provider runs on one torch thread unless --threads says
otherwise: the fair comparison, the same single core for all, as in the
tests. With a thread pool on a shared machine a call's time also holds the
pool's wait for a core other work holds, so timings swing with the host's
load. The thread count goes into every report.
"""
import argparse
import os
import signal
import sys
import time
from collections import defaultdict

import torch

from . import suites
from .plan import add_sweep_options


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--suite", nargs="+", choices=suites.NAMES + ("all",), default=["all"])
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer sizes, fewer repeats")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: $OUT, else bench/results/)")
    parser.add_argument("--time-budget", type=float, metavar="S", help="skip the jobs that would not finish inside S seconds")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--list", action="store_true", help="print the jobs and exit")
    parser.add_argument("--threads", type=int, metavar="T",
                        help="torch threads (default: 1 on the CPU, torch's own on a GPU run; 0: torch's own, "
                             "OMP_NUM_THREADS or one per core)")
    return add_sweep_options(parser)


def threads_for(args, device_type):
    """The torch thread count this run asks for, or 0 to keep torch's own."""
    if args.threads is not None:
        if args.threads < 0:
            raise SystemExit(f"python -m bench: --threads must be 0 or more, got {args.threads}")
        return args.threads
    return 1 if device_type == "cpu" else 0  # one thread: see the module docstring


def resolve_device(choice):
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return choice


def main(argv=None):
    args = build_parser().parse_args(argv)
    device_type = resolve_device(args.device)
    if not torch.cuda.is_available():
        # Triton reads this when `kernels` is imported (lazily, by the providers): set it first.
        # With a GPU present it stays as it is: flipping it mid-process would turn kernels other
        # code already uses on the GPU into interpreted ones (--device cpu then declines Triton).
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        jobs, _ = suites.build_jobs(args, device_type)
    except ValueError as exc:
        raise SystemExit(f"python -m bench: {exc}") from None
    if args.list:
        for job in jobs:
            print(job.suite, job.kind, job.provider, job.mode, job.case.shape)
        return 0

    threads = threads_for(args, device_type)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _start(jobs, device_type, args)
    finally:
        torch.set_num_threads(previous_threads)  # main() also runs inside pytest


def _start(jobs, device_type, args):
    from .report import REPO_ROOT, context, threads_note
    from .timing import timer_for

    device = torch.device(device_type)
    timer = timer_for(device, args.quick)
    ctx = context(device, timer.method)
    out_dir = args.out or os.environ.get("OUT") or os.path.join(REPO_ROOT, "bench", "results")
    os.makedirs(out_dir, exist_ok=True)
    print(f"bench: {ctx['device']} | {threads_note(ctx)} | torch {ctx['torch']}, triton {ctx['triton']} | "
          f"{ctx['commit']} | {ctx['date']}\n"
          f"bench: {len(jobs)} jobs -> {out_dir}; host load {ctx['load']}", file=sys.stderr)
    if device_type == "cpu":
        print("bench: CPU run: Triton appears in correctness rows only (interpreter), never timed", file=sys.stderr)

    from .sweep import stop_on_signals

    with stop_on_signals():
        return _run(jobs, device, timer, ctx, out_dir, args)


def _run(jobs, device, timer, ctx, out_dir, args):
    from .report import CsvStream, file_name, load_average, summary, terminal_report, write_outputs
    from .sweep import run_jobs, stopped_by

    started = time.perf_counter()
    stream = CsvStream(os.path.join(out_dir, file_name(ctx, "bench", "csv")), ctx)
    try:
        results = run_jobs(jobs, device, timer, args.time_budget, on_result=lambda r: stream.write(r.record()))
    finally:
        stream.close()
    stopped = stopped_by(results)
    if stopped:
        print(f"bench: stopped by {stopped}; writing the reports of the {len(results)} rows", file=sys.stderr)
    records = [r.record() for r in results]
    ctx["load_end"] = load_average()
    paths = write_outputs(records, ctx, out_dir, plots=not args.no_plots)
    wall = time.perf_counter() - started

    setup = defaultdict(float)
    for r in records:
        setup[r["provider"]] += r["setup_s"] or 0.0
    print(terminal_report(records))
    print("\nsetup (first calls: compiling, autotuning, warm-up), s: "
          + ", ".join(f"{name} {s:.1f}" for name, s in setup.items() if s))
    print("files: " + ", ".join(paths))
    print(f"wall time: {wall:.0f} s on {ctx['device']}\n")
    print(summary(records))
    print(suites.summaries(records))
    return 128 + signal.Signals[stopped].value if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
