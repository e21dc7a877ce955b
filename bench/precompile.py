"""Compile a GPU sweep's Triton and FlexAttention kernels in parallel, before the sweep.

    python -m bench.precompile [the same sweep options as python -m bench] [--jobs J] [--deadline S]

Why: compiling is single-threaded per kernel, and a fresh machine has empty
caches. Each of our kernels runs the config kernels/configs.py chooses for the
GPU, compiled once per (head dim, causal, dtype, integer specialisation) for
the forward and for two backward kernels (a sequence-length bucket may pick
another tile, so the sweep's longer N can still compile once more);
torch.compile builds FlexAttention's kernels once per (head dim, mask, GQA,
grad mode, batch == 1). Done one after another inside the sweep, that takes
minutes. Here one worker process per combination runs the real call path
once at the smallest N, in parallel; the compiled binaries land in the
on-disk caches (Triton's and Inductor's), where the sweep finds them. Nothing
is timed here (TRITON_CACHE_AUTOTUNING=0 keeps any opt-in tuner's contended
timings out of the cache).

gpu_check.sh runs this in the background while pytest runs; nothing here is
timed or reported as a result.
"""
import os
import subprocess
import sys
import tempfile
import time

from .plan import AttentionCase, DTYPES, Job, parse_heads, resolve

COMPILED_PROVIDERS = ("triton", "flex")


def combinations(args):
    """(provider, heads, head_dim, causal) for every compiled provider the sweep will meet."""
    preset = resolve(args, "cuda")
    suites = ("attention", "memory", "modules") if "all" in args.suite else tuple(args.suite)
    causal_flags = {"both": [False, True], "on": [True], "off": [False]}[args.causal]
    combos = []
    if "attention" in suites:
        combos += [(p, h, d, c) for p in preset.providers if p in COMPILED_PROVIDERS
                   for h in preset.heads for d in preset.head_dim for c in causal_flags]
    if "memory" in suites and "triton" in preset.memory_providers:
        combos.append(("triton", "16", 64, False))
    if "modules" in suites:
        _, _, d_model, heads = preset.module
        combos.append(("triton", str(heads), d_model // heads, True))
    combos = list(dict.fromkeys(combos))
    combos.sort(key=lambda combo: COMPILED_PROVIDERS.index(combo[0]))  # Triton's workers have the most to compile
    return combos, preset


def warm_one(provider, heads, head_dim, causal, dtype_name, n):
    """Run the provider once per mode (and for flex also at batch 1, which dynamo specialises)."""
    import torch

    from .sweep import BUILDERS

    device = torch.device("cuda")
    h_q, h_kv = parse_heads(heads)
    batches = (2, 1) if provider == "flex" else (1,)
    for batch in batches:
        case = AttentionCase(batch, h_q, h_kv, n, head_dim, causal, DTYPES[dtype_name])
        for mode in ("fwd", "bwd"):
            call, _ = BUILDERS[AttentionCase](Job("attention", "time", provider, mode, case), device)
            call()
    torch.cuda.synchronize()


def main(argv=None):
    from .__main__ import build_parser

    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--one"]:
        provider, heads, head_dim, causal, dtype_name, n = argv[1:7]
        warm_one(provider, heads, int(head_dim), causal == "True", dtype_name, int(n))
        return 0

    parser = build_parser()
    parser.prog = "python -m bench.precompile"
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 2), help="workers at once")
    parser.add_argument("--deadline", type=float, default=None, metavar="S", help="stop the workers after S seconds")
    args = parser.parse_args(argv)
    combos, preset = combinations(args)
    n = min(preset.n)
    env = dict(os.environ, TRITON_CACHE_AUTOTUNING="0", TORCHINDUCTOR_COMPILE_THREADS="1")
    pending = [[sys.executable, "-m", "bench.precompile", "--one", p, h, str(d), str(c), preset.dtype, str(n)]
               for p, h, d, c in combos]
    print(f"precompile: {len(pending)} workers, {args.jobs} at once, N={n}, {preset.dtype}", flush=True)
    started = time.perf_counter()
    running, failed = {}, 0
    while pending or running:
        while pending and len(running) < args.jobs:
            cmd = pending.pop(0)
            log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty worker never blocks
            running[subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)] = (cmd, log)
        for proc, (cmd, log) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[proc]
            log.seek(0)
            output = log.read().strip().splitlines()
            log.close()
            failed += proc.returncode != 0
            what = " ".join(cmd[4:8])
            tail = f": {output[-1]}" if proc.returncode and output else ""
            print(f"precompile: {what} rc={proc.returncode} at {time.perf_counter() - started:.0f} s{tail}", flush=True)
        if args.deadline is not None and time.perf_counter() - started > args.deadline:
            for proc, (cmd, _) in running.items():
                proc.terminate()
                print(f"precompile: {' '.join(cmd[4:8])} stopped at the {args.deadline:g} s deadline", flush=True)
            for proc in running:
                proc.wait()
            return 1
        time.sleep(0.5)
    print(f"precompile: done in {time.perf_counter() - started:.0f} s, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
