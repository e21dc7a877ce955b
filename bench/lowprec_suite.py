"""Low precision and latent attention: two suites, `fp8` and `mla` (`python -m bench --suite fp8 mla`).

fp8: the flash forward in fp8 against the same forward in bf16, in TFLOP/s
(FlashAttention's count, 4·B·H·N²·D, x0.5 causal: the same work, so the
ratio is the speed-up).

    triton-bf16   kernels.flash_attention on bf16 q, k, v (the baseline)
    triton-fp8    kernels.flash_attention on e4m3 q, k, v with FlashAttention-3's q_descale, k_descale,
                  v_descale, one per (sequence, kv head), bf16 output (kernels/fp8.py); "unsupported"
                  on a GPU below sm_89
    sdpa-flash    F.scaled_dot_product_attention's flash backend in bf16 (GPU only), for scale

mla: one decode step of DeepSeek-V3's attention (128 query heads, one new
token per sequence) in the absorbed form over the latent cache, against the
same model's attention as multi-head attention over per-head K and V (the
naive form: q/k head dim 192, v 128, 128 kv heads), in µs per step and GB/s:

    triton-mha       kernels.decode_attention over a paged (pages, 64, 128, 192) + (..., 128) bf16 cache
                     (the baseline)
    triton-mla       kernels.decode_attention over a paged (pages, 64, 1, 576) bf16 latent cache, q/k 576,
                     v = its first 512 columns (a view: each row read once)
    triton-mla-fp8   the same with the latent cache in e4m3 and one scale per tensor

GB/s = the bytes of cache the provider's step must read / its time: per
token, 128·(192 + 128)·2 = 80 KiB for MHA, 576·2 = 1152 B for MLA (71x
fewer), 576 for MLA in fp8. The absorbed form also multiplies each step's
query by W_UK and its output by W_UV (not timed here: two small matmuls of
the model, outside attention). Pages are 64 rows, FlashMLA's page size, and
shuffled.

On the CPU both suites are correctness rows only (the interpreter), at tiny
shapes: max abs error against float64 attention on the dequantized inputs
(for triton-fp8 mostly P's rounding to e4m3: a few 2^-7 on outputs of size 1).
GPU figures: not measured yet (no session has had a GPU).

The module is standalone: `register()` wires both suites into bench's
registry (bench/registry.py where it exists, else the sweep's and the
report's tables, with GB/s then left to `summary`).
"""
from dataclasses import dataclass

import torch

from reference.fp8 import dequantize_fp8, quantize_fp8

from . import providers, registry, report, sweep
from .flops import attention_flops
from .plan import KIB, Job, dtype_name

FP8_SUITE, MLA_SUITE = "fp8", "mla"
SUITES = (FP8_SUITE, MLA_SUITE)
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448: the largest e4m3fn value
FP8_MIN_CAPABILITY = (8, 9)  # Ada (sm_89) and Hopper (sm_90) have fp8 tensor cores
PAGE_SIZE = 64  # FlashMLA's page size; the MHA baseline uses the same


# ----------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Fp8Case:
    batch: int
    heads_q: int
    heads_kv: int
    n: int
    head_dim: int
    causal: bool
    dtype: torch.dtype = torch.bfloat16  # the output's; fp8 rows quantize q, k and v from it

    @property
    def shape(self):
        heads = str(self.heads_q) if self.heads_q == self.heads_kv else f"{self.heads_q}:{self.heads_kv}"
        return f"B{self.batch} H{heads} N{self.n} D{self.head_dim}" + (" causal" if self.causal else "")

    def columns(self):
        return dict(dtype=dtype_name(self.dtype), batch=self.batch, heads_q=self.heads_q, heads_kv=self.heads_kv,
                    n=self.n, head_dim=self.head_dim, causal=self.causal)

    def flops(self, mode):
        return attention_flops(self.batch, self.heads_q, self.n, self.n, self.head_dim, self.causal, mode)


