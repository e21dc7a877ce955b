"""Watch the online softmax work inside the real Triton kernel, on the CPU.

    python -m tutorial.step_through [--causal] [--rows 0,1,2,63] [--print-breakpoint]

Under Triton's interpreter (TRITON_INTERPRET=1) a @triton.jit function is
plain Python: the interpreter runs the kernel's own source, lines and
variable names included, with NumPy arrays behind every `tl` tensor (a
`triton.language.tensor`, whose data is in `.handle.data`). So Python's own
tools can watch it. This script runs `kernels.flash_attention` on a tiny
input, batch 1, one head, Nq = 64, Nk = 96, D = 16, which the interpreter's
tiles (BLOCK_M = 64, BLOCK_N = 32) cut into one query block and three key
blocks, and stops, with `sys.settrace`, on the line `m_i = m_new` of the key
loop in `_attn_fwd_inner` (found by scanning the kernel's source, not by a
hard-coded line number). There the block's update is done: `m_new` is the
new running max, `l_i` and `acc` are already rescaled and summed, and `m_i`
still holds the old max, so alpha = exp2(m_i - m_new) can be shown too.

Next to the kernel's values it prints what they must equal: the safe-softmax
statistics of the keys seen so far, computed at once in float64 from the full
score matrix (keys [0, end) of the row, scores s in base-2 units):

    m_i = max(s)      l_i = sum(exp2(s - m_i))      acc = exp2(s - m_i) @ V

If the rescaling by alpha were not exact, the running state would drift from
these after the first block. At the end, o = acc / l_i is compared with
`reference.naive_attention`. The kernel keeps m_i in base-2 units: scores are
q.k * sm_scale * LOG2E, so that exp2 (one GPU instruction) replaces exp.

The script always uses the interpreter (it sets TRITON_INTERPRET=1 unless the
variable is set) and CPU tensors, even on a machine with a GPU: a compiled
kernel has no Python lines to stop at.

Stepping through by hand, with pdb
----------------------------------
The same line takes a debugger breakpoint. Ask for its location, then start
pdb with a breakpoint there and `continue` to it:

    python -m tutorial.step_through --print-breakpoint      # prints kernels/flash_fwd.py:<LINE>
    TRITON_INTERPRET=1 python -m pdb -c "b kernels/flash_fwd.py:<LINE>" -c c -m tutorial.step_through

At the prompt, `p m_i.handle.data[:4]` prints the first four running maxima
(-inf at the first stop, before any key is seen), `p m_new.handle.data[:4]`
the new ones, `p start_n.handle.data`, `p acc.handle.data[:2, :4]`; `c` moves
on to the next key block; `disable 1` then `c` runs to the end. Under a
debugger the script does not record (its tracer would replace pdb's), but
still checks the final output.

`breakpoint()` works inside a kernel too, for the same reason: put the line
`breakpoint()` in the body of `_attn_fwd_inner` (a local edit, never
committed), run any script that calls the kernel with TRITON_INTERPRET=1,
and pdb opens with the kernel's locals, once per loop iteration and program.
"""
import argparse
import importlib
import inspect
import math
import os
import sys

import numpy as np
import torch

from reference import causal_visibility, naive_attention
from reference.tiled import LOG2E

