"""demo.py runs each of the seed's demos on its flag, and all of them without one."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parent.parent / "demo.py"

# What each flag prints: the seed's lines (double space included: the seed passed two arguments to print).
LINES = {
    "--self_attn": ["Self attention output:  torch.Size([1, 6, 8])"],
    "--causal_attn": ["Causal attention output:  torch.Size([1, 6, 8])"],
    "--mha": ["MHA wrapper output:  torch.Size([1, 6, 256]) num_heads:  32"],
    "--gqa": ["GQA output:  torch.Size([1, 6, 256]) num_heads:  32 num_kv_groups:  8"],
    "--efficient_mha": ["Efficient MHA output:  torch.Size([1, 6, 256]) num_heads:  32"],
    "--generate": ["Same tokens on every backend: True"],
}
TIMED = {"--mha", "--efficient_mha"}
# Two configurations, each with a wrapper and an efficient time in ms.
TIME_LINE = re.compile(r"^MHA (Wrapper|Efficient) Average time:  (\d+\.\d+)  ms", re.MULTILINE)
# --generate: naive, reference with a cache, triton with a cache.
TOKENS_LINE = re.compile(r"^(?:naive|reference|triton), .*: (\d+\.\d) tokens/s", re.MULTILINE)


def run_demo(*flags):
    # One thread: this checks what the demo prints, not how fast it runs, and
    # torch's thread pool slows to a crawl when another process holds a core.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(DEMO), *flags], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, f"demo.py {' '.join(flags)} exited {result.returncode}:\n{result.stderr}"
    return result.stdout


def assert_timing(out, expected):
    times = TIME_LINE.findall(out)
    if not expected:
        assert not times, f"unexpected timing lines:\n{out}"
        return
    assert [kind for kind, _ in times] == ["Wrapper", "Efficient"] * 2, f"expected two timed configurations:\n{out}"
    assert all(float(ms) > 0 for _, ms in times), f"non-positive times:\n{out}"
    assert re.search(r"^Timing on (cpu|cuda) ", out, re.MULTILINE), f"the timing must name its device:\n{out}"


@pytest.mark.parametrize("flag", list(LINES))
def test_each_flag_runs_its_demo_only(flag):
    out = run_demo(flag)
    for line in LINES[flag]:
        assert line in out, f"demo.py {flag}: missing {line!r} in:\n{out}"
    for other, lines in LINES.items():
        if other != flag:
            assert not any(line in out for line in lines), f"demo.py {flag} also ran {other}:\n{out}"
    assert_timing(out, flag in TIMED)
    if flag == "--generate":
        rates = TOKENS_LINE.findall(out)
        assert len(rates) == 3 and all(float(r) > 0 for r in rates), f"expected three tokens/s figures:\n{out}"


def test_no_flag_runs_every_demo():
    out = run_demo()
    missing = [line for lines in LINES.values() for line in lines if line not in out]
    assert not missing, f"demo.py without flags is missing {missing} in:\n{out}"
    assert_timing(out, True)
