"""The kernels compile for an H100 (sm_90) even on a CPU-only machine, with the code we expect.

The interpreter proves the arithmetic; this proves, for every config the
autotuner may pick (tests/hopper_compile.py, VARIANTS), that the GPU compiler
accepts it, that it fits in shared memory, that it does not spill registers,
and for fp16/bf16 that the key/value loads are software-pipelined
(asynchronous copies into shared memory) and the matrix products use
Hopper's wgmma; for the forward's Hopper options, that its loads are TMA
copies and its key loop is warp-specialized. One subprocess compiles
everything, two configs at a time: 49 configs and 5 helper kernels, 56 s of
CPU with an empty Triton cache (39 s of wall time on a two-core machine,
89 s measured once when it was busy); seconds when cached.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
H100_SHARED_MEMORY_BYTES = 227 * 1024  # per block, opt-in maximum
# Spill stores allowed, in bytes per thread: none at head dim <= 128; a few bytes at 256, where even
# the smallest fp32 dK/dV tile spills 24-36 B (fp32 is not the speed path). fp64 at d256 is refused
# on a GPU and not compiled.
SPILL_LIMITS = {("16-bit", 128): 0, ("16-bit", 256): 16, ("fp32", 128): 0, ("fp32", 256): 64}


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "tests.hopper_compile", "--workers", "2"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"compiling for sm_90 failed:\n{run.stderr[-3000:]}"
    return {row["job"]: row for row in map(json.loads, run.stdout.splitlines())}


def attention_rows(compiled):
    rows = [row for row in compiled.values() if "block_m" in row]
    assert rows, "no attention config was compiled"
    return rows


def precision(row):
    return "16-bit" if row["dtype"] in ("fp16", "bf16") else row["dtype"]


def spill_limit(row):
    return SPILL_LIMITS[precision(row), 128 if row["head_dim"] <= 128 else 256]


@pytest.mark.slow
def test_every_autotune_config_fits_in_shared_memory(compiled):
    too_big = [row for row in attention_rows(compiled) if row["shared_bytes"] > H100_SHARED_MEMORY_BYTES]
    assert not too_big, f"configs that do not fit in {H100_SHARED_MEMORY_BYTES} B of shared memory: {too_big}"


@pytest.mark.slow
def test_no_autotune_config_spills_registers(compiled):
    spilling = [f"{row['job']}: {row['spill_stores']} B spill stores (limit {spill_limit(row)} B), "
                f"{row['registers']} registers"
                for row in attention_rows(compiled) if row["spill_stores"] > spill_limit(row)]
    assert not spilling, "configs that spill registers:\n" + "\n".join(spilling)


@pytest.mark.slow
def test_16_bit_configs_are_pipelined_and_use_wgmma(compiled):
    """Every multi-stage config pipelines its loads; wgmma whenever the resident tile has >= 64 rows.

    wgmma multiplies a 64-row operand per warp group: the forward and dQ keep
    the query tile (BLOCK_M rows) as that operand, dK/dV the key tile (BLOCK_N).
    Descriptor-load configs copy with TMA instead of cp.async (next test).
    """
    for row in attention_rows(compiled):
        if precision(row) != "16-bit":
            continue
        if row["stages"] > 1 and not row["options"].get("USE_TMA"):
            assert row["async_copies"] > 0, f"{row['job']}: K/V loads are not pipelined: {row}"
        resident_rows = row["block_n"] if row["kernel"] == "bwd_dkdv" else row["block_m"]
        if resident_rows >= 64:
            assert row["wgmma"] > 0, f"{row['job']}: no Hopper warp-group MMA: {row}"


@pytest.mark.slow
def test_descriptor_configs_load_with_tma_and_warp_specialize(compiled):
    """The forward's Hopper options do what they are for in the code the compiler makes.

    USE_TMA: every Q, K and V load is a TMA copy (ttng.async_tma_copy_global_to_local),
    no cp.async is left. WARP_SPECIALIZE: the kernel is split into partitions
    (a ttg.warp_specialize op: a producer issuing the copies, consumers doing
    the math); without it, no partition. Shared memory and spills are held to
    the same limits as every config, by the tests above.
    """
    rows = [row for row in attention_rows(compiled) if row["options"].get("USE_TMA")]
    assert any(row["options"].get("WARP_SPECIALIZE") for row in rows), "no warp-specialized config was compiled"
    assert any(not row["options"].get("WARP_SPECIALIZE") for row in rows), "no descriptor-load config was compiled"
    for row in rows:
        assert row["kernel"] == "fwd", f"{row['job']}: only the forward has descriptor loads"
        assert row["tma_loads"] > 0 and row["async_copies"] == 0, f"{row['job']}: loads are not all TMA: {row}"
        ws = row["options"].get("WARP_SPECIALIZE", False)
        assert row["warp_specialized"] == ws, f"{row['job']}: warp specialization {'missing' if ws else 'unasked'}"
    for row in attention_rows(compiled):
        if not row["options"].get("USE_TMA"):
            assert row["tma_loads"] == 0 and not row["warp_specialized"], f"{row['job']}: {row}"


@pytest.mark.slow
def test_helper_kernels_compile(compiled):
    assert {"bwd_preprocess d128", "softmax"} <= compiled.keys()
    for name in ("bwd_preprocess d128", "softmax"):
        assert compiled[name]["spill_stores"] == 0, compiled[name]


@pytest.mark.slow
@pytest.mark.parametrize("job", ["decode contiguous d128", "decode paged d128"])
def test_decode_kernel_is_pipelined(compiled, job):
    """16 packed rows are too few for wgmma (64 per warp group): mma is expected; the loads must pipeline,
    the paged ones too (their addresses come from the block table)."""
    row = compiled[job]
    assert row["async_copies"] > 0, f"{job}: K/V loads are not pipelined: {row}"
    assert row["shared_bytes"] <= H100_SHARED_MEMORY_BYTES, f"{job}: does not fit in shared memory: {row}"
    assert row["spill_stores"] == 0, f"{job}: spills registers: {row}"
