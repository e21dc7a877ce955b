"""tutorial/lowprec.py, run as a reader runs it (`python -m tutorial.lowprec`): every printed number checked
against torch.finfo, the e4m3 rounding bound, or a count made here from DeepSeek-V3's dims."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
E4M3_STEP = 2.0 ** -4  # 3 mantissa bits: round to nearest is within half of 2^-3, relative


@pytest.fixture(scope="module")
def output():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "tutorial.lowprec"], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def _number(text, pattern):
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in:\n{text}"
    return float(match.group(1))


def test_formats_are_torch_finfo(output):
    for name, mantissa_bits in (("float8_e4m3fn", 3), ("float8_e5m2", 2)):
        info = torch.finfo(getattr(torch, name))
        fields = next(line for line in output.splitlines() if line.split()[:1] == [name]).split()
        assert int(fields[2]) == mantissa_bits and int(fields[1]) == 7 - mantissa_bits
        assert float(fields[3]) == info.max and float(fields[6]) == info.eps
        assert float(fields[4]) == pytest.approx(info.smallest_normal, rel=1e-2)
        assert float(fields[5]) == pytest.approx(info.smallest_normal * 2.0 ** -mantissa_bits, rel=1e-2)


def test_scales(output):
    assert _number(output, r"cast directly:\s+(\S+)") == 1.0, "unscaled, most of them flush to zero"
    assert _number(output, r"scaled to 448 first:\s+(\S+)") <= E4M3_STEP
    assert _number(output, r"one scale:\s+(\S+)") == 1.0, "the outlier's scale flushes the other rows"
    assert _number(output, r"one scale per row:\s+(\S+)") <= E4M3_STEP


def test_each_operand_in_fp8_costs_precision(output):
    errors = [_number(output, rf"\n   {re.escape(what)}\s+(\S+)")
              for what in ("nothing (float64)", "q, k", "q, k, v", "q, k, v and P")]
    assert errors[0] < 1e-12 and errors == sorted(errors), errors
    assert errors[-1] < 0.1
    # The kernel rounds as the last line does, running max aside, and stores bf16 (relative 2^-9 of outputs < 4).
    kernel = _number(output, r"\n   the fp8 kernel\s+(\S+)")
    assert kernel <= 2 * (errors[-1] + 4 * 2.0 ** -9), (kernel, errors[-1])


def test_kv_cache_schemes(output):
    rows = re.findall(r"head 0 (\S+)x\s+(per tensor|per token and head)\s+kv head 0\s+(\S+)\s+kv head 1\s+(\S+)\s+"
                      r"\(kernel vs reference on the same cache: (\S+)\)", output)
    errors = {(float(small), scheme): (float(h0), float(h1), float(kernel)) for small, scheme, h0, h1, kernel in rows}
    assert len(errors) == 4
    assert all(kernel < 2.0 ** -9 for _, _, kernel in errors.values()), "the kernel dequantizes as the reference does"
    mild, extreme = 1e-2, 1e-5
    assert errors[(mild, "per tensor")][0] == pytest.approx(errors[(mild, "per token and head")][0], rel=0.1)
    assert errors[(extreme, "per tensor")][0] > 10 * errors[(extreme, "per token and head")][0]
    assert all(h0 < 0.1 and h1 < 0.1 for (_, scheme), (h0, h1, _) in errors.items() if scheme != "per tensor")


def test_mla_numbers(output):
    heads, qk, v, latent, rank = 128, 128 + 64, 128, 512 + 64, 512
    assert _number(output, r"MHA cache \(K 192 \+ V 128 per head\): (\d+) bytes") == heads * (qk + v) * 2 == 81920
    assert _number(output, r"one row\):\s+(\d+) bytes") == latent * 2
    assert _number(output, r"(\S+)x smaller") == round(heads * (qk + v) / latent, 1) == 71.1
    assert _number(output, r"read: MHA (\d+)") == round(2 * heads * (qk + v) / (heads * (qk + v) * 2))
    assert _number(output, r"absorbed MLA (\d+)") == round(2 * heads * (latent + rank) / (latent * 2)) == 242
    assert "576 as tiles 512 + 64" in output and "first 512 columns: True" in output
    assert _number(output, r"max difference (\S+)") < 1e-12
