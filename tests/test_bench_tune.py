"""bench.tune on the CPU: the plan, one row per config, the ranking, failures recorded, the tuned table it writes.

kernels/configs.py provides KERNELS (name -> KernelConfigs: `.candidates`, `.fitting(chip, ...)`) and
only_config(name, config). A stand-in registry takes their place where these tests hold bench.tune to
that interface; the timer is a stub (no GPU to time on). The last tests use the real registry, with a
chip's tables on the CPU (ATTN_CHIP), to show that the table bench.tune writes is the one the launchers read.
"""
import contextlib
import csv
import importlib
import json

import pytest
import torch
import triton

from bench import tune

configs = importlib.import_module("kernels.configs")
CPU = torch.device("cpu")
BAD = "M64 N64 w8 s2"  # the stand-in config that "fails to compile"


class StandInKernel:
    def __init__(self, *shapes):
        configs_ = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]
        self.candidates = {(precision, 128): configs_ for precision in ("16-bit", "fp32")}

    def all_configs(self):
        return self.candidates[("fp32", 128)]


@pytest.fixture
def registry(monkeypatch):
    """A stand-in KERNELS and only_config; `active` holds the config each kernel is pinned to."""
    tuned = {"fwd": StandInKernel((128, 64, 4, 3), (64, 32, 4, 2)),
             "bwd_dkdv": StandInKernel((32, 128, 8, 2), (64, 64, 8, 2)),
             "bwd_dq": StandInKernel((128, 32, 4, 3))}
    active = {}

    @contextlib.contextmanager
    def only_config(name, config):
        assert config in tuned[name].all_configs(), "bench.tune must pin a config from the kernel's own list"
        active[name] = config
        try:
            yield
        finally:
            del active[name]

    monkeypatch.setattr(tune, "registry", lambda: (tuned, only_config))
    return tuned, only_config, active


def _args(*extra):
    return tune.build_parser().parse_args(["--n", "64", "--head-dim", "16", "--heads", "2", "--tokens", "128",
                                           "--dtype", "float32", *extra])


def test_list_shows_every_candidate_and_the_plan(registry, capsys):
    assert tune.main(["--list"]) == 0
    printed = capsys.readouterr().out
    assert "shapes (12): bfloat16, 16 heads, B*N = 16384" in printed and "D128 causal N1k" in printed
    for label in ("M128 N64 w4 s3", "M64 N32 w4 s2", "M32 N128 w8 s2", BAD, "M128 N32 w4 s3"):
        assert label in printed, label
    assert "all candidates: no GPU" in printed and "60 timings" in printed  # 5 configs x 12 shapes


@pytest.mark.skipif(torch.cuda.is_available(), reason="times for real on a GPU")
def test_without_a_gpu_it_says_so_and_times_nothing(registry, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert tune.main([]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("bench.tune: needs a CUDA GPU") and "nothing timed" in printed
    assert list(tmp_path.iterdir()) == [], "no result files without a GPU"


def test_every_config_is_timed_ranked_and_a_failure_is_recorded(registry, tmp_path, monkeypatch):
    tuned, only_config, active = registry

    def stand_in_call(kernel, shape, device):
        def call():
            if kernel in active and tune.config_label(active[kernel]) == BAD:
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
    code = tune.report(args, ctx, str(tmp_path), tuned, only_config, shapes, CPU, stub_timer, None)
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


def test_the_time_budget_skips_instead_of_timing(registry):
    tuned, only_config, _ = registry
    args = _args()
    jobs = tune.jobs_of(tuned, args.kernels, tune.standard_shapes(args))
    rows = tune.run(jobs, only_config, CPU, timer=None, time_budget_s=-1.0)
    assert len(rows) == len(jobs) == 5 * 2 and all(r["status"] == "skipped: time budget" for r in rows)


def test_the_real_calls_run_forward_and_backward_under_the_interpreter():
    """The real registry: every fp32 candidate of the forward and of dQ forced in turn, the kernels run."""
    tuned, only_config = tune.registry()
    shapes = tune.standard_shapes(_args("--causal", "on"))
    calls = []

    def stub_timer(call, grad_to_none=()):
        call()
        calls.append(len(grad_to_none))
        return 1.0

    jobs = tune.jobs_of(tuned, ["fwd", "bwd_dq"], shapes)
    rows = tune.run(jobs, only_config, CPU, stub_timer)
    assert [r["status"] for r in rows] == ["ok"] * len(jobs) and len(jobs) >= 3, rows
    forward = sum(1 for kernel, _, _ in jobs if kernel == "fwd")
    assert calls == [0] * forward + [3] * (len(jobs) - forward), \
        "the forward is timed without autograd, the backward with q, k, v's grads reset"


@pytest.fixture
def sm_90(monkeypatch, tmp_path):
    """An H100's configs on the CPU, and an empty folder of tuned tables."""
    monkeypatch.setenv(configs.CHIP_ENV, "sm_90")
    monkeypatch.setattr(configs, "TUNED_DIR", tmp_path / "tuned")
    configs.reset()
    yield configs.CHIPS["sm_90"]
    monkeypatch.delenv(configs.CHIP_ENV)
    configs.reset()


def test_the_table_it_writes_is_the_one_the_launchers_read(sm_90, tmp_path):
    """Keys recorded from the launcher itself; the table written where configs.py looks; the next call uses it."""
    args = _args("--causal", "on", "--n", "256")
    shapes = tune.standard_shapes(args)
    keys = tune.launcher_keys(shapes, ["fwd", "bwd_dq"], CPU)
    assert keys[("fwd", shapes[0])] == "fwd float32 d16 causal q256 k256", keys
    assert keys[("bwd_dq", shapes[0])].startswith("bwd_dq float32 d16 causal q256 k256")
    fwd = configs.KERNELS["fwd"]
    fitting = tune.candidates(fwd, shapes[0], sm_90)
    assert len(fitting) >= 2, "nothing to choose between"
    slowest_default = configs.config_label(fitting[-1])  # not what the chooser takes by default
    rows = [dict(kernel="fwd", config=configs.config_label(c), dtype="float32", batch=shapes[0].batch,
                 heads=shapes[0].heads, n=256, head_dim=16, causal=True, time_ms=1.0 if i == len(fitting) - 1 else 2.0)
            for i, c in enumerate(fitting)]
    entries = tune.table_entries(rows, keys)
    assert entries == {keys[("fwd", shapes[0])]: slowest_default}
    ctx = dict(device="A Stand-in GPU", torch="t", triton="tr", commit="c", date="d")
    tune.write_table(entries, ctx, sm_90, [str(configs.TUNED_DIR / "a-stand-in-gpu.json")])
    written = json.loads((configs.TUNED_DIR / "a-stand-in-gpu.json").read_text())
    assert written["arch"] == "sm_90" and written["entries"] == entries
    configs.reset()
    call, _ = tune.attention_call("fwd", shapes[0], CPU)
    call()
    assert configs.config_label(fwd.last_config) == slowest_default, "the launcher did not take the tuned entry"
