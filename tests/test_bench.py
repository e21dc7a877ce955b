"""The benchmark harness on the CPU: FLOP counts, statuses, and one tiny run through `python -m bench`.

The end-to-end run happens once per module (a fixture) with a provider that
always raises placed first, so the same run shows that a failure becomes a
row and the sweep carries on. Triton runs under the interpreter here
(conftest sets TRITON_INTERPRET=1 without CUDA): its rows must be correctness
checks, never times. A run stopped by SIGTERM is a subprocess, sent the
signal while it sleeps inside a job (SIGINT is raised in-process).
bench/gpu_check.sh has its own file, tests/test_gpu_check.py.
"""
import csv
import importlib
import os
import signal
import subprocess
import sys
import time
import types
import warnings

import pytest
import torch

from bench import plan, providers, report, suites, sweep
from bench.__main__ import build_parser, main
from bench.flops import attention_flops, tflops_per_s
from bench.overhead import noop_kernels
from bench.plan import AttentionCase, Job
from bench.sweep import CORRECTNESS_ONLY, SKIPPED_BUDGET, Result, run_jobs, status_of
from bench.timing import NOT_MEASURED, CpuTimer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------
def test_flops_follow_flashattention_convention():
    fwd = attention_flops(2, 16, 1024, 1024, 64)
    assert fwd == 4 * 2 * 16 * 1024 * 1024 * 64
    assert attention_flops(2, 16, 1024, 1024, 64, causal=True) == 0.5 * fwd
    assert attention_flops(2, 16, 1024, 1024, 64, mode="bwd") == 2.5 * fwd
    assert attention_flops(2, 16, 1024, 1024, 64, mode="fwd+bwd") == 3.5 * fwd
    assert attention_flops(2, 16, 1024, 1024, 64, causal=True, mode="bwd") == 1.25 * fwd
    # Nq != Nk: one factor each.
    assert attention_flops(1, 1, 3, 5, 7) == 4 * 3 * 5 * 7


def test_gqa_flops_count_query_heads():
    # 32 query heads over 8 kv heads do the arithmetic of 32 heads: sharing K, V saves memory only.
    assert attention_flops(1, 32, 512, 512, 128) == 2 * attention_flops(1, 16, 512, 512, 128)


def test_tflops_and_bad_mode():
    assert tflops_per_s(2e12, 1000.0) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="mode"):
        attention_flops(1, 1, 1, 1, 1, mode="backward")


