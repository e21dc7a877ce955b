"""The kernels compile for the GPUs the launcher serves, and kernels/footprints.json tells the truth about them.

The launcher runs a config on a chip only if kernels/footprints.json says it
fits there (kernels/configs.py); the file is written by compiling every
candidate for every chip (`python -m tests.gpu_compile --write-footprints`,
about 35 minutes on two cores per Triton version). Two kinds of test:

- Fast, no compiling: the file covers every candidate on every chip (or the
  candidate is in NOT_MEASURED, with the reason), every kernel, precision
  and head-dim class has a config that fits every chip (or the gap is in
  NOTHING_FITS, with the reason), and the known all-spilling cases
  (EVERY_CANDIDATE_SPILLS) are exactly those.
- Slow, a representative slice compiled with Triton's bundled ptxas: the
  configs the launcher picks by default for bf16 at head dim 128 on sm_80,
  sm_86, sm_90, sm_100 and sm_120, compiled plain and (sm_80, sm_86, sm_90)
  with every variant switch on, the head-dim-256 forward and dQ on sm_86,
  the fp8 forward on sm_89 and sm_90, MLA's paged decode (576/512) on sm_90
  and (plain) sm_86, the forward's Hopper options and the helper kernels on sm_90.
  Each compiles, needs no more shared memory than the file records (the file
  is not stale) nor than the chip has, 16-bit at head dim 128 does not spill
  on sm_80 and sm_90 in its plain compile (beyond configs.SPILL_TOLERANCE_BYTES), the fp8 forward multiplies on fp8
  tensor cores (wgmma on sm_90, mma.sync on sm_89) without spilling, and the
  sm_90 code is what we expect: pipelined loads, wgmma, TMA copies and warp
  specialization where asked for.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import configs

ROOT = Path(__file__).resolve().parent.parent
PRECISION_DTYPES = {"16-bit": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64,
                    "fp8": torch.float8_e4m3fn}
FP8_ARCHS = ("sm_89", "sm_90", "sm_100", "sm_120")  # the launcher refuses fp8 below sm_89 (kernels/fp8.py)

# Candidates with no footprint on a chip, each with the reason: (arch, footprint key) -> why.
# kernels/footprints.json lists them under "failed", so the launcher never offers them there.
NOT_MEASURED = {
    ("sm_90", "fwd fp8 d128 M128 N128 w4 s3 tma ws"):
        "the Hopper lowering of Triton 3.6 and 3.9 stops at the fp8 wgmma of a warp-specialized loop ('WGMMA type "
        "or shape is not supported'); the same config compiles on sm_100, and without warp specialization on sm_90",
}

# (arch, kernel, precision, head-dim class) where no candidate fits: -> why.
_FP64_D256 = ("float64 at head dim 256: even 16 x 16 tiles need more shared memory than the chip has (dK/dV "
              "130-192 KB, dQ 128 KB); the launcher refuses float64 above head dim 128 on a GPU anyway")
NOTHING_FITS = {
    ("sm_80", "bwd_dkdv", "fp64", 256): _FP64_D256,
    **{(arch, kernel, "fp64", 256): _FP64_D256 for arch in ("sm_86", "sm_89", "sm_120")
       for kernel in ("bwd_dkdv", "bwd_dq")},
}

# (arch, kernel) whose 16-bit head-dim-128 candidates all spill in their plain compile (kernels/footprints.json,
# the maximum over the Triton versions), so their default config spills too: -> why. None since the smaller
# dK/dV and dQ tiles (M16 N32 w8 s2 and friends) joined the lists; the test below keeps this honest.
EVERY_CANDIDATE_SPILLS = {}


def candidates(arch):
    """(kernel, precision, class, config) of every candidate `arch` may run (descriptor loads only with TMA)."""
    chip = configs.CHIPS[arch]
    for kernel, kernel_configs in configs.KERNELS.items():
        for (precision, head_dim_class), configs_of_class in kernel_configs.candidates.items():
            if precision == "fp8" and arch not in FP8_ARCHS:
                continue
            for config in configs_of_class:
                if chip.has_tma or not config.kwargs.get("USE_TMA"):
                    yield kernel, precision, head_dim_class, config


def test_footprints_cover_every_candidate_on_every_chip():
    measured = configs.footprints()
    missing = [f"{arch} {configs.footprint_key(kernel, precision, head_dim_class, config)}"
               for arch in configs.CHIPS for kernel, precision, head_dim_class, config in candidates(arch)
               if configs.footprint_key(kernel, precision, head_dim_class, config) not in measured.get(arch, {})
               and (arch, configs.footprint_key(kernel, precision, head_dim_class, config)) not in NOT_MEASURED]
    assert not missing, ("candidates with no footprint in kernels/footprints.json (run python -m tests.gpu_compile "
                         "--write-footprints, or add them to NOT_MEASURED with the reason):\n" + "\n".join(missing))
    stale = [f"{arch} {key}" for arch, key in NOT_MEASURED if key in measured.get(arch, {})]
    assert not stale, "NOT_MEASURED lists candidates the file now measures:\n" + "\n".join(stale)


def test_every_kernel_has_a_fitting_config_on_every_chip():
    gaps, stale = [], []
    for arch, chip in configs.CHIPS.items():
        for kernel, kernel_configs in configs.KERNELS.items():
            for precision, head_dim_class in kernel_configs.candidates:
                if precision == "fp8" and arch not in FP8_ARCHS:
                    continue
                fits = kernel_configs.fitting(chip, PRECISION_DTYPES[precision], head_dim_class)
                where = (arch, kernel, precision, head_dim_class)
                if not fits and where not in NOTHING_FITS:
                    gaps.append(" ".join(map(str, where)))
                if fits and where in NOTHING_FITS:
                    stale.append(" ".join(map(str, where)))
    assert not gaps, "no candidate fits (arch, kernel, precision, head-dim class):\n" + "\n".join(gaps)
    assert not stale, "NOTHING_FITS lists cases that now have a fitting config:\n" + "\n".join(stale)


def test_every_candidate_spills_is_exactly_the_spilling_cases():
    """16-bit at head dim 128, the common case: every attention kernel on every chip has a fitting config whose
    plain compile does not spill, except the cases EVERY_CANDIDATE_SPILLS names (an entry goes when a spill-free
    candidate arrives; then the slice holds the default to it). Spill-free: at most configs.SPILL_TOLERANCE_BYTES."""
    wrong = []
    for arch, chip in configs.CHIPS.items():
        measured = configs.footprints()[arch]
        for kernel in ("fwd", "bwd_dkdv", "bwd_dq", "paged"):
            clean = [configs.config_label(config)
                     for config in configs.KERNELS[kernel].fitting(chip, torch.bfloat16, 128)
                     if measured[configs.footprint_key(kernel, "16-bit", 128, config)][1]
                     <= configs.SPILL_TOLERANCE_BYTES]
            if bool(clean) == ((arch, kernel) in EVERY_CANDIDATE_SPILLS):
                wrong.append(f"{arch} {kernel}: spill-free fitting configs {clean}")
    assert not wrong, "EVERY_CANDIDATE_SPILLS disagrees with kernels/footprints.json:\n" + "\n".join(wrong)


# ----------------------------------------------------------------------------
# The compiled slice
# ----------------------------------------------------------------------------
DEFAULT_ARCHS = ("sm_80", "sm_86", "sm_90", "sm_100", "sm_120")
VARIANT_ARCHS = ("sm_80", "sm_86", "sm_90")  # A100, the 99 KB consumer chips, H100: every switch on
ATTENTION_KERNELS = ("fwd", "bwd_dkdv", "bwd_dq", "paged")
HELPERS = ("bwd_preprocess", "softmax", "paged_merge", "paged_merge d512", "dropout_mask")


def default_job(arch, kernel, head_dim_class=128, variant="plain", precision="16-bit"):
    """The job name of the config the launcher picks by default for this precision and head-dim class."""
    config = configs.KERNELS[kernel].fitting(configs.CHIPS[arch], PRECISION_DTYPES[precision], head_dim_class,
                                             variants=variant == "variants")[0]
    return f"{arch} {configs.footprint_key(kernel, precision, head_dim_class, config)} {variant}"


def hopper_option_jobs():
    """The first descriptor-load config and the first warp-specialized one the launcher may pick on sm_90."""
    fitting = configs.KERNELS["fwd"].fitting(configs.CHIPS["sm_90"], torch.bfloat16, 128, tma=True,
                                             warp_specialize=True)
    tma = next(c for c in fitting if c.kwargs.get("USE_TMA") and not c.kwargs.get("WARP_SPECIALIZE"))
    ws = next(c for c in fitting if c.kwargs.get("WARP_SPECIALIZE"))
    return [f"sm_90 {configs.footprint_key('fwd', '16-bit', 128, config)} plain" for config in (tma, ws)]


def slice_jobs():
    jobs = [default_job(arch, kernel) for arch in DEFAULT_ARCHS for kernel in ATTENTION_KERNELS]
    jobs += [default_job("sm_86", kernel, 256) for kernel in ("fwd", "bwd_dq")]
    jobs += [default_job(arch, "fwd", precision="fp8") for arch in ("sm_89", "sm_90")]
    # MLA's decode with every switch on only on sm_90: before sm_89 its fp8 cache is read as bytes and decoded
    # in software, which ptxas takes 2-3 minutes to compile at head dim 576 (the full matrix has it).
    jobs += [default_job("sm_86", "paged", 576)] + [default_job("sm_90", "paged", 576, variant)
                                                     for variant in ("plain", "variants")]
    jobs += [default_job(arch, kernel, variant="variants") for arch in VARIANT_ARCHS for kernel in ATTENTION_KERNELS]
    jobs += hopper_option_jobs()
    jobs += [f"sm_90 {helper}" for helper in HELPERS]
    return list(dict.fromkeys(jobs))


@pytest.fixture(scope="module")
def compiled():
    jobs = slice_jobs()
    archs = sorted({job.split()[0] for job in jobs})
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "tests.gpu_compile", "--workers", "2", "--arch", *archs,
                          "--jobs", *jobs], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"python -m tests.gpu_compile failed:\n{run.stderr[-3000:]}"
    rows = {row["job"]: row for row in map(json.loads, run.stdout.splitlines())}
    assert rows.keys() == set(jobs), f"jobs without a row: {set(jobs) - rows.keys()}"
    return rows


def attention_rows(compiled, arch=None):
    return [row for row in compiled.values() if "footprint_key" in row and arch in (None, row["arch"])]


@pytest.mark.slow
def test_every_job_compiles(compiled):
    failed = [f"{job}: {row['error']}" for job, row in compiled.items() if "error" in row]
    assert not failed, "jobs that do not compile:\n" + "\n".join(failed)


@pytest.mark.slow
def test_shared_memory_within_footprint_and_chip(compiled):
    """The file is not stale (a kernel change that grew a footprint needs --write-footprints), and the config fits."""
    measured = configs.footprints()
    problems = []
    for row in compiled.values():
        if "error" in row:
            continue
        limit = configs.CHIPS[row["arch"]].shared_bytes
        if row["shared_bytes"] > limit:
            problems.append(f"{row['job']}: {row['shared_bytes']} B of shared memory, the chip has {limit} B")
        if "footprint_key" in row:
            recorded = measured.get(row["arch"], {}).get(row["footprint_key"])
            spills = recorded[1 if row["variant"] == "plain" else 2] if recorded else None
            if recorded is None or row["shared_bytes"] > recorded[0] or row["spill_stores"] > spills:
                problems.append(f"{row['job']}: measured {row['shared_bytes']} B shared, {row['spill_stores']} B "
                                f"spill stores; kernels/footprints.json records {recorded}")
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_16_bit_head_dim_128_does_not_spill_on_a100_and_h100(compiled):
    spilling = [f"{row['job']}: {row['spill_stores']} B spill stores, {row['registers']} registers"
                for row in attention_rows(compiled)
                if row["arch"] in ("sm_80", "sm_90") and row["precision"] == "16-bit" and row["head_dim"] <= 128
                and row["variant"] == "plain" and row["spill_stores"] > configs.SPILL_TOLERANCE_BYTES
                and (row["arch"], row["kernel"]) not in EVERY_CANDIDATE_SPILLS]
    assert not spilling, "configs that spill registers:\n" + "\n".join(spilling)


@pytest.mark.slow
def test_sm90_loads_are_pipelined_and_products_use_wgmma(compiled):
    """Every multi-stage pointer-path config pipelines its loads (cp.async); wgmma whenever the resident tile has
    >= 64 rows.

    wgmma multiplies a 64-row operand per warp group: the forward, dQ and
    decode keep the query tile (BLOCK_M rows) as that operand, dK/dV the key
    tile (BLOCK_N). The paged decode compile shows loads through the block
    table pipeline too.
    """
    for row in attention_rows(compiled, "sm_90"):
        if row["stages"] > 1 and not row["options"].get("USE_TMA"):
            assert row["async_copies"] > 0, f"{row['job']}: K/V loads are not pipelined: {row}"
        resident_rows = row["block_n"] if row["kernel"] == "bwd_dkdv" else row["block_m"]
        if resident_rows >= 64:
            assert row["wgmma"] > 0, f"{row['job']}: no Hopper warp-group MMA: {row}"


@pytest.mark.slow
def test_sm90_descriptor_configs_load_with_tma_and_warp_specialize(compiled):
    """USE_TMA: every Q, K and V load is a TMA copy, no cp.async is left. WARP_SPECIALIZE: the kernel is split into
    partitions (a ttg.warp_specialize op: a producer issuing the copies, consumers doing the math); without it, none.
    """
    rows = [row for row in attention_rows(compiled, "sm_90") if row["options"].get("USE_TMA")]
    assert {row["options"].get("WARP_SPECIALIZE", False) for row in rows} == {False, True}, [r["job"] for r in rows]
    for row in rows:
        assert row["tma_loads"] > 0 and row["async_copies"] == 0, f"{row['job']}: loads are not all TMA: {row}"
        ws = row["options"].get("WARP_SPECIALIZE", False)
        assert row["warp_specialized"] == ws, f"{row['job']}: warp specialization {'missing' if ws else 'unasked'}"
    for row in attention_rows(compiled, "sm_90"):
        if not row["options"].get("USE_TMA"):
            assert row["tma_loads"] == 0 and not row["warp_specialized"], f"{row['job']}: {row}"


@pytest.mark.slow
def test_sm90_helper_kernels_do_not_spill(compiled):
    spilling = [f"sm_90 {helper}: {compiled[f'sm_90 {helper}']}" for helper in HELPERS
                if compiled[f"sm_90 {helper}"].get("spill_stores", 0)]
    assert not spilling, "helper kernels that spill registers:\n" + "\n".join(spilling)


@pytest.mark.slow
def test_fp8_forward_multiplies_on_fp8_tensor_cores_without_spilling(compiled):
    """Issue 19: q.k and P.V of the fp8 forward are fp8 MMAs (Hopper's wgmma, Ada's mma.sync ...e4m3.e4m3)."""
    rows = [row for row in attention_rows(compiled) if row["precision"] == "fp8"]
    assert {row["arch"] for row in rows} == {"sm_89", "sm_90"}, [row["job"] for row in rows]
    for row in rows:
        assert row["fp8_mma"] > 0, f"{row['job']}: no fp8 tensor-core instruction: {row}"
        assert row["spill_stores"] == 0, f"{row['job']}: spills {row['spill_stores']} B"
        if row["arch"] == "sm_90":
            assert row["wgmma"] > 0, f"{row['job']}: not on wgmma: {row}"


@pytest.mark.slow
def test_mla_decode_fits_and_keeps_its_accumulator_in_registers(compiled):
    """MLA's absorbed decode (q/k 576 = 512 + 64, v 512 a view of k) fits a 99 KB chip and an H100 without spills."""
    rows = [row for row in attention_rows(compiled) if row["kernel"] == "paged" and row["head_dim"] == 576]
    assert {row["arch"] for row in rows} == {"sm_86", "sm_90"}, [row["job"] for row in rows]
    for row in rows:
        assert row["shared_bytes"] <= configs.CHIPS[row["arch"]].shared_bytes
        assert row["spill_stores"] == 0, f"{row['job']}: spills {row['spill_stores']} B"


@pytest.mark.slow
def test_fused_dq_adds_with_relaxed_atomics(compiled):
    """deterministic=False adds dQ with atomics in the dK/dV kernel: relaxed ones, since a sum needs no ordering
    (Triton's default, acq_rel, fences every add)."""
    rows = [row for row in attention_rows(compiled) if row["kernel"] == "bwd_dkdv" and row["variant"] == "variants"]
    assert rows
    for row in rows:
        assert row["atomic_adds"] > 0, f"{row['job']}: no atomic add of dQ: {row}"
        assert row["ordered_atomic_adds"] == 0, f"{row['job']}: {row['ordered_atomic_adds']} ordered atomic adds"
