"""bench/lowprec_suite.py on the CPU: the fp8 and MLA plans, the bytes and FLOPs behind their rates,
quantization round trips, registration, and the correctness rows (the fp8 row held to the tolerance
rule against PyTorch's same quantized computation)."""
import pytest
import torch

from bench import lowprec_suite as suite
from bench import registry, report, sweep
from bench.__main__ import build_parser
from bench.plan import Job

CPU = torch.device("cpu")


@pytest.fixture
def registered():
    """register() for the test, then the registry as it was: other bench tests run `--suite all`."""
    saved = dict(registry.SUITES)
    yield suite.register()
    registry.SUITES.clear()
    registry.SUITES.update(saved)


def _plan(device_type, *suites, quick=False):
    args = build_parser().parse_args(["--quick"] if quick else [])
    if suites:
        args.suite = list(suites)  # the parser knows only the suites wired in; these are not, yet
    return suite.build_jobs(args, device_type)


# --- plans -------------------------------------------------------------------------------------

def test_cpu_plan_is_correctness_rows_of_both_suites():
    jobs = _plan("cpu")
    assert jobs and all(j.kind == "check" and j.mode == "fwd" for j in jobs)
    assert {(j.suite, j.provider) for j in jobs} == (
        {("fp8", p) for p in suite.FP8_CPU_PROVIDERS} | {("mla", p) for p in suite.MLA_PROVIDERS})
    assert {j.suite for j in _plan("cpu", "mla")} == {"mla"}
    assert _plan("cpu", "attention") == [], "not asked for: no jobs"


def test_gpu_plan_checks_first_and_fits_an_h100():
    jobs = _plan("cuda")
    for name in suite.SUITES:
        kinds = [j.kind for j in jobs if j.suite == name]
        assert kinds == sorted(kinds), f"{name}: the checks come before the timings"
    fp8 = [j.case for j in jobs if j.suite == "fp8" and j.kind == "time"]
    assert {c.n for c in fp8} == set(suite.FP8_GPU_LENGTHS) and {c.causal for c in fp8} == {False, True}
    assert all(c.batch * c.n == suite.FP8_TOKENS and c.head_dim == 128 for c in fp8)
    mla = [j for j in jobs if j.suite == "mla" and j.kind == "time"]
    assert {j.provider for j in mla} == set(suite.MLA_PROVIDERS)
    biggest = max(j.case.bytes_read("triton-mha") for j in mla)
    assert biggest <= 11e9, f"the largest MHA cache is {biggest / 1e9:.1f} GB"
    assert len(_plan("cuda", quick=True)) < len(jobs)


# --- what the rates count -------------------------------------------------------------------------

def test_mla_bytes_per_step_are_the_caches():
    case = suite.MLADecodeCase(8, 4096)
    tokens = 8 * 4096
    assert case.latent_dim == 576 and case.qk_head_dim == 192
    assert case.bytes_read("triton-mla") == tokens * 576 * 2
    assert case.bytes_read("triton-mla-fp8") == tokens * 576
    assert case.bytes_read("triton-mha") == tokens * 128 * (192 + 128) * 2
    assert round(case.bytes_read("triton-mha") / case.bytes_read("triton-mla"), 1) == 71.1
    assert suite.rates(Job("mla", "time", "triton-mla", "fwd", case), 1.0) == {"gbps": tokens * 1152 / 1e-3 / 1e9}


def test_fp8_rows_count_the_attention_flops():
    case = suite.Fp8Case(4, 16, 16, 4096, 128, True)
    assert case.flops("fwd") == 4 * 4 * 16 * 4096 ** 2 * 128 * 0.5
    assert suite.rates(Job("fp8", "time", "triton-fp8", "fwd", case), 2.0) == {"tflops": case.flops("fwd") / 2e-3 / 1e12}


