"""bench.tune on the CPU: the plan, one row per config, the table, failures recorded; never a timing.

kernels/autotune.py provides TUNED_KERNELS (name -> triton Autotuner, `.configs` its list) and
only_config(name, config). Here a stand-in registry takes their place, so these tests hold
bench.tune to that interface whatever the real lists are; the timer is a stub (no GPU to time on).
"""
import contextlib
import csv
import importlib

import pytest
import torch
import triton

from bench import tune

autotune = importlib.import_module("kernels.autotune")
CPU = torch.device("cpu")
BAD = "M64 N64 w8 s2"  # the stand-in config that "fails to compile"


class StandInTuner:
    def __init__(self, *shapes):
        self.configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


@pytest.fixture
def registry(monkeypatch):
    """A stand-in TUNED_KERNELS and only_config; `active` holds the config each kernel is pinned to."""
    tuned = {"fwd": StandInTuner((128, 64, 4, 3), (64, 32, 4, 2)),
             "bwd_dkdv": StandInTuner((32, 128, 8, 2), (64, 64, 8, 2)),
             "bwd_dq": StandInTuner((128, 32, 4, 3))}
    active = {}

    @contextlib.contextmanager
    def only_config(name, config):
        assert config in tuned[name].configs, "bench.tune must pin a config from the kernel's own list"
        active[name] = config
        try:
            yield
        finally:
            del active[name]

    monkeypatch.setattr(autotune, "TUNED_KERNELS", tuned, raising=False)
    monkeypatch.setattr(autotune, "only_config", only_config, raising=False)
    return tuned, active


def _args(*extra):
    return tune.build_parser().parse_args(["--n", "64", "--head-dim", "16", "--heads", "2", "--tokens", "128",
                                           "--dtype", "float32", *extra])


def test_list_shows_every_config_and_the_plan(registry, capsys):
    assert tune.main(["--list"]) == 0
    printed = capsys.readouterr().out
    assert "shapes (12): bfloat16, 16 heads, B*N = 16384" in printed and "D128 causal N1k" in printed
    for label in ("M128 N64 w4 s3", "M64 N32 w4 s2", "M32 N128 w8 s2", BAD, "M128 N32 w4 s3"):
        assert label in printed, label
    assert "60 timings" in printed  # 5 configs x 12 shapes


@pytest.mark.skipif(torch.cuda.is_available(), reason="times for real on a GPU")
def test_without_a_gpu_it_says_so_and_times_nothing(registry, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert tune.main([]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("bench.tune: needs a CUDA GPU") and "nothing timed" in printed
    assert list(tmp_path.iterdir()) == [], "no result files without a GPU"


def test_every_config_is_timed_ranked_and_a_failure_is_recorded(registry, tmp_path, monkeypatch):
    tuned, active = registry

    def stand_in_call(kernel, shape, device):
        def call():
            if tune.config_label(active[kernel]) == BAD:
                raise RuntimeError("out of resource: shared memory, Required: 300000, Hardware limit: 232448")
        return call, []

    def stub_timer(call, grad_to_none=()):
        call()
        config = active[next(iter(active))]
        return config.kwargs["BLOCK_M"] / 64.0  # ms: the 64-row configs are the fastest

    monkeypatch.setattr(tune, "attention_call", stand_in_call)
    args = _args("--causal", "on")
    shapes = tune.standard_shapes(args)
    ctx = dict(device="stand-in", device_slug="stand-in", torch="t", triton="tr", commit="c", date="d", day="day")
    code = tune.report(args, ctx, str(tmp_path), tuned, autotune.only_config, shapes, CPU, stub_timer, None)
    assert code == 0
    with open(tmp_path / "tune_stand-in_day.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["kernel"], r["config"]) for r in rows] == [
        ("fwd", "M128 N64 w4 s3"), ("fwd", "M64 N32 w4 s2"), ("bwd_dkdv", "M32 N128 w8 s2"), ("bwd_dkdv", BAD),
        ("bwd_dq", "M128 N32 w4 s3")]
    by = {r["config"]: r for r in rows}
    assert by["M64 N32 w4 s2"]["vs_best"] == "1" and by["M128 N64 w4 s3"]["vs_best"] == "2"
    assert float(by["M64 N32 w4 s2"]["tflops"]) > 0 and by["M64 N32 w4 s2"]["status"] == "ok"
    assert by[BAD]["status"].startswith("failed: RuntimeError: out of resource: shared memory")
    assert by[BAD]["time_ms"] == "" and by["M32 N128 w8 s2"]["vs_best"] == "1", "a failure is no one's best"
    assert all(r["device"] == "stand-in" and r["commit"] == "c" for r in rows)
    text = (tmp_path / "tune_stand-in_day.md").read_text()
    assert "## fwd" in text and "## bwd_dkdv" in text and "| M64 N32 w4 s2 | 1 | 1 | 1.00 | 1.00 | 1.00 |" in text
    assert f"| {BAD} | 0 | 0 |  |  | FAILED |" in text
    assert "| best, TFLOP/s |" in text


def test_the_time_budget_skips_instead_of_timing(registry, tmp_path):
    tuned, _ = registry
    args = _args()
    jobs = tune.jobs_of(tuned, args.kernels, tune.standard_shapes(args))
    rows = tune.run(jobs, tuned, autotune.only_config, CPU, timer=None, time_budget_s=-1.0)
    assert len(rows) == len(jobs) == 5 * 2 and all(r["status"] == "skipped: time budget" for r in rows)


def test_the_real_calls_run_forward_and_backward_under_the_interpreter(registry):
    # The stand-in only_config pins nothing here: under the interpreter the kernels have one config.
    tuned, active = registry
    args = _args("--causal", "on")
    shapes = tune.standard_shapes(args)
    calls = []

    def stub_timer(call, grad_to_none=()):
        call()
        calls.append(len(grad_to_none))
        return 1.0

    rows = tune.run(tune.jobs_of(tuned, ["fwd", "bwd_dq"], shapes), tuned, autotune.only_config, CPU, stub_timer)
    assert [r["status"] for r in rows] == ["ok"] * 3, rows
    assert calls == [0, 0, 3], "the forward is timed without autograd, the backward with q, k, v's grads reset"
