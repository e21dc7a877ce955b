"""Run jobs one by one; every job ends as one result row, whatever happens.

A timed job: build the inputs (random normal, never zeros: zeros hide
unwritten outputs and can run faster than real data), prepare the provider,
make one first call (compiling, autotuning and warming up; its wall time is
the row's setup_s), measure extra memory (GPU), then time it.

    fwd      the forward pass, under no_grad
    bwd      the backward pass alone: out.backward(dout, retain_graph=True)
             on a forward done once beforehand
    fwd+bwd  both: fn().backward(dout)

A check job computes the output (fwd) or the gradients of q, k, v (bwd) once
and records the max abs error against the same computation in float64.

A provider that raises becomes a status, never a crash: "unsupported: why"
(the provider or the library declined the case), "OOM", or "failed: error".
Memory is freed after every job, so one failure does not starve the next.

A time budget skips every job that would not finish inside it, judged from
the last job of the same kind, provider and mode measured so far (the first
of its kind is always tried while time is left). Inside stop_on_signals(),
SIGTERM and SIGINT raise `Stopped`, which ends the run between two Python
steps: the job in flight is "stopped: SIGTERM", the rest "skipped: stopped
(SIGTERM)", and the results so far are returned, so the caller can still
write its reports.
"""
import contextlib
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass

import torch

from . import providers
from .flops import attention_flops, tflops_per_s
from .plan import AttentionCase, ModuleCase, OverheadCase, SoftmaxCase
from .registry import suite_of
from .timing import extra_memory_mib, free_memory, synchronize

CORRECTNESS_ONLY = "correctness only"
SKIPPED_BUDGET = "skipped: time budget"
STOPPED = "stopped"
REASON_CHARS = 90


@dataclass
class Result:
    job: object
    status: str = "ok"
    time_ms: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    extra_mib: object = None  # MiB, or timing.NOT_MEASURED
    max_err: float | None = None
    setup_s: float | None = None
    launches: int | None = None  # overhead suite on the CPU: kernel launches per call
    ratio: float | None = None  # overhead suite: host cost / the bare custom op's (other suites: set by the report)

    def record(self):
        """A flat dict: one CSV row."""
        job = self.job
        return dict(suite=job.suite, kind=job.kind, provider=job.provider, mode=job.mode, shape=job.case.shape,
                    **job.case.columns(), status=self.status, time_ms=self.time_ms, tflops=self.tflops,
                    gbps=self.gbps, extra_mib=self.extra_mib, max_err=self.max_err, setup_s=self.setup_s,
                    launches=self.launches, ratio=self.ratio)


# ----------------------------------------------------------------------------
# Failures into statuses
# ----------------------------------------------------------------------------
class Skipped(Exception):
    """Not run on purpose (e.g. a dense mask that would not fit in memory): status "skipped: <message>"."""


def _short(text):
    text = " ".join(str(text).split())
    return text if len(text) <= REASON_CHARS else text[:REASON_CHARS - 3] + "..."


def _is_oom(exc):
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), torch.cuda.OutOfMemoryError) if t)
    text = str(exc).lower()
    return isinstance(exc, oom_types) or "out of memory" in text or "can't allocate memory" in text


def status_of(exc, caught=()):
    """A short status for an exception; SDPA explains its refusals in warnings, so look there too."""
    if isinstance(exc, providers.Unsupported):
        return f"unsupported: {_short(exc)}"
    if isinstance(exc, Skipped):
        return f"skipped: {_short(exc)}"
    if _is_oom(exc):
        return "OOM"
    text = str(exc)
    if isinstance(exc, NotImplementedError) or "No available kernel" in text or "No viable backend" in text:
        reasons = [str(w.message) for w in caught if not str(w.message).rstrip().endswith(":")]
        return f"unsupported: {_short(reasons[0] if reasons else text)}"
    return f"failed: {type(exc).__name__}: {_short(text)}"


# ----------------------------------------------------------------------------
# Inputs and calls
# ----------------------------------------------------------------------------
def attention_inputs(case, device, requires_grad=False):
    def rand(heads):
        shape = (case.batch, heads, case.n, case.head_dim)
        return torch.randn(shape, device=device, dtype=case.dtype, requires_grad=requires_grad)

    return rand(case.heads_q), rand(case.heads_kv), rand(case.heads_kv)


def mode_call(fn, mode, leaves):
    """The callable to time for `mode`, and the tensors whose .grad it fills."""
    if mode == "fwd":
        def forward():
            with torch.no_grad():
                fn()
        return forward, []
    out = fn()
    dout = torch.randn_like(out)
    if mode == "bwd":
        return (lambda: out.backward(dout, retain_graph=True)), leaves
    if mode == "fwd+bwd":
        return (lambda: fn().backward(dout)), leaves
    raise ValueError(f"unknown mode {mode!r}")


def _build_attention(job, device):
    case = job.case
    q, k, v = attention_inputs(case, device, requires_grad=job.mode != "fwd")
    fn = providers.ATTENTION[job.provider](q, k, v, case.causal)
    return mode_call(fn, job.mode, [q, k, v])


