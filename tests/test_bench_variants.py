"""The sliding-window and varlen bench suites on the CPU: work counts, plans, the mask FlexAttention
gets, the memory skip, and one tiny run through `python -m bench`.
"""
import csv
import os

import pytest
import torch

from bench import sweep, varlen_suite, window_suite
from bench.__main__ import build_parser, main
from bench.flops import attention_flops
from bench.plan import KIB, Job
from bench.varlen_suite import VarlenCase
from bench.window_suite import WindowCase
from reference import causal_visibility, window_visibility

CPU = torch.device("cpu")


# --- work counted ----------------------------------------------------------------------

@pytest.mark.parametrize("n, window", [(96, 32), (KIB, 256), (10, 64), (7, 1)])
def test_window_pairs_are_the_visible_pairs(n, window):
    visible = window_visibility(n, n, (window - 1, 0)) & causal_visibility(n, n)
    case = WindowCase(1, 2, 2, n, 64, window, torch.bfloat16)
    assert case.pairs() == visible.sum().item()
    assert case.flops("fwd") == 4 * 2 * 64 * visible.sum().item()
    assert case.flops("bwd") == 2.5 * case.flops("fwd")


def test_varlen_flops_count_each_sequence_causally():
    case = VarlenCase((3, 100, 1), 4, 2, 64, torch.bfloat16)
    assert case.flops("fwd") == sum(attention_flops(1, 4, n, n, 64, causal=True) for n in (3, 100, 1))
    assert case.total == 104 and case.columns()["n"] == 104 and case.columns()["batch"] == 3


# --- plans ------------------------------------------------------------------------------

def _jobs(module, argv, device_type):
    return module.build_jobs(build_parser().parse_args(argv), device_type)


def test_gpu_window_plan():
    jobs = _jobs(window_suite, [], "cuda")
    timed = [j for j in jobs if j.kind == "time"]
    cases = {j.case for j in timed}
    assert {c.n for c in cases} == {4 * KIB, 8 * KIB, 16 * KIB, 32 * KIB, 64 * KIB}
    assert {c.window for c in cases} == {KIB, 4 * KIB}
    assert all(c.causal and c.head_dim == 128 and c.dtype == torch.bfloat16 and c.batch == 1 for c in cases)
    assert {j.provider for j in timed} == {"triton-window", "flex-window", "sdpa-mask", "triton-causal"}
    assert {j.mode for j in timed} == {"fwd", "bwd"}
    assert jobs.index(timed[0]) > max(i for i, j in enumerate(jobs) if j.kind == "check"), "checks come first"
    assert _jobs(window_suite, ["--suite", "attention"], "cuda") == [], "not asked for: no jobs"


def test_gpu_varlen_plan_pads_to_twice_the_real_tokens_and_has_one_long_sequence():
    timed = [j for j in _jobs(varlen_suite, [], "cuda") if j.kind == "time"]
    packed = [c for c in {j.case for j in timed} if len(c.lengths) > 1]
    assert {c.total for c in {j.case for j in timed}} == {16 * KIB, sum(varlen_suite.SHORT)}
    long = next(c for c in packed if c.lengths == varlen_suite.LONG)
    assert len(long.lengths) * max(long.lengths) == 2 * long.total, "padding doubles the long batch"
    assert any(j.case.lengths == (long.total,) and j.provider == "triton-varlen" for j in timed)
    assert {j.provider for j in timed} == set(varlen_suite.PROVIDERS)


@pytest.mark.parametrize("suite", [window_suite, varlen_suite])
def test_cpu_plans_are_correctness_only(suite):
    jobs = _jobs(suite, ["--heads", "2", "--head-dim", "16"], "cpu")
    assert jobs and all(j.kind == "check" for j in jobs)
    assert all(j.case.head_dim == 16 and j.case.heads_q == 2 for j in jobs)


# --- what each provider is given ---------------------------------------------------------------

def test_flex_gets_the_same_mask():
    from torch.nn.attention.flex_attention import create_mask

    mask_mod = window_suite.window_mask_mod(5)
    assert window_suite.window_mask_mod(5) is mask_mod, "one function per window: compiled flex is not recompiled"
    expected = window_visibility(40, 40, (4, 0)) & causal_visibility(40, 40)
    assert torch.equal(create_mask(mask_mod, None, None, 40, 40, device="cpu")[0, 0], expected)


def test_dense_mask_that_does_not_fit_is_skipped(monkeypatch):
    monkeypatch.setattr(window_suite, "free_bytes", lambda device: 1000)
    job = Job("window", "time", "sdpa-mask", "fwd", WindowCase(1, 2, 2, 64, 16, 8, torch.float32))
    result = sweep.run_job(job, CPU, timer=None)
    assert result.status == "skipped: memory (the dense 64x64 mask needs 0.0 GiB, 0.0 GiB free)", result.status
    assert result.time_ms is None
    assert window_suite.dense_mask_bytes(64 * KIB, torch.bfloat16) == 3 * 2**32


def test_summary_shows_linear_growth():
    def row(provider, n, ms):
        return dict(suite="window", kind="time", mode="fwd", provider=provider, window=KIB, n=n, time_ms=ms,
                    status="ok")
    records = [row("triton-window", 4 * KIB, 1.0), row("triton-window", 16 * KIB, 4.0),
               row("triton-causal", 4 * KIB, 1.0), row("triton-causal", 16 * KIB, 16.0)]
    lines = window_suite.summary(records).splitlines()
    assert lines[1].split() == ["mode", "provider", "W", "N=4k", "ms", "N=16k", "ms", "growth"]
    assert lines[3].split() == ["fwd", "triton-window", "1024", "1.000", "4.000", "1.00"]
    assert lines[4].split() == ["fwd", "triton-causal", "1024", "1.000", "16.000", "4.00"]


# --- one tiny run through the entry point -------------------------------------------------------



def test_cpu_run_gives_correctness_rows(tmp_path):
    assert main(["--device", "cpu", "--suite", "window", "varlen", "--out", str(tmp_path), "--no-plots",
                 "--heads", "2", "--head-dim", "16"]) == 0
    (csv_name,) = [f for f in os.listdir(tmp_path) if f.endswith(".csv")]
    with open(tmp_path / csv_name, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["suite"] for r in rows} == {"window", "varlen"}
    assert {r["provider"] for r in rows} == set(window_suite.CPU_PROVIDERS) | set(varlen_suite.PROVIDERS)
    for r in rows:
        assert r["kind"] == "check" and r["time_ms"] == "", r
        assert r["status"] == sweep.CORRECTNESS_ONLY, r
        assert float(r["max_err"]) < 1e-4, f"{r['provider']} {r['mode']}: max err {r['max_err']} vs float64"
    text = open(tmp_path / csv_name.replace(".csv", ".md")).read()
    assert "## window" in text and "## varlen" in text and "vs flex-window" in text