def test_summaries_put_each_provider_beside_its_baseline():
    def row(name, provider, case, ms):
        return dict(suite=name, kind="time", provider=provider, mode="fwd", shape=case.shape, status="ok",
                    time_ms=ms, **case.columns())
    mla, fp8 = suite.MLADecodeCase(1, 4096), suite.Fp8Case(1, 16, 16, 4096, 128, False)
    records = [row("mla", "triton-mha", mla, 2.0), row("mla", "triton-mla", mla, 0.5),
               row("fp8", "triton-bf16", fp8, 1.0), row("fp8", "triton-fp8", fp8, 0.5)]
    mla_lines = suite.mla_summary(records).splitlines()
    assert mla_lines[4].split() == ["triton-mla", "1", "4096", "500.0", f"{4096 * 1152 / 0.5e-3 / 1e9:.0f}", "4.00x"]
    fp8_lines = suite.fp8_summary(records).splitlines()
    assert fp8_lines[-1].split()[0] == "triton-fp8" and fp8_lines[-1].endswith("2.00x")
    assert suite.summary(records) == suite.fp8_summary(records) + "\n\n" + suite.mla_summary(records)
    assert suite.mla_summary([]) == "" == suite.fp8_summary([])


# --- quantization -----------------------------------------------------------------------------------

def test_fp8_quantization_round_trips():
    """One scale per (sequence, kv head): its amax maps to 448 exactly; every value comes back within e4m3's
    rounding (3 mantissa bits: relative 2^-4); quantizing the dequantized values again gives the same bits."""
    x = torch.randn(2, 8, 33, 16) * torch.tensor([1e-3, 1.0, 30.0, 1e3]).repeat(2)[None, :, None, None]
    x8, descale = suite.quantize_fp8(x, group=2)  # 8 query heads over 4 kv heads
    assert x8.dtype == torch.float8_e4m3fn and descale.shape == (2, 4) and descale.dtype == torch.float32
    back = suite.dequantize_fp8(x8, descale)
    assert back.abs().amax().item() == pytest.approx(x.abs().amax().item(), rel=1e-6)
    group_max = descale.repeat_interleave(2, dim=1)[:, :, None, None] * 448
    err = (back - x).abs()
    assert (err <= x.abs() * 2.0 ** -4 + group_max * 2.0 ** -9 / 448).all()  # relative, or below e4m3's smallest
    again, descale_again = suite.quantize_fp8(back, group=2)
    assert torch.equal(descale_again, descale)
    assert torch.equal(again.view(torch.uint8), x8.view(torch.uint8))


# --- registration and the rows --------------------------------------------------------------------

def test_register_adds_two_suites_with_their_baselines(registered):
    fp8, mla = registered
    assert (fp8.name, fp8.baseline, mla.name, mla.baseline) == ("fp8", "triton-bf16", "mla", "triton-mha")
    assert registry.suite_of(suite.Fp8Case(1, 2, 2, 8, 16, False)) is fp8
    assert registry.suite_of(suite.MLADecodeCase(1, 8)) is mla
    headers = [c[0] for c in report._columns("mla")]
    assert "us/step" in headers and "GB/s" in headers and "vs triton-mha" in headers


def test_cpu_rows_are_correct(registered):
    """The MLA rows (bf16 and an fp8 latent cache) and the bf16 forward, against float64 on what they were given.
    Each error is a bf16 rounding of outputs of size about 1: at most a few 2^-8."""
    for job in _plan("cpu"):
        result = sweep.run_job(job, CPU, timer=None)
        assert result.status == sweep.CORRECTNESS_ONLY, (job.provider, result.status)
        if job.provider == "triton-fp8":  # P in e4m3: at most 2x PyTorch's same quantized computation
            assert result.max_err <= 2 * (_fp8_yardstick(job.case) + 2.0 ** -8), result.max_err
        else:
            assert result.max_err < 2.0 ** -6, (job.provider, result.max_err)


def _fp8_yardstick(case):
    """reference/fp8.py's fp8_attention on the row's e4m3 inputs, against float64 on them dequantized."""
    from reference import naive_attention
    from reference.fp8 import fp8_attention

    x = suite.fp8_inputs(case, CPU, "triton-fp8")
    same = fp8_attention(x.q, x.k, x.v, case.causal, **x.descales)
    d = x.descales
    q, k, v = (suite.dequantize_fp8(t, s) for t, s in ((x.q, d["q_descale"]), (x.k, d["k_descale"]),
                                                       (x.v, d["v_descale"])))
    return sweep.max_abs_error(same, naive_attention(q.double(), k.double(), v.double(), causal=case.causal))


def test_fp8_needs_fp8_tensor_cores(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert suite.fp8_forward_support(torch.device("cuda")) == "fp8 tensor cores need sm_89 or newer; this GPU is sm_80"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert suite.fp8_forward_support(torch.device("cuda")) is None