# ----------------------------------------------------------------------------
# Statuses, budget, timer
# ----------------------------------------------------------------------------
def test_status_of_names_the_kind_of_failure():
    assert status_of(providers.Unsupported("needs a GPU")) == "unsupported: needs a GPU"
    assert status_of(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8 GiB")) == "OOM"
    assert status_of(NotImplementedError("no CPU backward")).startswith("unsupported: no CPU backward")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("Flash attention kernel not used because:")
        warnings.warn("head_dim must be a multiple of 8")
    status = status_of(RuntimeError("No available kernel. Aborting execution."), caught)
    assert status == "unsupported: head_dim must be a multiple of 8", status
    long = status_of(ValueError("x" * 500))
    assert long.startswith("failed: ValueError: ") and len(long) < 130, long


def test_time_budget_skips_the_rest_without_running_them():
    case = AttentionCase(1, 2, 2, 16, 8, False, torch.float32)
    jobs = [Job("attention", "time", "naive", "fwd", case)] * 3
    results = run_jobs(jobs, CPU, CpuTimer(repeats=3), time_budget_s=-1.0)
    assert [r.status for r in results] == [SKIPPED_BUDGET] * 3
    assert all(r.time_ms is None for r in results)


def test_time_budget_skips_a_job_that_would_not_fit_and_runs_cheaper_ones(monkeypatch):
    # A fake clock: each job advances it by its provider's cost, so the budget decisions are exact.
    clock = [0.0]
    cost = {"slow": 10.0, "fast": 1.0}

    def fake_run_job(job, device, timer):
        clock[0] += cost[job.provider]
        return Result(job, time_ms=1.0, setup_s=0.0)

    monkeypatch.setattr(sweep, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(sweep, "run_job", fake_run_job)
    case = AttentionCase(1, 2, 2, 16, 8, False, torch.float32)
    jobs = [Job("attention", "time", p, "fwd", case) for p in ("slow", "slow", "fast", "fast", "slow")]
    results = run_jobs(jobs, CPU, timer=None, time_budget_s=15.0)
    # slow runs (nothing known yet): t=10; slow again would end at 20 > 15: skipped; fast, fast: t=12;
    # slow again would end at 22: skipped.
    assert [r.status for r in results] == ["ok", SKIPPED_BUDGET, "ok", "ok", SKIPPED_BUDGET]


def test_cpu_timer_median_and_grad_reset():
    x = torch.randn(8, requires_grad=True)
    grads_seen = []

    def step():
        grads_seen.append(x.grad is None)
        (x * 2).sum().backward()

    ms = CpuTimer(warmup=1, repeats=4)(step, grad_to_none=[x])
    assert ms > 0
    assert all(grads_seen), "the timer must reset .grad before every run"


# ----------------------------------------------------------------------------
# Plans: the GPU plan is built (and checked) without a GPU
# ----------------------------------------------------------------------------
def _jobs(argv, device_type):
    return suites.build_jobs(build_parser().parse_args(argv), device_type)[0]


def test_cpu_plan_never_times_triton():
    jobs = _jobs(["--providers", "naive", "triton", "sdpa-flash"], "cpu")
    triton = [j for j in jobs if "triton" in j.provider and j.suite != "overhead"]
    assert triton and all(j.kind == "check" for j in triton)
    # The host-cost rows time the Python around no-op kernels, never the interpreter.
    assert {j.provider for j in jobs if j.suite == "overhead"} == {"triton-noop", "sdpa"}
    # No memory suite off the GPU.
    assert {j.suite for j in jobs} == {"attention", "softmax", "modules", "overhead", *suites.registry.SUITES}


def test_gpu_plan_is_the_standard_sweep():
    jobs = _jobs([], "cuda")
    timed = [j for j in jobs if j.kind == "time" and j.suite == "attention"]
    cases = [j.case for j in timed]
    assert {c.n for c in cases} == {1024, 2048, 4096, 8192, 16384}
    assert all(c.batch * c.n == 16384 and c.dtype == torch.bfloat16 for c in cases)
    assert {(c.heads_q, c.heads_kv) for c in cases} == {(16, 16), (32, 8)}
    assert {c.head_dim for c in cases} == {64, 128} and {c.causal for c in cases} == {False, True}
    assert cases[0].head_dim == 128, "head dim 128 runs first: a time budget cuts the end"
    assert {"sdpa-flash", "sdpa-cudnn", "flex", "triton"} <= {j.provider for j in timed}
    assert {j.mode for j in timed} == {"fwd", "bwd"}
    memory = [j for j in jobs if j.suite == "memory"]
    assert max(j.case.n for j in memory) == 16384 and {"naive", "triton"} <= {j.provider for j in memory}
    assert any(j.provider == "triton" and j.kind == "time" for j in jobs if j.suite == "softmax")


def test_gpu_plan_runs_what_matters_first():
    jobs = _jobs([], "cuda")
    suites = [j.suite for j in jobs]
    first_other = min(i for i, s in enumerate(suites) if s not in ("attention", "overhead"))
    assert all(s in ("attention", "overhead") for s in suites[:first_other])
    assert "attention" not in suites[first_other:], "attention jobs run before memory, softmax, modules"
    kinds = [j.kind for j in jobs if j.suite == "attention"]
    assert kinds == sorted(kinds), "attention correctness rows (check) come before the timed ones"
    flex = [i for i, j in enumerate(jobs) if j.provider == "flex"]
    ours_and_sdpa = [i for i, j in enumerate(jobs) if j.suite == "attention" and j.kind == "time"
                     and (j.provider == "triton" or j.provider.startswith("sdpa"))]
    overhead = [i for i, j in enumerate(jobs) if j.suite == "overhead"]
    assert flex and ours_and_sdpa and overhead
    assert max(ours_and_sdpa) < min(overhead) < max(overhead) < min(flex), "Triton and SDPA, then overhead, then flex"
    assert {(j.provider, j.mode) for j in jobs if j.suite == "overhead"} == {
        (p, m) for p in ("triton", "sdpa") for m in ("fwd", "fwd+bwd", "decode")} | {("triton", "decode-paged")}


def test_heads_spec():
    assert plan.parse_heads("16") == (16, 16) and plan.parse_heads("32:8") == (32, 8)
    with pytest.raises(ValueError):
        plan.parse_heads("32:7")


# ----------------------------------------------------------------------------
# One tiny run through the real entry point
# ----------------------------------------------------------------------------
def _boom(q, k, v, causal):
    raise RuntimeError("this provider always fails")


# A CPU name longer than this machine's may be: the figures' titles must still fit.
LONG_CPU_NAME = "AMD EPYC 7763 64-Core Processor"
FIGURES = []  # every figure cpu_run drew, kept open (plt.close is caught) for the layout test


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(providers.ATTENTION, "boom", _boom)
        mp.setattr(providers, "CPU_ATTENTION", providers.CPU_ATTENTION + ("boom",))
        mp.setattr(report, "_cpu_name", lambda: LONG_CPU_NAME)
        mp.setattr(plt, "close", FIGURES.append)
        torch.set_num_threads(2)  # what torch would take on a 2-core machine: the run must ask for one
        try:
            assert main(["--device", "cpu", "--quick", "--out", str(out), "--n", "32", "64", "--head-dim", "16",
                         "--heads", "2", "--tokens", "64", "--providers", "boom", "naive", "sdpa-flash",
                         "--softmax-n", "128", "256", "--suite", *plan.SUITES, "decode"]) == 0
            # window, varlen: tests/test_bench_variants.py; serving: tests/test_bench_serving.py; hf: tests/test_hf.py
            assert torch.get_num_threads() == 2, "main() puts torch's thread count back"
        finally:
            torch.set_num_threads(threads)
    files = sorted(os.listdir(out))
    csv_files = [f for f in files if f.endswith(".csv")]
    assert len(csv_files) == 1, files
    with open(out / csv_files[0], newline="") as f:
        rows = list(csv.DictReader(f))
    yield out, files, rows
    for fig in FIGURES:
        plt.close(fig)


def test_run_writes_csv_markdown_and_plots_named_by_device_and_date(cpu_run):
    out, files, rows = cpu_run
    day = rows[0]["date"][:10]
    for name in (f"bench_cpu_{day}.csv", f"bench_cpu_{day}.md", f"attention_cpu_{day}.png", f"softmax_cpu_{day}.png"):
        assert name in files, (name, files)
    for png in (f for f in files if f.endswith(".png")):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    text = (out / f"bench_cpu_{day}.md").read_text()
    import triton
    for needle in ("CPU:", f"| torch | {torch.__version__} |", f"| triton | {triton.__version__} |",
                   f"| commit | {rows[0]['commit']} |", f"| date | {rows[0]['date']} |", "## attention", "## softmax",
                   "| torch threads | 1 |", "The CPU rows ran on 1 torch thread", "not the machine's memory bandwidth"):
        assert needle in text, needle
    for row in rows:
        assert row["device"].startswith("CPU:") and row["torch"] == torch.__version__
        assert row["commit"] and row["date"].endswith("UTC")
        assert row["threads"] == "1", "one torch thread on the CPU by default, recorded in every row"


def test_triton_rows_are_correctness_only_without_time(cpu_run):
    _, _, rows = cpu_run
    triton = [r for r in rows if r["provider"] == "triton"]
    assert {r["suite"] for r in triton} == {"attention", "softmax"}
    assert all(r["kind"] == "check" and r["time_ms"] == "" and r["tflops"] == "" for r in triton)
    attention = [r for r in triton if r["suite"] == "attention"]
    assert {r["mode"] for r in attention} == {"fwd", "bwd"}
    if torch.cuda.is_available():  # kernels already compiled for the GPU in this session: CPU tensors are declined
        assert all(r["status"].startswith("unsupported") for r in attention)
    else:
        assert all(r["status"] == CORRECTNESS_ONLY for r in triton)
        errors = [float(r["max_err"]) for r in triton]
        assert max(errors) < 1e-4, f"fp32 Triton (interpreter) vs float64: max errors {errors}"


def test_failing_provider_is_a_row_and_the_sweep_goes_on(cpu_run):
    _, _, rows = cpu_run
    attention = [r for r in rows if r["suite"] == "attention" and r["kind"] == "time"]
    boom = [r for r in attention if r["provider"] == "boom"]
    assert boom and all(r["status"] == "failed: RuntimeError: this provider always fails" for r in boom)
    assert all(r["time_ms"] == "" for r in boom)
    later = attention[attention.index(boom[0]) + 1:]
    ok = [r for r in later if r["status"] == "ok"]
    assert {r["provider"] for r in ok} == {"naive", "sdpa-flash"}
    assert all(float(r["time_ms"]) > 0 and float(r["tflops"]) > 0 for r in ok)
    assert all(r["extra_mib"] == NOT_MEASURED for r in ok), "memory is not measured on the CPU"
    # The ratio is against sdpa-flash in the same shape and mode.
    assert all(float(r["ratio"]) == pytest.approx(1.0) for r in ok if r["provider"] == "sdpa-flash")


def test_plots_keep_every_text_inside_the_figure(cpu_run):
    """A title wider than its figure is cut off in the PNG (the context line of a one-panel plot was)."""
    _, files, _ = cpu_run
    assert len(FIGURES) == sum(f.endswith(".png") for f in files) >= 2
    import matplotlib.text

    for fig in FIGURES:
        # Lay the figure out again at its own dpi first: savefig drew it at dpi 110, and a legend at loc="best"
        # keeps the pixel offsets of that last draw, so measuring at dpi 100 put a legend that the data sent to
        # the right-hand side 30 px past the edge (flaky: where "best" lands depends on the measured times).
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        width, height = fig.bbox.width, fig.bbox.height
        # Tick labels are left out: matplotlib keeps those outside the axes' range, and does not draw them.
        ticks = {id(label) for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)
                 for tick in axis.get_major_ticks() + axis.get_minor_ticks() for label in (tick.label1, tick.label2)}
        for text in fig.findobj(matplotlib.text.Text):
            if id(text) in ticks or not (text.get_visible() and text.get_text().strip()):
                continue
            box = text.get_window_extent(renderer)
            assert box.x0 >= -1 and box.x1 <= width + 1 and box.y0 >= -1 and box.y1 <= height + 1, (
                f"{text.get_text()!r} at x {box.x0:.0f} to {box.x1:.0f}, y {box.y0:.0f} to {box.y1:.0f} "
                f"leaves the {width:.0f} x {height:.0f} figure")
    texts = "\n".join(text.get_text() for fig in FIGURES for text in fig.findobj(matplotlib.text.Text))
    assert LONG_CPU_NAME in texts and "1 torch thread" in texts, "the titles name the CPU and the thread count"


def test_cpu_softmax_plot_shows_times_not_bandwidth(cpu_run):
    _, _, rows = cpu_run
    softmax = [fig for fig in FIGURES for ax in fig.axes if ax.get_title().startswith("Softmax")]
    assert len(softmax) == 1
    ax = softmax[0].axes[0]
    assert ax.get_ylabel().startswith("ms per call") and "1 torch thread" in ax.get_ylabel()
    timed = {(r["provider"], float(r["n"])): float(r["time_ms"]) for r in rows
             if r["suite"] == "softmax" and r["kind"] == "time"}
    plotted = {(line.get_label(), x): y for line in ax.get_lines() for x, y in zip(*line.get_data())}
    assert plotted == pytest.approx(timed, rel=1e-4), (plotted, timed)  # the CSV keeps 6 digits


def test_threads_flag_sets_and_records_the_count(tmp_path):
    before = torch.get_num_threads()
    assert main(["--device", "cpu", "--quick", "--suite", "softmax", "--softmax-n", "64", "--threads", "2",
                 "--no-plots", "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == before
    with open(next(tmp_path.glob("*.csv")), newline="") as f:
        assert {row["threads"] for row in csv.DictReader(f)} == {"2"}
    assert "| torch threads | 2 |" in next(tmp_path.glob("*.md")).read_text()
    with pytest.raises(SystemExit, match="--threads"):
        main(["--device", "cpu", "--threads", "-1", "--suite", "softmax"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="demo.py times on the GPU when there is one")
def test_demo_times_on_one_thread_unless_told():
    demo = os.path.join(ROOT, "demo.py")
    env = dict(os.environ, OMP_NUM_THREADS="2")  # torch's own count would be 2
    default = subprocess.run([sys.executable, demo, "--mha"], env=env, capture_output=True, text=True, timeout=120)
    assert default.returncode == 0 and "Timing on cpu (1 thread)" in default.stdout, default.stdout + default.stderr
    bad = subprocess.run([sys.executable, demo, "--threads", "-1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--threads" in bad.stderr


def test_report_prints_the_summary_of_a_csv(cpu_run, capsys):
    out, files, _ = cpu_run
    csv_name = next(f for f in files if f.endswith(".csv"))
    assert report.main([str(out / csv_name)]) == 0
    printed = capsys.readouterr().out
    assert "TFLOP/s at the largest N" in printed and "sdpa-flash" in printed and "CPU:" in printed


def test_overhead_rows_are_labelled_and_count_launches(cpu_run):
    out, files, rows = cpu_run
    overhead = {(r["provider"], r["mode"]): r for r in rows if r["suite"] == "overhead"}
    modes = ("fwd", "fwd+bwd", "decode")
    assert set(overhead) == {(p, m) for p in ("triton-noop", "sdpa") for m in modes} | {("triton-noop", "decode-paged")}
    assert all(r["status"] == "ok" and float(r["time_ms"]) > 0 for r in overhead.values())
    fwd, both = int(overhead["triton-noop", "fwd"]["launches"]), int(overhead["triton-noop", "fwd+bwd"]["launches"])
    assert 1 <= fwd < both, (fwd, both)
    assert int(overhead["triton-noop", "decode-paged"]["launches"]) >= 1
    # Each row's host cost as a ratio to the bare custom op, kept through the report (not SDPA's ratio).
    assert all(float(r["ratio"]) > 0 for r in overhead.values())
    ours = overhead["triton-noop", "fwd+bwd"]
    assert float(ours["ratio"]) > float(overhead["triton-noop", "fwd"]["ratio"]), "a backward costs more than none"
    text = (out / next(f for f in files if f.endswith(".md"))).read_text()
    assert "## overhead" in text and "no-op recorder" in text and "x bare op" in text
    assert f"{float(ours['ratio']):.2f}x" in text


def test_noop_kernels_put_every_kernel_back():
    importlib.import_module("kernels.flash_attention")
    from triton.runtime.jit import KernelInterface

    def kernel_objects():
        return {(name, attr): value for name, module in list(sys.modules.items())
                if name == "kernels" or name.startswith("kernels.")
                for attr, value in vars(module).items() if isinstance(value, KernelInterface)}

    before = kernel_objects()
    with noop_kernels() as launches:
        from kernels import flash_attention

        q = torch.randn(1, 2, 8, 16)
        flash_attention(q, q, q)  # no kernel runs: the output is whatever torch.empty held
        assert launches[0] == 1 and not kernel_objects(), "every kernel object is replaced inside"
    after = kernel_objects()
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


# The driver sleeps inside the first causal timed job, once the non-causal ones have rows
# (the correctness rows are stubbed: the interpreter's time is not what this test is about).
SLEEPY_DRIVER = """
import os, sys, time
os.environ["TRITON_INTERPRET"] = "1"
from bench import sweep
from bench.__main__ import main
marker, real = sys.argv[1], sweep.run_job
def run_job(job, device, timer):
    if job.kind == "check":
        return sweep.Result(job, status=sweep.CORRECTNESS_ONLY, max_err=0.0)
    if job.case.causal:
        open(marker, "w").close()
        time.sleep(120)
    return real(job, device, timer)
sweep.run_job = run_job
sys.exit(main(sys.argv[2:]))
"""


def test_a_signal_stops_the_run_and_the_reports_are_still_written(tmp_path):
    sig = signal.SIGTERM  # what `timeout` sends at gpu_check.sh's limits
    marker, out = tmp_path / "sleeping", tmp_path / "out"
    args = ["--device", "cpu", "--quick", "--suite", "attention", "--out", str(out), "--n", "32", "--head-dim", "16",
            "--heads", "2", "--tokens", "32", "--providers", "naive"]
    proc = subprocess.Popen([sys.executable, "-c", SLEEPY_DRIVER, str(marker), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), f"the run never reached the sleeping job:\n{proc.stdout.read() if proc.poll() else ''}"
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + sig.value, output[-2000:]
    name = sig.name
    files = sorted(os.listdir(out))
    day = next(f for f in files if f.endswith(".csv"))[len("bench_cpu_"):-len(".csv")]
    for kind in ("bench_cpu_{}.csv", "bench_cpu_{}.md", "attention_cpu_{}.png"):
        assert kind.format(day) in files, (kind, files)
    with open(out / f"bench_cpu_{day}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    statuses = [r["status"] for r in rows if r["kind"] == "time"]
    stopped = statuses.index(f"stopped: {name}")
    assert stopped > 0 and all(s == "ok" for s in statuses[:stopped]), statuses
    assert statuses[stopped + 1:] and all(s == f"skipped: stopped ({name})" for s in statuses[stopped + 1:]), statuses
    assert f"stopped: {name}" in (out / f"bench_cpu_{day}.md").read_text()


def test_sigint_inside_a_job_stops_the_run_in_process(monkeypatch):
    def interrupted_run_job(job, device, timer):
        if job.provider == "second":
            signal.raise_signal(signal.SIGINT)
        return Result(job, time_ms=1.0, setup_s=0.0)

    monkeypatch.setattr(sweep, "run_job", interrupted_run_job)
    case = AttentionCase(1, 2, 2, 16, 8, False, torch.float32)
    jobs = [Job("attention", "time", p, "fwd", case) for p in ("first", "second", "third")]
    before = signal.getsignal(signal.SIGINT)
    with sweep.stop_on_signals():
        results = run_jobs(jobs, CPU, timer=None)
    assert [r.status for r in results] == ["ok", "stopped: SIGINT", "skipped: stopped (SIGINT)"]
    assert sweep.stopped_by(results) == "SIGINT"
    assert signal.getsignal(signal.SIGINT) is before, "the handlers are put back"