BATCH, HEADS, N_Q, N_K, HEAD_DIM = 1, 1, 64, 96, 16
SEED = 0
DEFAULT_ROWS = "0,1,2,63"
WATCHED_LINE = "m_i = m_new"  # the last line of one key block's update in _attn_fwd_inner
# fp32 kernel against a float64 recomputation: rounding is ~1e-7 relative; 1e-4 leaves room, a real bug does not fit.
RTOL = 1e-4
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_inputs(seed=SEED):
    """q (1, 1, 64, 16), k and v (1, 1, 96, 16), fp32 on the CPU, from a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, HEADS, N_Q, HEAD_DIM, generator=generator)
    k = torch.randn(BATCH, HEADS, N_K, HEAD_DIM, generator=generator)
    v = torch.randn(BATCH, HEADS, N_K, HEAD_DIM, generator=generator)
    return q, k, v


def load_kernel_module():
    """kernels/ops.py (flash_attention's entry point), imported under the interpreter."""
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the import: triton reads it when kernels are decorated
    module = importlib.import_module("kernels.ops")
    if not importlib.import_module("kernels.runtime").INTERPRET:
        sys.exit("step_through needs Triton's interpreter: run it with TRITON_INTERPRET=1 (or unset)")
    return module


def watched_location(module):
    """(absolute path, line number) of `m_i = m_new` in _attn_fwd_inner, from the kernel's source."""
    fn = importlib.import_module("kernels.flash_fwd")._attn_fwd_inner
    fn = getattr(fn, "fn", fn)  # the Python function behind the jit (or interpreter) wrapper
    lines, first = inspect.getsourcelines(fn)
    for offset, line in enumerate(lines):
        if line.strip() == WATCHED_LINE:
            return os.path.realpath(inspect.getsourcefile(fn)), first + offset
    raise LookupError(f"no line {WATCHED_LINE!r} in _attn_fwd_inner: has the kernel's loop changed?")


def as_int(x):
    """A scalar of the kernel (a loop counter, a constexpr) as a Python int."""
    return int(as_numpy(x).reshape(-1)[0])


def as_numpy(x):
    """A copy of a value in the kernel: a tl tensor's NumPy data, a constexpr's value, or the value itself."""
    if hasattr(x, "handle"):
        return np.array(x.handle.data, copy=True)
    return np.asarray(getattr(x, "value", x))


class KernelWatcher:
    """While active, record the kernel's locals each time it reaches (path, line) in _attn_fwd_inner."""

    def __init__(self, path, line):
        self.path, self.line = path, line
        self.steps = []
        self._filenames = {}  # co_filename -> whether it is the kernel's file

    def _is_kernel_code(self, code):
        if code.co_name != "_attn_fwd_inner":
            return False
        if code.co_filename not in self._filenames:
            self._filenames[code.co_filename] = os.path.realpath(code.co_filename) == self.path
        return self._filenames[code.co_filename]

    def _on_call(self, frame, event, arg):
        # Called for every new frame; trace lines only in the kernel's inner loop.
        return self._on_line if self._is_kernel_code(frame.f_code) else None

    def _on_line(self, frame, event, arg):
        if event == "line" and frame.f_lineno == self.line:
            f = frame.f_locals
            self.steps.append({
                "start_n": as_int(f["start_n"]),
                "block_n": as_int(f["BLOCK_N"]),
                "masked": bool(as_numpy(f["MASKED"])),
                "m_old": as_numpy(f["m_i"]),  # not yet replaced: this line does it
                "m_i": as_numpy(f["m_new"]),
                "l_i": as_numpy(f["l_i"]),
                "acc": as_numpy(f["acc"]),
            })
        return self._on_line

    def __enter__(self):
        sys.settrace(self._on_call)
        return self

    def __exit__(self, *exc):
        sys.settrace(None)


def prefix_statistics(q, k, v, end, causal, sm_scale):
    """Safe-softmax statistics of keys [0, end) for every query row, in float64, base-2 units.

    Returns m (Nq,), l (Nq,), acc (Nq, D) for batch 0, head 0: what the
    kernel's m_i, l_i and acc must hold once it has seen keys [0, end).
    """
    q, k, v = (t[0, 0].double() for t in (q, k, v))  # (1, 1, N, D) -> (N, D)
    s = (q @ k[:end].T) * sm_scale * LOG2E  # (Nq, end), base-2 units
    if causal:
        s = s.masked_fill(~causal_visibility(q.shape[0], k.shape[0])[:, :end], float("-inf"))
    m = s.amax(dim=-1)
    p = torch.exp2(s - torch.where(m == float("-inf"), 0.0, m)[:, None])  # a row with no key yet: p = 0
    return m, p.sum(dim=-1), p @ v[:end]


def max_relative_error(actual, expected):
    """max |actual - expected| / max(1, |expected|), with -inf == -inf counted as equal."""
    actual, expected = torch.as_tensor(actual, dtype=torch.float64), expected.double()
    same = actual == expected  # also true for matching infinities
    err = ((actual - expected).abs() / expected.abs().clamp(min=1.0)).masked_fill(same, 0.0)
    return torch.nan_to_num(err, nan=math.inf).max().item()


def show_step(index, step, expected, rows):
    """Print one key block: kernel state next to the prefix statistics, for the chosen rows."""
    m, l, acc = expected
    start, end = step["start_n"], min(N_K, step["start_n"] + step["block_n"])
    stage = "masked stage" if step["masked"] else "unmasked stage"
    print(f"after key block {index} (keys {start}-{end - 1}, {stage}):")
    print(f"  {'row':>4} {'alpha':>8} {'m_i kernel':>11} {'m_i prefix':>11} {'l_i kernel':>11} {'l_i prefix':>11}"
          f"   acc[row, :3] kernel")
    # What the old sums were multiplied by: 0 at the first block (there were none), 1 where the max did not move.
    m_safe = np.where(step["m_i"] == -np.inf, 0.0, step["m_i"])  # as the kernel does for a row with no key yet
    alpha = np.exp2(step["m_old"] - m_safe)
    for r in rows:
        acc_row = " ".join(f"{x:8.4f}" for x in step["acc"][r, :3])
        print(f"  {r:>4} {alpha[r]:>8.4f} {step['m_i'][r]:>11.6f} {m[r].item():>11.6f} "
              f"{step['l_i'][r]:>11.5f} {l[r].item():>11.5f}   [{acc_row}]")
    errors = {
        "m_i": max_relative_error(step["m_i"], m),
        "l_i": max_relative_error(step["l_i"], l),
        "acc": max_relative_error(step["acc"][:, :HEAD_DIM], acc),
    }
    print("  all rows, max relative |kernel - prefix|: " + ", ".join(f"{k} {e:.1e}" for k, e in errors.items()))
    return max(errors.values())


def parse_rows(text):
    rows = [int(r) for r in text.split(",")]
    if not all(0 <= r < N_Q for r in rows):
        raise argparse.ArgumentTypeError(f"rows must lie in [0, {N_Q}), got {text}")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--causal", action="store_true",
                        help="bottom-right causal mask: the last two key blocks are masked")
    parser.add_argument("--rows", type=parse_rows, default=parse_rows(DEFAULT_ROWS), help="query rows to print")
    parser.add_argument("--print-breakpoint", action="store_true",
                        help="print the file:line of `m_i = m_new` for pdb's `b`, and exit")
    args = parser.parse_args(argv)

    module = load_kernel_module()
    path, line = watched_location(module)
    location = f"{os.path.relpath(path, REPO_ROOT)}:{line}"
    if args.print_breakpoint:
        print(location)
        return 0

    q, k, v = make_inputs()
    sm_scale = 1.0 / math.sqrt(HEAD_DIM)
    print(f"kernels.flash_attention under Triton's interpreter: batch {BATCH}, {HEADS} head, "
          f"Nq={N_Q}, Nk={N_K}, D={HEAD_DIM}, fp32, {'causal' if args.causal else 'no mask'}")
    print(f"watching {location}  ({WATCHED_LINE}, the end of one key block's update in _attn_fwd_inner)")
    print("m_i in base-2 units (q.k * sm_scale * LOG2E); 'prefix' = max, sum exp2, exp2 @ V over the keys "
          "seen so far, in float64\n")

    if sys.gettrace() is not None:
        print("a debugger or tracer is active: running the kernel without recording its state\n")
        o = module.flash_attention(q, k, v, causal=args.causal)
        steps = []
    else:
        with KernelWatcher(path, line) as watcher:
            o = module.flash_attention(q, k, v, causal=args.causal)
        steps = watcher.steps

    worst = 0.0
    for index, step in enumerate(steps):
        end = min(N_K, step["start_n"] + step["block_n"])
        expected = prefix_statistics(q, k, v, end, args.causal, sm_scale)
        worst = max(worst, show_step(index, step, expected, args.rows))
        print()

    o_error = (o.double() - naive_attention(q, k, v, causal=args.causal, dtype=torch.float64)).abs().max().item()
    print(f"final o = acc / l_i: max |o - reference.naive_attention (float64)| = {o_error:.1e}")
    ok = worst <= RTOL and o_error <= RTOL
    if steps:
        print(f"{'OK' if ok else 'MISMATCH'}: after each of the {len(steps)} key blocks the kernel's running state "
              f"{'equals' if ok else 'differs from'} the prefix statistics (worst {worst:.1e}, tolerance {RTOL:.0e})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