def _build_softmax(job, device):
    case = job.case
    x = torch.randn(case.rows, case.n, device=device, dtype=case.dtype)
    return mode_call(providers.SOFTMAX[job.provider](x), job.mode, [])


def _build_module(job, device):
    case = job.case
    module = providers.MODULES[job.provider](case.d_model, case.n, case.heads).to(device=device, dtype=case.dtype)
    x = torch.randn(case.batch, case.n, case.d_model, device=device, dtype=case.dtype)
    module.train(job.mode != "fwd")  # dropout is 0: train() only matters for what the module saves
    return mode_call(lambda: module(x), job.mode, list(module.parameters()))


BUILDERS = {AttentionCase: _build_attention, SoftmaxCase: _build_softmax, ModuleCase: _build_module}


# ----------------------------------------------------------------------------
# Correctness: max abs error against float64
# ----------------------------------------------------------------------------
def max_abs_error(actual, reference):
    diff = (actual.detach().double() - reference.detach().double()).abs()
    return float("inf") if torch.isnan(diff).any() else diff.max().item()


def _check_attention(job, device):
    from reference import naive_attention

    case = job.case
    q, k, v = attention_inputs(case, device, requires_grad=job.mode == "bwd")
    fn = providers.ATTENTION[job.provider](q, k, v, case.causal)
    leaves64 = [t.detach().double().requires_grad_(job.mode == "bwd") for t in (q, k, v)]
    if job.mode == "fwd":
        with torch.no_grad():
            return max_abs_error(fn(), naive_attention(*leaves64, causal=case.causal))
    out = fn()
    dout = torch.randn_like(out)
    out.backward(dout)
    naive_attention(*leaves64, causal=case.causal).backward(dout.double())
    return max(max_abs_error(t.grad, t64.grad) for t, t64 in zip((q, k, v), leaves64))


def _check_softmax(job, device):
    case = job.case
    x = torch.randn(case.rows, case.n, device=device, dtype=case.dtype)
    return max_abs_error(providers.SOFTMAX[job.provider](x)(), torch.softmax(x.double(), dim=-1))


def _check_module(job, device):
    case = job.case
    module = providers.MODULES[job.provider](case.d_model, case.n, case.heads).to(device=device, dtype=case.dtype)
    reference = providers.MODULE_REFERENCE[job.provider](case.d_model, case.n, case.heads)
    reference.load_state_dict(module.state_dict())  # same weights, attention in plain PyTorch
    reference = reference.to(device=device, dtype=torch.float64).eval()
    x = torch.randn(case.batch, case.n, case.d_model, device=device, dtype=case.dtype)
    with torch.no_grad():
        return max_abs_error(module.eval()(x), reference(x.double()))


CHECKERS = {AttentionCase: _check_attention, SoftmaxCase: _check_softmax, ModuleCase: _check_module}


def _handlers(case):
    """(build, check) for a case: the built-in suites' here, a registered suite's from its record."""
    if type(case) in BUILDERS:
        return BUILDERS[type(case)], CHECKERS[type(case)]
    suite = suite_of(case)
    if suite is None:
        raise TypeError(f"no suite knows the case type {type(case).__name__}: import its suite module "
                        "(bench/suites.py imports them all)")
    return suite.cases[type(case)]


# ----------------------------------------------------------------------------
# Stopping on a signal
# ----------------------------------------------------------------------------
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):
    """Raised (by a signal handler) to end a run early; BaseException, so no `except Exception` turns it into a row."""

    def __init__(self, signal_name):
        super().__init__(signal_name)
        self.signal_name = signal_name


@contextlib.contextmanager
def stop_on_signals():
    """Inside: SIGTERM and SIGINT raise Stopped once, and a second signal is ignored while the reports
    are written. The previous handlers come back on exit (bench's main() also runs inside pytest)."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def handler(signum, frame):
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise Stopped(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ----------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------
def _throughput(result):
    job, case = result.job, result.job.case
    if isinstance(case, AttentionCase):
        flops = attention_flops(case.batch, case.heads_q, case.n, case.n, case.head_dim, case.causal, job.mode)
        result.tflops = tflops_per_s(flops, result.time_ms)
    elif isinstance(case, SoftmaxCase):
        # Effective bandwidth: the row read once and written once, the least any softmax must move.
        nbytes = 2 * case.rows * case.n * torch.empty((), dtype=case.dtype).element_size()
        result.gbps = nbytes / (result.time_ms * 1e-3) / 1e9
    elif (suite := suite_of(case)) is not None and suite.rates is not None:  # decode: GB/s; serving: both
        for key, value in suite.rates(job, result.time_ms).items():
            setattr(result, key, value)
    elif hasattr(case, "flops"):  # the window and varlen suites count their own work (visible pairs, real tokens)
        result.tflops = tflops_per_s(case.flops(job.mode), result.time_ms)


def _measure(job, device, timer, result):
    """Fill `result` in; the job's tensors live in this frame only, and die with it."""
    if job.kind == "check":
        result.max_err = _handlers(job.case)[1](job, device)
        result.status = CORRECTNESS_ONLY
        return
    if isinstance(job.case, OverheadCase):
        from .overhead import measure

        result.time_ms, result.launches, result.ratio = measure(job, device)  # warms up by itself: no setup_s
        return
    started = time.perf_counter()
    call, leaves = _handlers(job.case)[0](job, device)
    call()  # compile, autotune, warm up
    synchronize(device)
    result.setup_s = time.perf_counter() - started
    result.extra_mib = extra_memory_mib(call, device, leaves)
    result.time_ms = timer(call, leaves)
    _throughput(result)


