"""The kernels compile for an H100 (sm_90) even on a CPU-only machine, with the code we expect.

The interpreter proves the arithmetic; this proves the GPU compiler accepts
the kernels, that the key/value loads are software-pipelined (asynchronous
copies into shared memory), that the matrix products use Hopper's wgmma, and
that each config fits in shared memory.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
H100_SHARED_MEMORY_BYTES = 227 * 1024  # per block, opt-in maximum


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "tests.hopper_compile"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, f"compiling for sm_90 failed:\n{run.stderr[-3000:]}"
    return {row["kernel"]: row for row in map(json.loads, run.stdout.splitlines())}


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["fwd d128 causal", "fwd d80 full", "fwd d256 causal", "bwd_dkdv d128 causal",
                                    "bwd_dq d128 causal"])
def test_attention_kernels_are_pipelined_and_use_wgmma(compiled, kernel):
    row = compiled[kernel]
    assert row["async_copies"] > 0, f"{kernel}: K/V loads are not pipelined: {row}"
    assert row["wgmma"] > 0, f"{kernel}: no Hopper warp-group MMA: {row}"
    assert row["shared_bytes"] <= H100_SHARED_MEMORY_BYTES, f"{kernel}: does not fit in shared memory: {row}"


@pytest.mark.slow
def test_helper_kernels_compile(compiled):
    assert {"bwd_preprocess d128", "softmax", "decode merge d128"} <= compiled.keys()


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["decode contiguous d128", "decode paged d128"])
def test_decode_kernel_is_pipelined(compiled, kernel):
    """16 packed rows are too few for wgmma (64 per warp group): mma is expected; the loads must pipeline,
    the paged ones too (their addresses come from the block table)."""
    row = compiled[kernel]
    assert row["async_copies"] > 0, f"{kernel}: K/V loads are not pipelined: {row}"
    assert row["shared_bytes"] <= H100_SHARED_MEMORY_BYTES, f"{kernel}: does not fit in shared memory: {row}"
