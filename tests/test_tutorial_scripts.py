"""The tutorial's scripts, run the way a reader runs them: `python -m tutorial.<name>` from the repo root.

Each script's printed numbers are checked against an independent count made
here: tile kinds from a dense causal mask, bytes from the formulas written
out, the kernel's running softmax state from a float64 recomputation of the
keys seen so far. The pdb test drives a real debugger session through stdin.
"""
import itertools
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tutorial.bytes_moved import attention_bytes
from tutorial.step_through import HEAD_DIM, N_K, make_inputs
from tutorial.tiling import BLOCK_M, BLOCK_N, FULL, MASKED, PANELS, SKIPPED, classify_tiles

REPO_ROOT = Path(__file__).resolve().parent.parent
KERNEL_FILE = REPO_ROOT / "kernels" / "flash_fwd.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_script(name, *args, stdin=None, python_args=()):
    """Run `python [python_args] -m tutorial.<name> args` in the repo root; return its stdout."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, *python_args, "-m", f"tutorial.{name}", *args]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, input=stdin, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, \
        f"{' '.join(command[1:])} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


# ----------------------------------------------------------------------------
# tiling: the kernel's tile split against a dense bottom-right causal mask
# ----------------------------------------------------------------------------
def dense_tile_kinds(n_q, n_k, block_m, block_n):
    """Tile kinds from the (Nq, Nk) mask itself: skipped iff nothing visible, full iff all visible and inside."""
    visible = torch.ones(n_q, n_k, dtype=torch.bool).tril(diagonal=n_k - n_q)  # key j <= query i + Nk - Nq
    kinds = []
    for start_m in range(0, n_q, block_m):
        row = []
        for start_n in range(0, n_k, block_n):
            tile = visible[start_m:start_m + block_m, start_n:start_n + block_n]
            inside = start_n + block_n <= n_k  # a tile hanging past the last key needs the bounds mask
            row.append(SKIPPED if not tile.any() else FULL if tile.all() and inside else MASKED)
        kinds.append(row)
    return kinds


def dense_counts(n_q, n_k, block_m, block_n):
    kinds = dense_tile_kinds(n_q, n_k, block_m, block_n)
    flat = [kind for row in kinds for kind in row]
    skipped_scores = sum(min(block_m, n_q - i * block_m) * min(block_n, n_k - j * block_n)
                         for i, row in enumerate(kinds) for j, kind in enumerate(row) if kind == SKIPPED)
    return flat.count(FULL), flat.count(MASKED), flat.count(SKIPPED), 100 * skipped_scores / (n_q * n_k)


def test_tiling_prints_the_counts_of_a_dense_causal_mask():
    out = run_script("tiling", "--no-plot")
    panels = re.findall(r"^Nq=(\d+), Nk=(\d+):.*?tiles: (\d+) total, (\d+) visited \((\d+) full \+ (\d+) masked\), "
                        r"(\d+) skipped\n  FLOPs skipped: ([\d.]+)%", out, re.MULTILINE | re.DOTALL)
    assert [(int(p[0]), int(p[1])) for p in panels] == [(n_q, n_k) for _, n_q, n_k in PANELS], out
    for n_q, n_k, total, visited, full, masked, skipped, flops_skipped in panels:
        n_q, n_k = int(n_q), int(n_k)
        want = dense_counts(n_q, n_k, BLOCK_M, BLOCK_N)
        got = (int(full), int(masked), int(skipped))
        assert got == want[:3], f"Nq={n_q}, Nk={n_k}: printed (full, masked, skipped) {got}, dense mask says {want[:3]}"
        assert int(total) == math.ceil(n_q / BLOCK_M) * math.ceil(n_k / BLOCK_N) == sum(got)
        assert int(visited) == got[0] + got[1]
        assert float(flops_skipped) == pytest.approx(want[3], abs=0.05), f"Nq={n_q}, Nk={n_k}"
    # The square case, worked out by hand: query block i visits 2(i+1) key blocks, two on the diagonal.
    assert panels[0][2:7] == ("32", "20", "12", "8", "12")


@pytest.mark.parametrize("n_q, n_k, block_m, block_n", [
    (512, 512, 128, 64),
    (97, 130, 32, 16),  # ragged on both axes: the last key block hangs past Nk
    (130, 97, 32, 16),  # Nq > Nk: the first 33 queries see no key at all
    (1, 7, 16, 16),  # one decode step: a single query sees every key
    (64, 96, 64, 32),  # the interpreter's tiles on step_through's shape
])
def test_classify_tiles_matches_dense_mask(n_q, n_k, block_m, block_n):
    assert classify_tiles(n_q, n_k, block_m, block_n) == dense_tile_kinds(n_q, n_k, block_m, block_n)


def test_tiling_saves_a_figure(tmp_path):
    pytest.importorskip("matplotlib")
    out_file = tmp_path / "tiles.png"
    out = run_script("tiling", "--out", str(out_file))
    assert f"figure: {out_file}" in out
    assert out_file.read_bytes()[:8] == PNG_MAGIC and out_file.stat().st_size > 10_000
    committed = REPO_ROOT / "tutorial" / "figures" / "causal_tiling.png"  # the tutorial cites this one
    assert committed.read_bytes()[:8] == PNG_MAGIC


# ----------------------------------------------------------------------------
# bytes_moved: the formulas, and the table the script prints
# ----------------------------------------------------------------------------
def test_bytes_formulas():
    d, b, block_m = 128, 2, 128
    for n in (1024, 2048, 4096, 8192):
        small, large = attention_bytes(n, d, b, block_m), attention_bytes(2 * n, d, b, block_m)
        assert small.naive == 4 * n * d * b + 4 * n * n * b
        assert small.flash == 4 * n * d * b + 4 * n  # Q, K, V, O once, plus an fp32 lse per row
        assert large.flash == 2 * small.flash  # linear in N
        assert large.scores == 4 * small.scores  # naive's N x N part: quadratic
        # K and V re-read by each of the n / block_m query blocks: quadratic too, with a D / block_m smaller factor.
        assert small.flash_reread == 2 * n * d * b + 4 * n + (n // block_m) * 2 * n * d * b
        assert large.flash_reread - 2 * small.flash_reread == 2 * (n // block_m) * 2 * n * d * b
    at_16k = attention_bytes(16384, d, b, block_m)
    assert at_16k.scores // 4 == 512 * 2 ** 20  # S alone: 512 MiB per head
    assert at_16k.ratio == pytest.approx(128.5, abs=0.01)
    assert at_16k.ratio_reread == pytest.approx(2 * block_m / d, rel=1e-3)  # the limit 2 BLOCK_M / D
    assert attention_bytes(100, 64, 2, 128).flash_reread == 2 * 100 * 64 * 2 + 400 + 1 * 2 * 100 * 64 * 2  # ceil


def test_bytes_script_prints_the_formulas():
    out = run_script("bytes_moved")
    number = r"\s+([\d.]+)"
    rows = re.findall(r"^\s*(\d+)" + number * 5 + "x" + number + "x$", out, re.MULTILINE)
    assert [int(r[0]) for r in rows] == [1024, 2048, 4096, 8192, 16384], out
    for n, naive, scores, flash, reread, ratio, ratio_reread in rows:
        c = attention_bytes(int(n), 128, 2, 128)
        printed = [float(x) for x in (naive, scores, flash, reread, ratio, ratio_reread)]
        want = [c.naive / 2 ** 20, c.scores / 2 ** 20, c.flash / 2 ** 20, c.flash_reread / 2 ** 20,
                c.ratio, c.ratio_reread]
        assert printed == pytest.approx(want, abs=0.051), f"N={n}: printed {printed}, formulas give {want}"
    assert rows[-1][5] == "128.5"


# ----------------------------------------------------------------------------
# step_through: the kernel's running state against the keys seen so far
# ----------------------------------------------------------------------------
def expected_prefix(end, causal):
    """Running max and normaliser after keys [0, end), base-2 units, float64 (Nq,)."""
    q, k, _ = (t[0, 0].double() for t in make_inputs())
    s = q @ k[:end].T / math.sqrt(HEAD_DIM) / math.log(2)  # base 2: exp(x) == exp2(x / ln 2)
    if causal:
        visible = torch.ones(q.shape[0], N_K, dtype=torch.bool).tril(diagonal=N_K - q.shape[0])[:, :end]
        s = s.masked_fill(~visible, float("-inf"))
    m = s.amax(dim=-1)
    return m, torch.exp2(s - m[:, None]).sum(dim=-1)


@pytest.mark.parametrize("causal", [False, True])
def test_step_through_state_matches_recomputation(causal):
    out = run_script("step_through", "--rows", "0,1,2,63", *(["--causal"] if causal else []))
    blocks = re.findall(r"^after key block (\d) \(keys (\d+)-(\d+), (\w+) stage\):\n(.*?)\n  all rows",
                        out, re.MULTILINE | re.DOTALL)
    assert [(b[1], b[2]) for b in blocks] == [("0", "31"), ("32", "63"), ("64", "95")], out
    # The kernel's split: without a mask every block is full; causal, only block 0 is wholly visible to row 0.
    assert [b[3] for b in blocks] == (["unmasked", "masked", "masked"] if causal else ["unmasked"] * 3)
    previous_m = None
    for _, _, last_key, _, table in blocks:
        m, l = expected_prefix(int(last_key) + 1, causal)
        rows = re.findall(r"^\s+(\d+)\s+([-\d.]+)\s+([-\d.]+)\s+([-\d.]+)\s+([-\d.]+)\s+([-\d.]+)\s+\[", table,
                          re.MULTILINE)
        assert [int(r[0]) for r in rows] == [0, 1, 2, 63], table
        for row, alpha, m_kernel, m_prefix, l_kernel, l_prefix in rows:
            r = int(row)
            assert float(m_kernel) == pytest.approx(m[r].item(), abs=2e-6), f"m_i, row {r}, keys <= {last_key}"
            assert float(l_kernel) == pytest.approx(l[r].item(), abs=2e-5), f"l_i, row {r}, keys <= {last_key}"
            assert float(m_prefix) == pytest.approx(m[r].item(), abs=1e-6)
            assert float(l_prefix) == pytest.approx(l[r].item(), abs=1e-5)
            want_alpha = 0.0 if previous_m is None else 2 ** (previous_m[r].item() - m[r].item())
            assert float(alpha) == pytest.approx(want_alpha, abs=1e-4), f"alpha, row {r}, keys <= {last_key}"
        previous_m = m
    final = re.search(r"max \|o - reference\.naive_attention \(float64\)\| = ([\d.e+-]+)", out)
    assert final and float(final.group(1)) < 1e-5, out
    assert re.search(r"^OK: after each of the 3 key blocks", out, re.MULTILINE), out


def watched_line_in_kernel_source():
    """The line number of `m_i = m_new` in _attn_fwd_inner, read from the file here, independently of the script."""
    lines = KERNEL_FILE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("def _attn_fwd_inner("))
    return next(i + 1 for i in range(start, len(lines)) if lines[i].strip() == "m_i = m_new")


def test_step_through_prints_the_breakpoint_location():
    out = run_script("step_through", "--print-breakpoint")
    assert out.strip() == f"kernels/flash_fwd.py:{watched_line_in_kernel_source()}"


def test_pdb_stops_inside_the_kernel_and_prints_m_i():
    location = f"kernels/flash_fwd.py:{watched_line_in_kernel_source()}"
    # The -c commands break at the loop's last line and continue to it; stdin carries the session.
    session = "\n".join([
        "p m_i.handle.data[:4]",  # first stop: no key seen yet
        "c",
        "p m_i.handle.data[:4]",  # second stop: the max after key block 0
        "disable 1",
        "c",  # run to the end
        "q",
    ]) + "\n"
    out = run_script("step_through", stdin=session, python_args=("-m", "pdb", "-c", f"b {location}", "-c", "c"))
    assert out.count("-> m_i = m_new") == 2, out
    printed = re.findall(r"\(Pdb\) array\(\[([^\]]*)\]", out)
    assert len(printed) == 2, out
    first, second = ([float(x) for x in p.split(",")] for p in printed)
    assert first == [-math.inf] * 4
    m, _ = expected_prefix(32, causal=False)
    assert second == pytest.approx(m[:4].tolist(), abs=1e-5), f"pdb printed {second}, keys 0-31 give {m[:4].tolist()}"
    assert "final o = acc / l_i" in out  # after `disable 1` and `c` the script ran to its end


# ----------------------------------------------------------------------------
# variants: the band's key-block bounds, and the script of chapter 9
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("n_q, n_k, left, right", [
    (256, 256, None, 0), (256, 256, 100, 0), (200, 300, 64, 10), (300, 200, 5, None), (130, 97, None, None),
    (97, 130, 0, 0),
])
def test_band_key_bounds_match_a_brute_force_count(n_q, n_k, left, right):
    """Each range of band_key_bounds is exactly the blocks the dense band says it is."""
    from reference import window_visibility
    from reference.tiled import band_key_bounds

    visible = window_visibility(n_q, n_k, (left, right))
    block_m, block_n = 64, 32
    for start_m in range(0, n_q, block_m):
        rows = visible[start_m:start_m + block_m]
        lo, full_lo, full_hi, hi = band_key_bounds(start_m, block_m, block_n, n_q, n_k, left, right)
        seen = [s for s in range(0, n_k, block_n) if rows[:, s:s + block_n].any()]
        # Wholly visible to the block's real rows (padding rows past n_q are never stored).
        full = [s for s in range(0, n_k, block_n) if s + block_n <= n_k and rows[:, s:s + block_n].all()]
        visited = list(range(lo, hi, block_n))
        assert set(seen) <= set(visited), f"block {start_m}: a visible key block is skipped"
        assert not [s for s in visited if s not in seen and s not in full], f"block {start_m}: extra blocks"
        assert set(range(full_lo, full_hi, block_n)) <= set(full), f"block {start_m}: a masked block runs unmasked"
        assert not rows[:, :lo].any() and not rows[:, hi:].any(), f"block {start_m}: visible keys outside [lo, hi)"


def test_variants_script_counts_window_tiles_linearly():
    out = run_script("variants")
    rows = [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
    by_n = {int(r[0]): (int(r[1]), int(r[3])) for r in rows}
    assert set(by_n) == {4096, 8192, 16384, 32768, 65536}, out
    causal_growth = by_n[65536][0] / by_n[32768][0]
    window_growth = by_n[65536][1] / by_n[32768][1]
    assert 3.9 < causal_growth < 4.1 and 1.9 < window_growth < 2.1, out
    assert "identical" in out and "GiB" in out, out


# ----------------------------------------------------------------------------
# serving_step: the tile numbering against a linear scan, host reads, NaN rows (chapter 10)
# ----------------------------------------------------------------------------
def owner_by_scan(starts, tile):
    """The sequence a tile belongs to, by walking the starts: the last b whose tiles begin at or before it."""
    return max(b for b, start in enumerate(starts) if start <= tile)


@pytest.mark.parametrize("counts", [(1, 4, 40, 20), (0, 0, 17), (16, 16, 16), (1,) * 9, (100, 0, 1, 31, 33)])
@pytest.mark.parametrize("block_q", [1, 4, 16])
def test_tile_numbering_leaves_room_for_every_sequence(counts, block_q):
    """cu_seqlens_q[b] // BLOCK_Q + b gives each sequence all its tiles before the next one's, inside the grid."""
    from tutorial.serving_step import find_sequence, grid_tiles, tile_starts

    cu = [0, *itertools.accumulate(counts)]
    starts, grid = tile_starts(cu, block_q), grid_tiles(cu, block_q)
    ends = [start + math.ceil(n / block_q) for start, n in zip(starts, counts)]
    assert all(end <= start for end, start in zip(ends, starts[1:] + [grid])), (starts, ends, grid)
    for tile in range(grid):
        assert find_sequence(starts, tile) == owner_by_scan(starts, tile), tile
    assert grid - sum(math.ceil(n / block_q) for n in counts) <= len(counts), "at most one idle tile per sequence"


