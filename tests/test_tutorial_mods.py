"""tutorial/mods.py, run as a reader runs it: its tile picture against a dense count made here, its errors small."""
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_mods_tutorial_draws_the_dense_masks_tiles_and_matches_float64():
    from tutorial.mods import BLOCK, N_GLOBAL, WINDOW

    n = 256  # 4 x 4 blocks: the reader's default, 384, draws 6 x 6
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "tutorial.mods", "--n", str(n)], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout

    # The tiles, from the dense mask written out here: skipped if nothing visible, full if everything is.
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    visible = ((j - i).abs() <= WINDOW) | (i < N_GLOBAL) | (j < N_GLOBAL)
    blocks = n // BLOCK
    expected = []
    for r in range(blocks):
        tiles = [visible[r * BLOCK:(r + 1) * BLOCK, c * BLOCK:(c + 1) * BLOCK] for c in range(blocks)]
        expected.append(" ".join("F" if t.all() else "P" if t.any() else "." for t in tiles))
    drawn = re.findall(r"^     ([FP. ]+)$", out, re.MULTILINE)
    assert drawn == expected, out
    skipped = sum(row.count(".") for row in expected)
    assert f"sparsity {skipped / blocks**2:.2f} ({skipped} of {blocks**2} tiles skipped)" in out
    assert "the plain builder agrees: yes" in out

    for step in ("3", "4"):
        line = next(line for line in out.splitlines() if line.startswith(f"{step}. "))
        found = dict(re.findall(r"(\w+) (\d\.\de[-+]\d+)", line))
        names = ["o", "dq", "dk", "dv"] + (["dslope"] if step == "4" else [])
        assert sorted(found) == sorted(names), line
        for name in names:
            limit = 1e-3 if name == "dslope" else 1e-5  # dslope sums grad * log-distance over every pair
            assert float(found[name]) < limit, f"step {step}: {name} {found[name]}"
    assert "without the derivative, a gradient is refused: a gradient is asked for" in out