@dataclass(frozen=True)
class MLADecodeCase:
    """One decode step of an MLA model: `batch` sequences of `n` cached tokens each."""

    batch: int
    n: int
    heads: int = 128
    kv_lora_rank: int = 512
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    dtype: torch.dtype = torch.bfloat16

    @property
    def latent_dim(self):
        return self.kv_lora_rank + self.qk_rope_head_dim  # 576: the absorbed q/k head dim

    @property
    def qk_head_dim(self):
        return self.qk_nope_head_dim + self.qk_rope_head_dim  # 192: the naive form's

    @property
    def shape(self):
        return (f"B{self.batch} KV{self.n} H{self.heads} latent {self.kv_lora_rank}+{self.qk_rope_head_dim} "
                f"| MHA {self.qk_head_dim}/{self.v_head_dim}")

    def columns(self):
        return dict(dtype=dtype_name(self.dtype), batch=self.batch, heads_q=self.heads, heads_kv=1, n=self.n,
                    head_dim=self.latent_dim, causal=True)

    def bytes_read(self, provider):
        """Bytes of cache one step must read: every cached row of every sequence, once."""
        tokens = self.batch * self.n
        if provider == "triton-mha":
            return tokens * self.heads * (self.qk_head_dim + self.v_head_dim) * 2  # bf16 K and V per head
        return tokens * self.latent_dim * (1 if provider == "triton-mla-fp8" else 2)


