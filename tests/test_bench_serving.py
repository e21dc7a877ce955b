"""The serving suite (bench/serving_suite.py): its GPU plan and work counts, built without a GPU, its CPU
correctness rows (every provider against float64), and its report, summary and plot. Also that the suites
register in one place (bench/registry.py, listed by bench/suites.py).
"""
import csv
import os
import sys

import pytest
import torch

from bench import registry, report, serving_suite, suites
from bench.__main__ import build_parser, main
from bench.plan import Job
from bench.serving_suite import ServingCase
from bench.sweep import CORRECTNESS_ONLY, Result

KIB = 1024
CPU = torch.device("cpu")


def _jobs(argv, device_type):
    return suites.build_jobs(build_parser().parse_args(["--suite", "serving", *argv]), device_type)[0]


# --- the plan ----------------------------------------------------------------------------------------------

def test_gpu_plan_has_the_issue_steps():
    jobs = _jobs([], "cuda")
    timed = [j for j in jobs if j.kind == "time"]
    assert jobs.index(timed[0]) > max(i for i, j in enumerate(jobs) if j.kind == "check"), "checks come first"
    mixed = next(j.case for j in timed if j.case.step == "mixed")
    decodes = [n for n, new in zip(mixed.seqlens, mixed.new) if new == 1]
    assert decodes == [4 * KIB * i for i in range(1, 9)], "8 decodes at 4k to 32k cached keys"
    assert [(n - new, new) for n, new in zip(mixed.seqlens, mixed.new) if new > 1] == [(2 * KIB, 512)] * 2
    assert (mixed.heads_q, mixed.heads_kv, mixed.head_dim, mixed.dtype, mixed.page_size) == (
        32, 8, 128, torch.bfloat16, 16), "Llama-3-8B-like heads, bf16, pages of 16"
    assert {j.provider for j in timed if j.case == mixed} == {"triton-paged", "triton-separate", "sdpa", "flex-paged"}
    # The copy bandwidth, measured next to decode at B = 8 with 32k keys.
    b8 = [j for j in timed if j.case.step == "decode" and j.case.batch == 8 and j.case.seqlens[0] == 32 * KIB]
    assert {j.provider for j in b8} == {"copy", "triton-paged", "sdpa", "flex-paged"}
    assert any(j.case.step == "prefill" for j in timed)
    flex = [i for i, j in enumerate(jobs) if j.provider == "flex-paged" and j.kind == "time"]
    assert min(flex) > max(i for i, j in enumerate(jobs) if j.provider != "flex-paged"), "flex compiles: last"
    assert _jobs(["--quick"], "cuda") and len(_jobs(["--quick"], "cuda")) < len(jobs)


def test_cpu_plan_is_correctness_rows_at_a_tiny_mixed_step():
    jobs = _jobs([], "cpu")
    assert {j.provider for j in jobs} == set(serving_suite.CHECKED) and all(j.kind == "check" for j in jobs)
    case = jobs[0].case
    assert case.step == "mixed" and max(case.seqlens) <= 300 and case.dtype == torch.float32
    assert 1 in case.new and max(case.new) > 16, "decodes, and chunks past the split-KV path"
    assert suites.build_jobs(build_parser().parse_args(["--suite", "decode"]), "cpu")[0], "not asked for: none"
    assert not [j for j in suites.build_jobs(build_parser().parse_args(["--suite", "decode"]), "cpu")[0]
                if j.suite == "serving"]


def test_bytes_and_flops_count_what_the_step_must_do():
    case = ServingCase("mixed", (4 * KIB, 32 * KIB, 2560), (1, 1, 512), 32, 8, 128, torch.bfloat16)
    assert case.kv_bytes == 2 * 8 * 128 * 2 * (4 * KIB + 32 * KIB + 2560)
    # A chunk of 512 over 2048 cached keys: token i sees 2048 + i + 1 keys; a decode sees all its keys.
    pairs = 4 * KIB + 32 * KIB + sum(2048 + i + 1 for i in range(512))
    assert case.pairs() == pairs and case.flops() == 4 * 32 * 128 * pairs
    copy, ours = (Job("serving", "time", p, "fwd", case) for p in ("copy", "triton-paged"))
    assert serving_suite.bytes_moved(copy) == 2 * serving_suite.bytes_moved(ours) == 2 * case.kv_bytes
    assert case.shape == "2 decodes KV4096-32768 + 1x512 over 2048 H32:8 D128 page16"
    rates = serving_suite._rates(ours, 2.0)
    assert rates == pytest.approx({"gbps": case.kv_bytes / 2e-3 / 1e9, "tflops": case.flops() / 2e-3 / 1e12})


