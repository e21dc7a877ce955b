"""Where a suite registers: one `Suite` record per suite module, read by the sweep and the report.

The built-in suites (attention, memory, softmax, modules, overhead) are
planned in plan.py and run by sweep.py's own builders. Every other suite
lives in its own module (decode_suite.py, serving_suite.py, window_suite.py,
varlen_suite.py, hf_suite.py) and describes itself here once, when it is
imported: its jobs, how to build and check its case type, its baseline, its
table, its rates, its plot and its summary. bench/suites.py imports them all,
in the order a run takes them.

The arrows point one way: a suite module imports plan, sweep, report and this
module; none of those imports a suite. A job can only be made by the module
that defines its case type, so by the time the sweep or the report meets a
job, that module has registered its suite.
"""
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Suite:
    name: str  # the --suite name, and the `suite` column of its rows
    build_jobs: Callable  # (args, device_type) -> [Job]: none unless --suite names it (or all); checks first
    cases: dict  # case type -> (build(job, device) -> (call, grad leaves), check(job, device) -> max abs error)
    baseline: str  # the provider whose time the `vs <baseline>` column divides
    early: bool = False  # run right after the attention sweep, before memory, softmax and modules
    # (header, record key, formatter) between the `ms` column and `extra MiB`; None: TFLOP/s and `vs <baseline>`
    columns: Callable | None = None  # (baseline) -> [(header, key, format)]
    rates: Callable | None = None  # (job, time_ms) -> dict of tflops / gbps; None: case.flops(mode) as TFLOP/s
    plots: tuple = field(default_factory=tuple)  # ((kind, plot(records, ctx, path) -> path or None), ...)
    summary: Callable | None = None  # (records) -> text ("" when there is nothing to say)
    note: str = ""  # a paragraph under the suite's heading in the markdown report


SUITES = {}  # name -> Suite, in the order they registered


def register(suite):
    """Add `suite` (a module calls this once, at import); returns it."""
    previous = SUITES.get(suite.name)
    if previous is not None and previous.build_jobs.__module__ != suite.build_jobs.__module__:
        raise ValueError(f"two suites are named {suite.name!r}: {previous.build_jobs.__module__} "
                         f"and {suite.build_jobs.__module__}")
    SUITES[suite.name] = suite
    return suite


def arrange(names):
    """Put the suites named in `names` first, in that order: the order of a run and of the reports."""
    ordered = {name: SUITES[name] for name in names} | SUITES
    SUITES.clear()
    SUITES.update(ordered)


def suite_of(case):
    """The registered suite whose case type `case` is, or None (a built-in case)."""
    return next((s for s in SUITES.values() if type(case) in s.cases), None)
