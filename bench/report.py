"""Turn result rows into a terminal table, a CSV, a markdown report and PNG plots.

Every output carries its context: device name, torch's thread count, torch
and triton versions, git commit and date (in the markdown header, in every
CSV row, in every figure's title). File names carry the device and the date:

    bench_<device>_<date>.csv   every row, written row by row as the run goes
    bench_<device>_<date>.md    the tables, headed with the context
    attention_<device>_<date>.png   TFLOP/s vs N, one panel per (mode, causal) x (heads, head dim)
    memory_<device>_<date>.png      extra memory vs N (GPU only)
    softmax_<device>_<date>.png     effective GB/s vs row length (on the CPU: ms per call, see plot_softmax)
    <kind>_<device>_<date>.png      a registered suite's plots (decode, serving: see their modules)

A registered suite (bench/registry.py) brings its own table columns, plots,
markdown note and summary; this module reads them from its record.

    python -m bench.report bench/results/bench_<device>_<date>.csv

prints the short summary table of a finished run again.
"""
import csv
import datetime
import os
import platform
import re
import subprocess
import sys
import textwrap

import torch

from .registry import SUITES as REGISTERED
from .timing import NOT_MEASURED

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = {"attention": "sdpa-flash", "memory": "sdpa-flash", "softmax": "torch", "modules": "wrapper",
            "overhead": "sdpa"}  # the built-in suites'; a registered suite names its own (bench/registry.py)
CONTEXT_COLUMNS = ["device", "threads", "torch", "triton", "commit", "date"]
COLUMNS = ["suite", "kind", "provider", "mode", "shape", "dtype", "batch", "heads_q", "heads_kv", "n", "head_dim",
           "causal", "rows", "d_model", "status", "time_ms", "tflops", "gbps", "ratio", "extra_mib", "max_err",
           "setup_s", "launches"] + CONTEXT_COLUMNS
NUMERIC = {"batch", "heads_q", "heads_kv", "n", "head_dim", "rows", "d_model", "time_ms", "tflops", "gbps", "ratio",
           "extra_mib", "max_err", "setup_s", "launches"}