def run_job(job, device, timer):
    """Run one job and return its Result; exceptions become the status."""
    result = Result(job)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _measure(job, device, timer, result)
        except Exception as exc:  # noqa: BLE001 - every failure is a row, the sweep goes on
            result.status = status_of(exc, caught)
            result.time_ms = result.tflops = result.gbps = result.extra_mib = result.ratio = None
    _report_warnings(job, caught)
    try:
        free_memory(device, collect=result.status not in ("ok", CORRECTNESS_ONLY))
    except Exception as exc:  # noqa: BLE001 - e.g. a CUDA context a failed kernel left broken
        print(f"    freeing memory after {job.provider} failed: {_short(exc)}", file=sys.stderr)
    return result


_warned = set()


def _report_warnings(job, caught):
    """Show each distinct warning once: a silent fallback (say, flex run eagerly) must not go unnoticed."""
    for w in caught:
        key = (job.provider, str(w.message)[:200])
        if key not in _warned:
            _warned.add(key)
            print(f"    warning ({job.provider}): {_short(w.message)}", file=sys.stderr)


def describe(result):
    """One progress line."""
    job = result.job
    parts = [f"{job.suite:9} {job.kind:5} {job.provider:14} {job.mode:7} {job.case.shape:28}"]
    if result.time_ms is not None and isinstance(job.case, OverheadCase):
        launches = "" if result.launches is None else f", {result.launches} kernel launches"
        parts.append(f"{1e3 * result.time_ms:9.1f} us per call, {result.ratio:.2f}x the bare op{launches}")
    elif result.time_ms is not None:
        parts.append(f"{result.time_ms:9.3f} ms")
        if result.tflops is not None:
            parts.append(f"{result.tflops:8.2f} TFLOP/s")
        if result.gbps is not None:
            parts.append(f"{result.gbps:8.1f} GB/s")
        if isinstance(result.extra_mib, float):
            parts.append(f"+{result.extra_mib:.0f} MiB")
        parts.append(f"(setup {result.setup_s:.1f} s)")
    elif result.max_err is not None:
        parts.append(f"{result.status}: max err {result.max_err:.2e}")
    else:
        parts.append(result.status)
    return " ".join(parts)


def _estimate_s(job, history):
    """Seconds `job` should take: the last finished job of the same suite, kind, provider and mode; else 0."""
    key = (job.suite, job.kind, job.provider, job.mode)
    return history.get(key, 0.0)


def run_jobs(jobs, device, timer, time_budget_s=None, on_result=None, log=sys.stderr):
    """Run every job in order; skip those that would not fit the time budget; stop cleanly on `Stopped`.

    Returns the results, one per job, in order (a stopped run's last ones say so in their status).
    """
    started = time.perf_counter()
    results, history = [], {}

    def record(result, elapsed, note=""):
        results.append(result)
        if on_result is not None:
            on_result(result)
        print(f"[{len(results):3}/{len(jobs)} {elapsed:6.0f}s] {describe(result)}{note}", file=log, flush=True)

    try:
        for job in jobs:
            elapsed = time.perf_counter() - started
            estimate = _estimate_s(job, history)
            if time_budget_s is not None and elapsed + estimate > time_budget_s:
                note = f" (about {estimate:.0f} s, {max(0.0, time_budget_s - elapsed):.0f} s left)" if estimate else ""
                record(Result(job, status=SKIPPED_BUDGET), elapsed, note)
                continue
            result = run_job(job, device, timer)
            history[(job.suite, job.kind, job.provider, job.mode)] = time.perf_counter() - started - elapsed
            record(result, elapsed)
    except (Stopped, KeyboardInterrupt) as exc:
        name = exc.signal_name if isinstance(exc, Stopped) else "SIGINT"
        elapsed = time.perf_counter() - started
        for i, job in enumerate(jobs[len(results):]):
            record(Result(job, status=f"{STOPPED}: {name}" if i == 0 else f"skipped: {STOPPED} ({name})"), elapsed)
    return results


def stopped_by(results):
    """The signal that stopped the run ("SIGTERM", "SIGINT"), or None if it ran to the end."""
    for r in results:
        if r.status.startswith(f"{STOPPED}: "):
            return r.status.split(": ", 1)[1]
    return None