def test_inputs_are_a_shuffled_pool_read_through_the_block_table():
    from reference.paged import sequence_keys

    case = serving_suite.CPU_CHECK
    x = serving_suite.make_inputs(case, CPU)
    pages = [-(-n // case.page_size) for n in case.seqlens]
    used = torch.cat([x.block_table[b, :p] for b, p in enumerate(pages)])
    assert sorted(used.tolist()) == list(range(sum(pages))), "every page belongs to exactly one sequence"
    assert x.k_cache.shape == (sum(pages), case.heads_kv, case.page_size, case.head_dim)
    assert x.k_cache.data_ptr() == x.k_pool.data_ptr(), "the kernel reads vLLM's pool through a view"
    keys = sequence_keys(x.k_cache, 2, 0, case.seqlens[2], x.block_table)
    page = int(x.block_table[2, 1])
    assert torch.equal(keys[:, case.page_size], x.k_pool[page, 0]), "key 16 of a sequence: row 0 of its 2nd page"
    assert x.cu_seqlens_q.tolist() == [0, *torch.tensor(case.new).cumsum(0).tolist()]


# --- CPU rows: every provider against float64 -------------------------------------------------------------

@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("serving")
    assert main(["--device", "cpu", "--suite", "serving", "--out", str(out)]) == 0
    (csv_name,) = [f for f in os.listdir(out) if f.endswith(".csv")]
    with open(out / csv_name, newline="") as f:
        rows = list(csv.DictReader(f))
    return out, csv_name, rows


def test_cpu_rows_check_every_provider_against_float64(cpu_run):
    _, _, rows = cpu_run
    assert {r["provider"] for r in rows} == set(serving_suite.CHECKED)
    assert all(r["kind"] == "check" and r["time_ms"] == "" for r in rows), "nothing is timed on the CPU"
    if torch.cuda.is_available():  # kernels compiled for the GPU in this session: CPU tensors are declined
        return
    for r in rows:
        if r["provider"] == "flex-paged" and r["status"].startswith("unsupported"):
            assert "_paged_attention" in r["status"], r  # a torch without FlexAttention's paged attention
            continue
        assert r["status"] == CORRECTNESS_ONLY, r
        assert float(r["max_err"]) < 1e-5, f"{r['provider']}: max err {r['max_err']} against float64"


def test_cpu_report_says_the_gpu_figures_are_not_measured(cpu_run):
    out, csv_name, _ = cpu_run
    text = (out / csv_name.replace(".csv", ".md")).read_text()
    assert "## serving" in text and "vs sdpa" in text and "PagedAttention" in text
    summary = text[text.index("Serving steps over a paged cache"):]
    for needle in ("mixed", "one call faster: not measured", "B8 KV32768", ">= 80% of copy", "prefill",
                   "the hf suite"):
        assert needle in summary, needle
    assert not any(f.startswith("serving_") for f in os.listdir(out)), "no timed rows: no plot"


def test_flex_paged_without_torchs_paged_attention_is_a_clear_row(monkeypatch):
    from bench.sweep import run_job

    # A None entry in sys.modules makes the import fail, as on a torch that predates the module.
    monkeypatch.setitem(sys.modules, "torch.nn.attention.experimental._paged_attention", None)

    result = run_job(Job("serving", "check", "flex-paged", "fwd", serving_suite.CPU_CHECK), CPU, None)
    assert result.status == f"unsupported: no torch.nn.attention.experimental._paged_attention in torch " \
                            f"{torch.__version__}", result.status


# --- GPU-like rows (made up here, not measured): table, summary, plot ---------------------------------------

def _timed(provider, case, ms):
    job = Job("serving", "time", provider, "fwd", case)
    return Result(job, time_ms=ms, **serving_suite._rates(job, ms)).record()


def test_summary_and_plot_of_gpu_like_rows(tmp_path):
    _, cases = serving_suite.gpu_cases(torch.bfloat16, quick=True)
    mixed, decode, prefill = cases
    rows = [_timed("triton-paged", mixed, 1.0), _timed("triton-separate", mixed, 1.25), _timed("sdpa", mixed, 2.0),
            _timed("copy", decode, 1.0), _timed("triton-paged", decode, 0.625), _timed("sdpa", decode, 1.25),
            _timed("triton-paged", prefill, 0.1), _timed("sdpa", prefill, 0.2)]
    report.add_ratios(rows)
    lines = serving_suite.summary(rows).splitlines()
    mixed_line = next(line for line in lines if line.startswith("mixed"))
    assert "one call faster: 1.25x" in mixed_line and "not measured" in mixed_line  # flex-paged: not timed
    decode_line = next(line for line in lines if line.startswith("decode"))
    # The copy reads and writes the bytes decode reads once: 0.625 ms against its 1 ms is 80% of its bandwidth.
    assert f"{decode.kv_bytes / 0.625e-3 / 1e9:.0f} (80%)" in decode_line, decode_line
    assert "(40%)" in decode_line, "sdpa at 1.25 ms"
    prefill_line = next(line for line in lines if line.startswith("prefill"))
    assert f"{prefill.flops() / 0.1e-3 / 1e12:.1f}" in prefill_line
    text = report.terminal_report(rows)
    assert "== serving ==" in text and "TFLOP/s" in text and "2.00x" in text, text  # sdpa / triton-paged, mixed
    ctx = report.context(CPU)
    path = serving_suite.plot_serving(rows, ctx, str(tmp_path / "serving.png"))
    assert path and (tmp_path / "serving.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- one place to register ---------------------------------------------------------------------------------

def test_every_registered_suite_is_listed_and_offered():
    names = list(suites.ORDER)
    assert list(registry.SUITES) == names, "registered in the order bench/suites.py lists"
    assert set(suites.NAMES) == {"attention", "memory", "softmax", "modules", "overhead", *names}
    choices = next(a for a in build_parser()._actions if a.dest == "suite").choices
    assert set(choices) == set(suites.NAMES) | {"all"}
    assert registry.suite_of(serving_suite.CPU_CHECK) is registry.SUITES["serving"]
    with pytest.raises(ValueError, match="two suites"):
        registry.register(registry.Suite("serving", lambda args, device_type: [], {}, "sdpa"))