# ----------------------------------------------------------------------------
# Context
# ----------------------------------------------------------------------------
def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _git(*args):
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit():
    """Short commit hash, '+dirty' when tracked files differ from it; 'unknown' outside a git checkout."""
    commit = _git("rev-parse", "--short=12", "HEAD")
    if not commit:
        return "unknown"
    return commit + ("+dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def context(device, timer_method=""):
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    now = datetime.datetime.now(datetime.timezone.utc)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        device_slug = slug(name)
    else:
        name = f"CPU: {_cpu_name()}"
        device_slug = "cpu"
    # torch's intra-op threads: on the CPU they are part of what a time means (see threads_note).
    return {"device": name, "device_slug": device_slug, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version(), "commit": git_commit(), "date": now.strftime("%Y-%m-%d %H:%M UTC"),
            "day": now.strftime("%Y-%m-%d"), "timer": timer_method, "load": load_average()}


def load_average():
    """The host's 1-minute load average over its CPU count: other work on a shared machine skews CPU timings."""
    try:
        return f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    except (AttributeError, OSError):
        return "unknown"


def threads_note(ctx):
    """'1 torch thread', '2 torch threads' (contexts written before the count was recorded: '')."""
    threads = ctx.get("threads")
    if threads in (None, ""):
        return ""
    return f"{threads} torch thread" + ("" if int(threads) == 1 else "s")


def file_name(ctx, kind, ext):
    return f"{kind}_{ctx['device_slug']}_{ctx['day']}.{ext}"


# ----------------------------------------------------------------------------
# Records: flat dicts, one per result row
# ----------------------------------------------------------------------------
# Suites whose rows carry their own ratio: the overhead suite's is host cost / a bare custom op's, measured
# interleaved with the call (bench/overhead.py), not a provider's time over another's.
OWN_RATIO = {"overhead"}


def baseline(suite):
    """The provider a suite's `vs` column divides by, or None."""
    return BASELINE[suite] if suite in BASELINE else getattr(REGISTERED.get(suite), "baseline", None)


def add_ratios(records):
    """ratio = baseline time / this time, within one suite, mode and shape (> 1: faster than the baseline)."""
    base = {(r["suite"], r["mode"], r["shape"], r["dtype"]): r["time_ms"] for r in records
            if r["kind"] == "time" and r["provider"] == baseline(r["suite"]) and r["time_ms"]}
    for r in records:
        if r["suite"] in OWN_RATIO:
            continue
        b = base.get((r["suite"], r["mode"], r["shape"], r["dtype"]))
        r["ratio"] = b / r["time_ms"] if b and r.get("time_ms") else None
    return records


def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


class CsvStream:
    """A CSV written row by row, so a run cut short still leaves its rows."""

    def __init__(self, path, ctx):
        self.path, self.ctx = path, ctx
        self._file = open(path, "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=COLUMNS, extrasaction="ignore")
        self._writer.writeheader()
        self._file.flush()

    def write(self, record):
        row = {**record, **{k: self.ctx[k] for k in CONTEXT_COLUMNS}}
        self._writer.writerow({k: _csv_value(row.get(k)) for k in COLUMNS})
        self._file.flush()

    def close(self):
        self._file.close()


def write_csv(records, path, ctx):
    stream = CsvStream(path, ctx)
    for r in records:
        stream.write(r)
    stream.close()


def read_csv(path):
    records = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for key in NUMERIC:
                value = row.get(key, "")
                try:
                    row[key] = float(value) if value != "" else None
                except ValueError:
                    row[key] = value  # "not measured"
            row["causal"] = row.get("causal") == "True"
            records.append(row)
    return records


# ----------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------
def number(fmt):
    return lambda v: "" if v is None else (v if isinstance(v, str) else format(v, fmt))


def ratio_text(v):
    return "" if v is None else f"{v:.2f}x"


def _columns(suite):
    """(header, key, formatter) for one suite's table."""
    first = [("provider", "provider", str), ("mode", "mode", str), ("shape", "shape", str),
             ("status", "status", str), ("ms", "time_ms", number(".3f"))]
    base = baseline(suite)
    if suite == "overhead":  # no ratio to SDPA (stubbed kernels against real work on the CPU): to the bare op
        us = lambda v: "" if v is None else f"{1e3 * v:.1f}"  # noqa: E731
        return first[:4] + [("us per call", "time_ms", us), ("x bare op", "ratio", ratio_text),
                            ("bare op us", _bare_op_ms, us), ("launches", "launches", number(".0f"))]
    memory = [("extra MiB", "extra_mib", number(".0f")), ("max err", "max_err", number(".2e"))]
    if suite == "softmax":
        return first + [("GB/s", "gbps", number(".1f")), (f"vs {base}", "ratio", ratio_text)] + memory
    if suite == "modules":
        return first + [(f"vs {base}", "ratio", ratio_text)] + memory
    registered = REGISTERED.get(suite)
    if registered is not None and registered.columns is not None:
        return first + registered.columns(base) + memory
    return first + [("TFLOP/s", "tflops", number(".3g")), (f"vs {base}", "ratio", ratio_text)] + memory


def _suites(records):
    """The suites present in `records`: the built-in ones, then the registered ones, in that order."""
    return [s for s in (*BASELINE, *REGISTERED) if any(r["suite"] == s for r in records)]


def _bare_op_ms(r):
    """The bare custom op's ms per call, measured beside an overhead row: its time over its ratio."""
    return r["time_ms"] / r["ratio"] if r.get("time_ms") and r.get("ratio") else None


def _cells(records, columns):
    """key: a record's field, or a function of the record."""
    return [[fmt(key(r) if callable(key) else r.get(key)) for _, key, fmt in columns] for r in records]


def text_table(headers, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line("-" * w for w in widths)] + [line(r) for r in rows])


def markdown_table(headers, rows):
    escape = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(out + ["| " + " | ".join(escape(c) for c in r) + " |" for r in rows])


def terminal_report(records):
    parts = []
    for suite in _suites(records):
        columns = _columns(suite)
        rows = [r for r in records if r["suite"] == suite]
        parts.append(f"== {suite} ==\n" + text_table([c[0] for c in columns], _cells(rows, columns)))
    return "\n\n".join(parts)


def summary(records):
    """The short table: for each attention group, its largest N, TFLOP/s per provider side by side."""
    timed = [r for r in records if r["suite"] == "attention" and r["kind"] == "time"]
    if not timed:
        return "(no attention timings)"
    provider_names = list(dict.fromkeys(r["provider"] for r in timed))
    groups = {}
    for r in timed:
        key = (r["mode"], r["heads_q"], r["heads_kv"], r["head_dim"], r["causal"])
        groups.setdefault(key, []).append(r)
    rows = []
    for (mode, h_q, h_kv, head_dim, causal), group in groups.items():
        n_max = max(r["n"] for r in group)
        by_provider = {r["provider"]: r for r in group if r["n"] == n_max}
        heads = f"{h_q:g}" if h_q == h_kv else f"{h_q:g}:{h_kv:g}"
        cells = []
        for name in provider_names:
            r = by_provider.get(name)
            cells.append("" if r is None else (f"{r['tflops']:.3g}" if r["tflops"] else r["status"].split(":")[0]))
        rows.append([mode, heads, f"{head_dim:g}", "yes" if causal else "no", f"{n_max:g}"] + cells)
    return ("TFLOP/s at the largest N of each group\n"
            + text_table(["mode", "heads", "D", "causal", "N"] + provider_names, rows))


def markdown_report(records, ctx):
    lines = [f"# Attention benchmark on {ctx['device']}", "",
             "| context | |", "|---|---|",
             f"| device | {ctx['device']} |", f"| torch threads | {ctx.get('threads', 'unknown')} |",
             f"| torch | {ctx['torch']} |", f"| triton | {ctx['triton']} |",
             f"| python | {ctx['python']} |", f"| commit | {ctx['commit']} |", f"| date | {ctx['date']} |",
             f"| timing | {ctx['timer']} |",
             f"| host load (1-min average) | {ctx['load']} at the start, {ctx.get('load_end', 'unknown')} at the end |",
             "",
             "FLOPs follow FlashAttention's convention: 4·B·Hq·N²·D for the forward pass, x0.5 when causal, "
             "x2.5 for the backward pass, x3.5 for both. Softmax GB/s counts the row read once and written once; "
             "decode GB/s counts K and V read once (copy: read and written). "
             "`vs <provider>` is that provider's time divided by this row's (above 1: faster). "
             "Extra memory is the peak allocated during one call minus what was allocated before it "
             f"(\"{NOT_MEASURED}\" off the GPU). Rows marked \"correctness only\" were not timed: they give the max "
             "abs error against float64 (for bwd, over dq, dk, dv). "
             "Compare providers only within one run on one machine.", ""]
    if ctx["device_slug"] == "cpu":
        lines += ["On the CPU, Triton runs under its interpreter (TRITON_INTERPRET=1), about a thousand times "
                  "slower than on a GPU: it appears only in correctness rows, never with a time. "
                  + CPU_THREADS_NOTE.format(threads=threads_note(ctx) or "an unrecorded number of torch threads"),
                  ""]
    for suite in _suites(records):
        columns = _columns(suite)
        rows = [r for r in records if r["suite"] == suite]
        lines += [f"## {suite}", ""]
        if suite == "overhead":
            lines += [OVERHEAD_NOTE, ""]
        if suite == "softmax" and ctx["device_slug"] == "cpu":
            lines += [CPU_SOFTMAX_NOTE, ""]
        registered = REGISTERED.get(suite)
        if registered is not None and registered.note:
            lines += [registered.note, ""]
        lines += [markdown_table([c[0] for c in columns], _cells(rows, columns)), ""]
        text = registered.summary(records) if registered is not None and registered.summary else ""
        if text:
            lines += ["```text", text, "```", ""]
    return "\n".join(lines)


CPU_THREADS_NOTE = ("The CPU rows ran on {threads} (the overhead rows on one, always), chosen with "
                    "`python -m bench --threads`. The default, one, is the fair comparison: every provider gets "
                    "the same single core, as in the tests, and no thread pool waits for a core other work holds.")
CPU_SOFTMAX_NOTE = ("On the CPU, GB/s is the bytes a softmax must move over the wall time of one call: a comparison "
                    "of the providers in this run, not the machine's memory bandwidth. With more torch threads than "
                    "idle cores, the thread pool's wait for a busy core can take longer than the work: the times "
                    "then stay flat across N, and GB/s grows with N whatever the code does. The plot shows the "
                    "times.")
OVERHEAD_NOTE = ("The host cost of one call at a tiny shape (bench/overhead.py): time per call of many calls in a "
                 "row (on the CPU the thread's CPU time, which other work on a shared machine does not stretch; on "
                 "a GPU wall time), the median of 15 rounds. fwd and fwd+bwd are flash_attention (inputs without and with "
                 "grad), decode and decode-paged decode_attention of one new token per sequence over a contiguous "
                 "cache or 16-key pages (N: cached keys). `triton` (GPU) is the call itself. `triton-noop` (CPU) is "
                 "the call with every Triton kernel stubbed at its launch by a no-op recorder: everything above "
                 "the launch (input checks, the config choice, the custom op and autograd where taken, buffers), "
                 "without Triton's own launcher; `launches` counts the kernels one call launched. `x bare op` is "
                 "the call's time over a bare 5-argument torch.library custom op's (which only allocates its "
                 "output), the two timed in alternating rounds in one process, the median of the rounds' ratios "
                 "(issue 17's floors: decode 1.5x, fwd 2x, fwd+bwd 10x); `bare op us` is that op's time beside the "
                 "row. `sdpa` is F.scaled_dot_product_attention on the same inputs, for scale (on the CPU it also "
                 "computes). On the CPU every row runs on one torch thread.")


# ----------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------
COLORS = {"naive": "tab:gray", "sdpa-math": "tab:brown", "sdpa-flash": "tab:blue", "sdpa-efficient": "tab:cyan",
          "sdpa-cudnn": "tab:purple", "flex": "tab:green", "triton": "tab:red", "flash_attn": "tab:orange",
          "torch": "tab:blue"}


def figure_title(ctx, what, fig=None, fontsize=10):
    """What, then the context: the device (on the CPU with its thread count), then versions, commit and date.

    With `fig`, every line is wrapped to fit the figure: a line wider than the figure is cut off in
    the PNG, as the one-line context of a one-panel plot was. The width per character is a generous
    guess for matplotlib's default font (tests/test_bench.py checks that every text stays inside).
    """
    threads = threads_note(ctx) if ctx.get("device_slug") == "cpu" else ""
    lines = [what, ctx["device"] + (f", {threads}" if threads else ""),
             f"torch {ctx['torch']}, triton {ctx['triton']} | {ctx['commit']} | {ctx['date']}"]
    if fig is not None:
        # 0.6 em a character; 85% of the width, since an axes title is centred on its axes, not on the figure.
        chars = max(20, int(0.85 * fig.get_figwidth() * 72 / (0.6 * fontsize)))
        lines = [part for line in lines for part in _wrap(line, chars)]
    return "\n".join(lines)


def _wrap(line, chars):
    """Break at the " | " between fields where possible, inside a field only when it alone is too long."""
    parts, current = [], ""
    for field in line.split(" | "):
        joined = f"{current} | {field}" if current else field
        if len(joined) <= chars or not current:
            current = joined
        else:
            parts.append(current)
            current = field
    parts.append(current)
    return [piece for part in parts for piece in textwrap.wrap(part, chars, break_on_hyphens=False)]


def provider_lines(ax, records, y_key, colors=COLORS):
    """One line per provider of y_key against N (log2 axis); colors: provider -> matplotlib colour."""
    for name in dict.fromkeys(r["provider"] for r in records):
        points = sorted((r["n"], r[y_key]) for r in records
                        if r["provider"] == name and isinstance(r.get(y_key), float))
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=name, color=colors.get(name))
    ax.set_xscale("log", base=2)
    ns = sorted({r["n"] for r in records})
    if ns:
        ax.set_xticks(ns, [f"{n / 1024:g}k" if n >= 1024 else f"{n:g}" for n in ns])
        ax.minorticks_off()
    ax.grid(True, alpha=0.3)