# ----------------------------------------------------------------------------
# fp8 inputs and providers
# ----------------------------------------------------------------------------
def fp8_forward_support(device):
    """None if the fp8 forward runs here, else the reason it does not (a GPU without fp8 tensor cores)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < FP8_MIN_CAPABILITY:
        major, minor = torch.cuda.get_device_capability(device)
        return f"fp8 tensor cores need sm_89 or newer; this GPU is sm_{major}{minor}"
    return None


@dataclass
class Fp8Inputs:
    q: torch.Tensor  # (B, Hq, N, D): bf16, or e4m3 for triton-fp8
    k: torch.Tensor
    v: torch.Tensor
    descales: dict  # {} or q_descale, k_descale, v_descale (B, Hkv) fp32


def fp8_inputs(case, device, provider, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(case.batch, h, case.n, case.head_dim, generator=gen, device=device, dtype=case.dtype)
               for h in (case.heads_q, case.heads_kv, case.heads_kv))
    if provider != "triton-fp8":
        return Fp8Inputs(q, k, v, {})
    (q8, qd), (k8, kd), (v8, vd) = (quantize_fp8(t, FP8, group) for t, group in
                                    ((q, case.heads_q // case.heads_kv), (k, 1), (v, 1)))
    return Fp8Inputs(q8, k8, v8, dict(q_descale=qd, k_descale=kd, v_descale=vd))


def _fp8_call(provider, inputs, causal):
    if provider == "sdpa-flash":
        return providers.ATTENTION["sdpa-flash"](inputs.q, inputs.k, inputs.v, causal)
    providers._require_triton_runnable(inputs.q)
    if provider == "triton-fp8":
        reason = fp8_forward_support(inputs.q.device)
        if reason:
            raise providers.Unsupported(reason)
    from kernels import flash_attention

    return lambda: flash_attention(inputs.q, inputs.k, inputs.v, causal=causal, **inputs.descales)


def _fp8_build(job, device):
    inputs = fp8_inputs(job.case, device, job.provider)
    return sweep.mode_call(_fp8_call(job.provider, inputs, job.case.causal), "fwd", [])


def _fp8_check(job, device):
    """Max abs error against float64 attention on the inputs the provider was given, dequantized."""
    from reference import naive_attention

    inputs = fp8_inputs(job.case, device, job.provider)
    with torch.no_grad():
        out = _fp8_call(job.provider, inputs, job.case.causal)()
    if inputs.descales:
        d = inputs.descales
        q, k, v = (dequantize_fp8(t, s) for t, s in ((inputs.q, d["q_descale"]), (inputs.k, d["k_descale"]),
                                                      (inputs.v, d["v_descale"])))
    else:
        q, k, v = inputs.q, inputs.k, inputs.v
    expected = naive_attention(q.double(), k.double(), v.double(), causal=job.case.causal)
    return sweep.max_abs_error(out, expected)


# ----------------------------------------------------------------------------
# MLA decode inputs and providers
# ----------------------------------------------------------------------------
@dataclass
class DecodeInputs:
    q: torch.Tensor  # (B, H, 1, 576) absorbed, or (B, H, 1, 192) MHA
    k: torch.Tensor  # paged pool view (pages, Hkv, PAGE_SIZE, D)
    v: torch.Tensor  # MLA: k[..., :512]; MHA: its own pool
    seqlens: torch.Tensor  # (B,) int32
    block_table: torch.Tensor  # (B, pages per sequence) int32, shuffled
    sm_scale: float  # 1/sqrt(192) in both forms
    scales: dict  # {} or k_scale, v_scale (1,) fp32 for the fp8 latent cache


def decode_inputs(case, device, provider, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape):
        return torch.randn(shape, generator=gen, device=device, dtype=case.dtype)

    pages_per_seq = -(-case.n // PAGE_SIZE)
    num_pages = case.batch * pages_per_seq
    table = torch.randperm(num_pages, generator=gen, device=device).to(torch.int32).view(case.batch, pages_per_seq)
    seqlens = torch.full((case.batch,), case.n, dtype=torch.int32, device=device)
    sm_scale = case.qk_head_dim ** -0.5
    if provider == "triton-mha":
        # vLLM's pool layout (pages, page, Hkv, D), read through its (pages, Hkv, page, D) view
        k = rand(num_pages, PAGE_SIZE, case.heads, case.qk_head_dim).permute(0, 2, 1, 3)
        v = rand(num_pages, PAGE_SIZE, case.heads, case.v_head_dim).permute(0, 2, 1, 3)
        return DecodeInputs(rand(case.batch, case.heads, 1, case.qk_head_dim), k, v, seqlens, table, sm_scale, {})
    latent = rand(num_pages, PAGE_SIZE, 1, case.latent_dim).permute(0, 2, 1, 3)  # (pages, 1, page, 576)
    scales = {}
    if provider == "triton-mla-fp8":
        scale = (latent.float().abs().amax() / FP8_MAX).reshape(1)  # one scale for the tensor (vLLM's default)
        latent = (latent.float() / scale).to(FP8)
        scales = dict(k_scale=scale, v_scale=scale)  # k and v are the same rows: one scale
    q = rand(case.batch, case.heads, 1, case.latent_dim)
    return DecodeInputs(q, latent, latent[..., :case.kv_lora_rank], seqlens, table, sm_scale, scales)


def _decode_call(inputs):
    from kernels import decode_attention

    providers._require_triton_runnable(inputs.q)
    return lambda: decode_attention(inputs.q, inputs.k, inputs.v, inputs.seqlens, inputs.block_table,
                                    sm_scale=inputs.sm_scale, **inputs.scales)


def _mla_build(job, device):
    return sweep.mode_call(_decode_call(decode_inputs(job.case, device, job.provider)), "fwd", [])


def _mla_check(job, device):
    """Max abs error against reference/paged.py in float64 (an fp8 cache dequantized by its scale)."""
    from reference.paged import paged_attention

    inputs = decode_inputs(job.case, device, job.provider)
    with torch.no_grad():
        out = _decode_call(inputs)()
    expected = paged_attention(inputs.q, inputs.k, inputs.v, inputs.seqlens, inputs.block_table,
                               sm_scale=inputs.sm_scale, dtype=torch.float64, **inputs.scales)
    return sweep.max_abs_error(out, expected)


# ----------------------------------------------------------------------------
# Plans
# ----------------------------------------------------------------------------
FP8_PROVIDERS = ("triton-bf16", "triton-fp8", "sdpa-flash")
FP8_CPU_PROVIDERS = ("triton-bf16", "triton-fp8")
MLA_PROVIDERS = ("triton-mha", "triton-mla", "triton-mla-fp8")
FP8_GPU_LENGTHS = (KIB, 2 * KIB, 4 * KIB, 8 * KIB, 16 * KIB)  # 16k tokens per batch: B = 16k / N
FP8_GPU_QUICK = (4 * KIB, 16 * KIB)
FP8_TOKENS = 16 * KIB
# (batch, cached tokens): MHA's cache at (64, 2k) is 10.7 GB, the largest here; the latent one is 71x smaller.
MLA_GPU_SHAPES = ((1, 4 * KIB), (1, 32 * KIB), (8, 4 * KIB), (8, 16 * KIB), (64, 2 * KIB))
MLA_GPU_QUICK = ((1, 4 * KIB), (8, 16 * KIB))
# The CPU's tiny cases: a ragged last tile, GQA 2, head dim 64; 16 heads over 77 cached tokens (two pages).
FP8_CPU_CHECK = Fp8Case(1, 4, 2, 67, 64, True)
MLA_CPU_CHECK = MLADecodeCase(2, 77, heads=16)


def _asked(args, suite):
    return "all" in args.suite or suite in args.suite


def build_jobs(args, device_type):
    """Both suites' jobs (each only when --suite names it, or all): checks first, then timings on a GPU."""
    jobs = []
    if _asked(args, FP8_SUITE):
        if device_type == "cpu":
            jobs += [Job(FP8_SUITE, "check", p, "fwd", FP8_CPU_CHECK) for p in FP8_CPU_PROVIDERS]
        else:
            jobs += [Job(FP8_SUITE, "check", p, "fwd", Fp8Case(2, 16, 16, 1000, 128, causal))
                     for causal in (False, True) for p in FP8_PROVIDERS]
            for causal in (False, True):
                for n in FP8_GPU_QUICK if args.quick else FP8_GPU_LENGTHS:
                    case = Fp8Case(max(1, FP8_TOKENS // n), 16, 16, n, 128, causal)
                    jobs += [Job(FP8_SUITE, "time", p, "fwd", case) for p in FP8_PROVIDERS]
    if _asked(args, MLA_SUITE):
        if device_type == "cpu":
            jobs += [Job(MLA_SUITE, "check", p, "fwd", MLA_CPU_CHECK) for p in MLA_PROVIDERS]
        else:
            jobs += [Job(MLA_SUITE, "check", p, "fwd", MLADecodeCase(2, 4 * KIB + 3)) for p in MLA_PROVIDERS]
            for batch, n in MLA_GPU_QUICK if args.quick else MLA_GPU_SHAPES:
                jobs += [Job(MLA_SUITE, "time", p, "fwd", MLADecodeCase(batch, n)) for p in MLA_PROVIDERS]
    return jobs


def fp8_jobs(args, device_type):
    return [j for j in build_jobs(args, device_type) if j.suite == FP8_SUITE]


def mla_jobs(args, device_type):
    return [j for j in build_jobs(args, device_type) if j.suite == MLA_SUITE]


# ----------------------------------------------------------------------------
# Rates, the summary, registration
# ----------------------------------------------------------------------------
def rates(job, time_ms):
    """fp8: TFLOP/s of the attention's work; mla: GB/s of the cache each provider reads."""
    if isinstance(job.case, MLADecodeCase):
        return {"gbps": job.case.bytes_read(job.provider) / (time_ms * 1e-3) / 1e9}
    return {"tflops": job.case.flops(job.mode) / (time_ms * 1e-3) / 1e12}


def _timed(records, suite):
    return [r for r in records if r["suite"] == suite and r["kind"] == "time" and r.get("time_ms")]


def mla_summary(records):
    """µs per step and GB/s of each MLA provider at each shape, and its speed-up over MHA ("" without rows)."""
    timed = _timed(records, MLA_SUITE)
    base = {r["shape"]: r["time_ms"] for r in timed if r["provider"] == "triton-mha"}
    rows = []
    for r in timed:
        case = MLADecodeCase(int(r["batch"]), int(r["n"]), heads=int(r["heads_q"]))
        gbps = case.bytes_read(r["provider"]) / (r["time_ms"] * 1e-3) / 1e9
        speedup = f"{base[r['shape']] / r['time_ms']:.2f}x" if r["shape"] in base else ""
        rows.append([r["provider"], f"{r['batch']:g}", f"{r['n']:g}", f"{1e3 * r['time_ms']:.1f}", f"{gbps:.0f}",
                     speedup])
    if not rows:
        return ""
    return ("MLA decode (DeepSeek-V3 dims) against MHA of the same model\n"
            + report.text_table(["provider", "B", "KV", "us/step", "GB/s", "vs triton-mha"], rows))


def fp8_summary(records):
    """TFLOP/s of each fp8-suite row and its speed-up over the bf16 forward ("" without rows)."""
    timed = _timed(records, FP8_SUITE)
    base = {r["shape"]: r["time_ms"] for r in timed if r["provider"] == "triton-bf16"}
    rows = []
    for r in timed:
        case = Fp8Case(int(r["batch"]), int(r["heads_q"]), int(r["heads_kv"]), int(r["n"]), int(r["head_dim"]),
                       r["causal"] in (True, "True", "true", 1))
        tflops = case.flops("fwd") / (r["time_ms"] * 1e-3) / 1e12
        speedup = f"{base[r['shape']] / r['time_ms']:.2f}x" if r["shape"] in base else ""
        rows.append([r["provider"], r["shape"], f"{r['time_ms']:.3f}", f"{tflops:.0f}", speedup])
    if not rows:
        return ""
    return "fp8 forward against bf16\n" + report.text_table(["provider", "shape", "ms", "TFLOP/s", "vs triton-bf16"],
                                                             rows)


def summary(records):
    """Both suites' summaries, for a caller that prints one text."""
    return "\n\n".join(text for text in (fp8_summary(records), mla_summary(records)) if text)


NOTES = {
    FP8_SUITE: "The flash forward with e4m3 q, k, v (FlashAttention-3's descales, bf16 out) against bf16; "
               "FLOPs by FlashAttention's convention, the same for both.",
    MLA_SUITE: "One decode step of DeepSeek-V3's attention: absorbed MLA over the latent cache (576 = 512 + 64, "
               "v a view) against MHA over per-head K/V (192/128); GB/s counts the bytes each cache holds.",
}


def _decode_columns(base):
    us = lambda v: "" if v is None else (v if isinstance(v, str) else f"{v * 1e3:.1f}")  # noqa: E731
    gbps = lambda v: "" if v is None else (v if isinstance(v, str) else f"{v:.1f}")  # noqa: E731
    ratio = lambda v: "" if v is None else f"{v:.2f}x"  # noqa: E731
    return [("us/step", "time_ms", us), ("GB/s", "gbps", gbps), (f"vs {base}", "ratio", ratio)]


def register():
    """Wire the fp8 and mla suites into `python -m bench` (bench/suites.py calls this once). Returns their Suites."""
    return [registry.register(registry.Suite(FP8_SUITE, fp8_jobs, {Fp8Case: (_fp8_build, _fp8_check)},
                                             baseline="triton-bf16", rates=rates, summary=fp8_summary,
                                             note=NOTES[FP8_SUITE])),
            registry.register(registry.Suite(MLA_SUITE, mla_jobs, {MLADecodeCase: (_mla_build, _mla_check)},
                                             baseline="triton-mha", columns=_decode_columns, rates=rates,
                                             summary=mla_summary, note=NOTES[MLA_SUITE]))]
