"""bench/mods_suite.py on the CPU: the work it counts, its plans, and its correctness rows run through the sweep."""
import argparse

import pytest
import torch

import reference.mods as ref
from bench import mods_suite, sweep
from bench.mods_suite import BUILD, MaskBuildCase, ModsCase
from bench.plan import KIB
from reference.mods import dense_mask


def args(*suite, **overrides):
    values = dict(suite=list(suite) or ["mods"], heads=None, head_dim=None, modes=None, dtype=None, quick=False,
                  n=None)
    values.update(overrides)
    return argparse.Namespace(**values)


@pytest.mark.parametrize("case", [ModsCase("document", 1, 2, 1, 300, 16, torch.float32, 40),
                                  ModsCase("prefix_lm", 1, 2, 1, 130, 16, torch.float32, 37),
                                  ModsCase("prefix_lm", 1, 2, 1, 20, 16, torch.float32, 37),  # prefix past N
                                  ModsCase("sliding_window", 1, 2, 1, 130, 16, torch.float32, 32)],
                         ids=["document", "prefix", "prefix-past-n", "window"])
def test_pairs_are_the_visible_pairs_of_the_pattern(case):
    visible = dense_mask(case.mods(ref, None), 1, 1, case.n, case.n)
    assert case.pairs() == visible.sum().item()
    assert case.flops("bwd") == 2.5 * case.flops("fwd") == 2.5 * 4 * 2 * 16 * visible.sum().item()
    if case.pattern == "document":
        lengths = case.doc_lengths()
        assert sum(lengths) == case.n and len(lengths) > 3 and all(0 < n <= 60 for n in lengths)


def test_cpu_plan_is_correctness_rows_with_the_builds_apart():
    jobs = mods_suite.build_jobs(args(heads=["4:2"], head_dim=[16]), "cpu")
    assert jobs and all(j.kind == "check" for j in jobs)
    attention = [j for j in jobs if isinstance(j.case, ModsCase)]
    builds = [j for j in jobs if isinstance(j.case, MaskBuildCase)]
    assert {j.case.pattern for j in attention} == set(mods_suite.PATTERNS)
    assert {(j.provider, j.mode) for j in attention} == {(p, m) for p in mods_suite.ATTENTION for m in ("fwd", "bwd")}
    assert {j.provider for j in builds} == set(mods_suite.BUILDS) and all(j.mode == BUILD for j in builds)
    assert all(j.case.heads_q == 4 and j.case.heads_kv == 2 and j.case.head_dim == 16 for j in attention)
    assert mods_suite.build_jobs(args("window"), "cpu") == [], "not asked for: no jobs"


def test_gpu_plan_times_every_provider_and_the_builds_apart():
    jobs = mods_suite.build_jobs(args(), "cuda")
    timed = [j for j in jobs if j.kind == "time"]
    assert jobs.index(timed[0]) > max(i for i, j in enumerate(jobs) if j.kind == "check"), "checks come first"
    attention = {(j.provider, j.mode, j.case.pattern, j.case.n) for j in timed if isinstance(j.case, ModsCase)}
    assert attention == {(p, m, pattern, n) for p in mods_suite.ATTENTION for m in ("fwd", "bwd")
                         for pattern in mods_suite.PATTERNS for n in (4 * KIB, 16 * KIB)}
    builds = [j for j in timed if isinstance(j.case, MaskBuildCase)]
    assert {(j.provider, j.mode) for j in builds} == {(p, BUILD) for p in mods_suite.BUILDS}
    assert len(builds) == 2 * len(mods_suite.PATTERNS) * 2
    case = next(j.case for j in timed if isinstance(j.case, ModsCase) and j.case.pattern == "prefix_lm")
    assert case.param == case.n // 4 and case.heads == "32:8" and case.dtype == torch.bfloat16


def test_cpu_rows_through_the_sweep():
    """One pattern's check rows, as python -m bench runs them once the suite is registered."""
    mods_suite.register()
    jobs = [j for j in mods_suite.build_jobs(args(heads=["2:1"], head_dim=[16]), "cpu")
            if (j.case.pattern if isinstance(j.case, ModsCase) else j.case.case.pattern) == "document"]
    results = {(j.provider, j.mode): sweep.run_job(j, torch.device("cpu"), timer=None) for j in jobs}
    for (provider, mode), result in results.items():
        if (provider, mode) == ("flex-mods", "bwd"):
            assert result.status == "unsupported: FlexAttention has no backward on the CPU"
            continue
        assert result.status == sweep.CORRECTNESS_ONLY, f"{provider} {mode}: {result.status}"
        assert result.max_err == 0.0 if mode == BUILD else result.max_err < 1e-5, (provider, mode, result.max_err)
        assert result.record()["shape"].startswith("document B1 H2:1 N130 D16")
    text = mods_suite.summary([r.record() for r in results.values()])
    assert text.startswith("Mods: correctness rows only") and "triton-mods fwd" in text


def test_summary_tables_the_timed_rows():
    def row(provider, mode, ms):
        return dict(suite="mods", kind="time", provider=provider, mode=mode, shape="document B1 H32:8 N4096 D128",
                    n=4096, time_ms=ms, status="ok" if ms else "skipped: memory (x)", max_err=None)

    text = mods_suite.summary([row("triton-mods", "fwd", 1.5), row("sdpa-mask", "fwd", None),
                               row("triton-build", BUILD, 0.25), row("flex-build", BUILD, 2.0)])
    header, _, body = text.splitlines()[1:4]
    assert "triton-mods fwd ms" in header and "triton-build build ms" in header
    assert [cell.strip() for cell in body.split("  ") if cell.strip()] == ["document", "4096", "1.500",
                                                                           "skipped: memory", "0.250", "2.000"]
    assert mods_suite.summary([]) == ""