def timed_rows(records, suite):
    return [r for r in records if r["suite"] == suite and r["kind"] == "time" and r.get("time_ms")]


def plot_attention(records, ctx, path):
    import matplotlib.pyplot as plt

    rows_ok = timed_rows(records, "attention")
    if not rows_ok:
        return None
    panel_rows = list(dict.fromkeys((r["mode"], r["causal"]) for r in rows_ok))
    panel_cols = list(dict.fromkeys((r["heads_q"], r["heads_kv"], r["head_dim"]) for r in rows_ok))
    fig, axes = plt.subplots(len(panel_rows), len(panel_cols), squeeze=False,
                             figsize=(4.2 * len(panel_cols) + 1, 3.2 * len(panel_rows) + 1.2))
    for i, (mode, causal) in enumerate(panel_rows):
        for j, (h_q, h_kv, head_dim) in enumerate(panel_cols):
            ax = axes[i][j]
            group = [r for r in rows_ok if (r["mode"], r["causal"]) == (mode, causal)
                     and (r["heads_q"], r["heads_kv"], r["head_dim"]) == (h_q, h_kv, head_dim)]
            provider_lines(ax, group, "tflops")
            heads = f"{h_q:g} heads" if h_q == h_kv else f"GQA {h_q:g}:{h_kv:g}"
            ax.set_title(f"{mode}, {'causal' if causal else 'non-causal'} | {heads}, D={head_dim:g}", fontsize=9)
            ax.set_xlabel("N (batch = tokens // N, at least 1)")
            ax.set_ylabel("TFLOP/s")
    handles, labels = {}, []
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles))
    fig.suptitle(figure_title(ctx, f"Attention throughput ({rows_ok[0]['dtype']})", fig, 10), fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_memory(records, ctx, path):
    import matplotlib.pyplot as plt

    rows_ok = [r for r in timed_rows(records, "memory") if isinstance(r.get("extra_mib"), float)]
    if not rows_ok:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    provider_lines(ax, rows_ok, "extra_mib")
    ax.set_yscale("log")
    r0 = rows_ok[0]
    ax.set_xlabel("N")
    ax.set_ylabel("extra memory (MiB, peak during one forward)")
    ax.legend()
    ax.set_title(figure_title(ctx, f"Attention memory: B={r0['batch']:g}, {r0['heads_q']:g} heads, "
                                   f"D={r0['head_dim']:g}, {r0['dtype']}, fwd", fig, 9), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_softmax(records, ctx, path):
    import matplotlib.pyplot as plt

    rows_ok = timed_rows(records, "softmax")
    if not rows_ok:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    if ctx["device_slug"] == "cpu":
        # Not GB/s: on the CPU bytes over time is no bandwidth (CPU_SOFTMAX_NOTE); the times say what was measured.
        provider_lines(ax, rows_ok, "time_ms")
        ax.set_yscale("log")
        ax.set_ylabel(f"ms per call (wall clock, {threads_note(ctx) or 'torch threads not recorded'})")
    else:
        provider_lines(ax, rows_ok, "gbps")
        ax.set_ylabel("effective GB/s (read once + write once)")
    ax.set_xlabel("row length N")
    ax.legend()
    ax.set_title(figure_title(ctx, f"Softmax over {rows_ok[0]['rows']:g} rows, {rows_ok[0]['dtype']}", fig, 9),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(records, ctx, out_dir, plots=True):
    """Write the CSV (with ratios), the markdown and the plots; return the paths written."""
    add_ratios(records)
    paths = [os.path.join(out_dir, file_name(ctx, "bench", ext)) for ext in ("csv", "md")]
    write_csv(records, paths[0], ctx)
    with open(paths[1], "w") as f:
        f.write(markdown_report(records, ctx))
    if plots:
        import matplotlib
        matplotlib.use("Agg")
        plots = [("attention", plot_attention), ("memory", plot_memory), ("softmax", plot_softmax)]
        plots += [plot for suite in _suites(records) if suite in REGISTERED for plot in REGISTERED[suite].plots]
        for kind, plot in plots:
            try:
                written = plot(records, ctx, os.path.join(out_dir, file_name(ctx, kind, "png")))
            except Exception as exc:  # noqa: BLE001 - a broken plot must not lose the tables
                print(f"plot {kind} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                written = None
            if written:
                paths.append(written)
    return paths


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description="Print the short summary table of a bench CSV.")
    parser.add_argument("csv")
    args = parser.parse_args(argv)
    records = read_csv(args.csv)
    if records:
        r = records[0]
        threads = threads_note(r)  # '' in a CSV written before the count was recorded
        print(f"{r['device']}{f' | {threads}' if threads else ''} | torch {r['torch']}, triton {r['triton']} | "
              f"{r['commit']} | {r['date']}")
    print(summary(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
