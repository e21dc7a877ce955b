"""The decode suite of the benchmark (bench/decode_suite.py): its GPU plan, built without a GPU, and its CPU rows."""
import torch

from bench import decode_suite, report, suites
from bench.__main__ import build_parser
from bench.plan import Job
from bench.sweep import CORRECTNESS_ONLY, Result, run_jobs
from bench.timing import CpuTimer

KIB = 1024


def _jobs(argv, device_type):
    return suites.build_jobs(build_parser().parse_args(["--suite", "decode", *argv]), device_type)[0]


def test_gpu_plan_is_the_issue_sweep():
    jobs = _jobs([], "cuda")
    timed = [j for j in jobs if j.kind == "time"]
    cases = {j.case for j in timed}
    assert {c.batch for c in cases} == {1, 8, 64}
    assert {c.n for c in cases} == {1 * KIB, 4 * KIB, 16 * KIB, 32 * KIB, 64 * KIB, 128 * KIB}
    assert {(c.heads_q, c.heads_kv, c.head_dim, c.dtype) for c in cases} == {(32, 8, 128, torch.bfloat16)}
    assert {j.provider for j in timed} == set(decode_suite.GPU_PROVIDERS)
    assert {"copy", "sdpa-flash", "flex", "triton-flash", "triton-decode", "triton-decode-paged"} <= {
        j.provider for j in timed}
    checks = [j for j in jobs if j.kind == "check"]
    assert jobs[:len(checks)] == checks, "checks run first"
    assert {j.provider for j in checks} == {"sdpa-flash", *decode_suite.CHECKED}


def test_cpu_plan_is_correctness_only_and_small():
    jobs = _jobs([], "cpu")
    assert jobs and all(j.kind == "check" for j in jobs)
    assert {j.provider for j in jobs} == set(decode_suite.CHECKED)
    assert all(j.case.n <= 512 for j in jobs)


def test_gbps_counts_k_and_v_once_and_copy_twice():
    case = decode_suite.DecodeCase(8, 32, 8, 32 * KIB, 128, torch.bfloat16)
    assert case.kv_bytes == 2 * 8 * 8 * 32 * KIB * 128 * 2
    assert decode_suite.bytes_moved(Job("decode", "time", "triton-decode", "fwd", case)) == case.kv_bytes
    assert decode_suite.bytes_moved(Job("decode", "time", "copy", "fwd", case)) == 2 * case.kv_bytes


def test_cpu_rows_check_every_triton_provider_against_float64():
    results = run_jobs(_jobs([], "cpu"), torch.device("cpu"), CpuTimer(repeats=3))
    assert all(r.time_ms is None for r in results), "the interpreter is never timed"
    if torch.cuda.is_available():  # kernels compiled for the GPU in this session: CPU tensors are declined
        assert all(r.status.startswith("unsupported") for r in results)
        return
    assert [r.status for r in results] == [CORRECTNESS_ONLY] * len(results)
    errors = {r.job.provider: r.max_err for r in results}
    assert max(errors.values()) < 1e-5, f"fp32 Triton (interpreter) vs float64: {errors}"


def test_report_table_and_plot(tmp_path):
    """GPU-like rows (made up here, not measured) go through the table and the plot."""
    case = decode_suite.DecodeCase(1, 32, 8, 4 * KIB, 128, torch.bfloat16)
    rows = []
    for n in (4 * KIB, 32 * KIB):
        for provider, ms in (("copy", 0.02), ("triton-decode", 0.03)):
            job = Job("decode", "time", provider, "fwd", decode_suite.DecodeCase(1, 32, 8, n, 128, torch.bfloat16))
            rows.append(Result(job, time_ms=ms, gbps=decode_suite.bytes_moved(job) / (ms * 1e-3) / 1e9).record())
    text = report.terminal_report(rows)
    assert "== decode ==" in text and "us/step" in text and "30.0" in text, text
    ctx = report.context(torch.device("cpu"))
    path = decode_suite.plot_decode(rows, ctx, str(tmp_path / "decode.png"))
    assert path and (tmp_path / "decode.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert case.shape == "B1 H32:8 KV4096 D128"