def test_host_reads_counts_what_waits_for_the_device():
    from tutorial.serving_step import HostReads

    t = torch.tensor([3, 0])
    tolist = torch.Tensor.tolist
    with HostReads() as reads:
        t[0].item(), t.tolist(), bool(t[0]), torch.nonzero(t), t + 1
    assert reads.reads == ["aten::_local_scalar_dense", "tolist", "aten::_local_scalar_dense", "aten::nonzero"], \
        reads.reads
    assert torch.Tensor.tolist is tolist, "tolist is put back"


def test_serving_step_script():
    from tutorial.serving_step import BLOCK_Q, STEP, grid_tiles, tile_starts

    out = run_script("serving_step")
    cu = [0, *itertools.accumulate(new for _, new in STEP)]
    starts = tile_starts(cu, BLOCK_Q)
    assert f"tile_start = cu_seqlens_q[b] // {BLOCK_Q} + b = {starts}" in out, out
    tiles = re.findall(r"^  tile +(\d+): seq (\d+), (?:new tokens (\d+)\.\.(\d+)|(returns at once))$", out, re.M)
    assert len(tiles) == grid_tiles(cu, BLOCK_Q), out
    for tile, seq, first, last, idle in tiles:
        b = owner_by_scan(starts, int(tile))
        assert int(seq) == b, f"tile {tile}"
        offset = (int(tile) - starts[b]) * BLOCK_Q
        if idle:
            assert offset >= STEP[b][1], f"tile {tile} has tokens but returned"
        else:
            assert (int(first), int(last)) == (offset, min(offset + BLOCK_Q, STEP[b][1]) - 1), f"tile {tile}"
    assert "  paged_attention: 0\n" in out, "the fast path reads nothing on the host"
    # validate=True reads the lengths, cu_seqlens_q and each sequence's used block-table row
    assert f"  paged_attention(validate=True): {2 + len(STEP)} (tolist)" in out, out
    error = float(re.search(r"max \|kernel - float64 reference\| = (\S+)", out).group(1))
    assert error < 1e-5, out
    assert "all NaN: [2]; unchanged: [0, 1, 3]" in out, out
    assert "validate=True: ValueError: block_table[2, 3] = " in out, out
