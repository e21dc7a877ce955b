"""The host cost of one flash_attention call, at a shape so small that launching dominates.

    python -m bench --suite overhead

A tiny call (B1 H2 N128 D64) does microseconds of GPU work; what it costs
is the host's: the input checks, the torch.library op and its autograd, the
output buffers, the autotuner's lookup and Triton's launch of each kernel.
That cost is paid on every call, and in a decode loop it is most of the call.

    GPU  provider "triton": flash_attention itself. Wall time per call of
         many calls in a row, the GPU synchronized once per round: with
         microseconds of GPU work per call, that is the host's cost.
    CPU  provider "triton-noop": the same loop with every Triton kernel of
         the `kernels` package replaced by a no-op recorder (the interpreter
         would spend milliseconds per launch). What is left is the Python
         above the launches: input checks, the op and its autograd, the
         buffers. Triton's launch path and the autotuner's lookup are not in
         it: read it as a lower bound of the GPU figure.
    both provider "sdpa": F.scaled_dot_product_attention on the same inputs,
         PyTorch's own dispatch for scale (on the CPU it also computes).
         On the CPU every row runs on one torch thread.

Each figure is the median of 7 rounds of back-to-back calls (0.05 s each).
Modes: "fwd" (no autograd, under no_grad) and "fwd+bwd" (inputs that require
grad, the output's backward, the .grad fields reset to None before each call
so nothing accumulates). The row's `launches` column counts the kernels one
call launched (CPU, from the recorders); the GPU leaves it empty.
"""
import contextlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from .providers import Unsupported

ROUNDS = 7
ROUND_SECONDS = 0.05
WARMUP_CALLS = 3


class NoopKernel:
    """Stands in for a Triton kernel: `kernel[grid](*args, **kwargs)` counts a launch and does nothing."""

    def __init__(self, counter):
        self.counter = counter

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        self.counter[0] += 1


@contextlib.contextmanager
def noop_kernels():
    """Replace every Triton kernel object in the loaded `kernels.*` modules by a NoopKernel; yield the count."""
    from triton.runtime.jit import KernelInterface

    import kernels  # noqa: F401 - loads the modules whose kernels are replaced

    counter = [0]
    saved = []
    for name, module in list(sys.modules.items()):
        if name != "kernels" and not name.startswith("kernels."):
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, KernelInterface):
                saved.append((module, attr, value))
                setattr(module, attr, NoopKernel(counter))
    try:
        yield counter
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def _call(provider, mode, case, device):
    """The callable to time and the leaves whose .grad it fills."""
    from kernels import flash_attention

    grad = mode == "fwd+bwd"

    def rand():
        return torch.randn(case.batch, case.heads, case.n, case.head_dim, device=device, dtype=case.dtype,
                           requires_grad=grad)

    q, k, v = rand(), rand(), rand()
    attend = (lambda: F.scaled_dot_product_attention(q, k, v)) if provider == "sdpa" else (
        lambda: flash_attention(q, k, v))
    if not grad:
        def forward():
            with torch.no_grad():
                attend()
        return forward, []
    dout = torch.randn(q.shape, device=device, dtype=case.dtype)

    def forward_backward():
        q.grad = k.grad = v.grad = None
        attend().backward(dout)
    return forward_backward, [q, k, v]


def _per_call_seconds(call, device):
    """Median over ROUNDS rounds of (wall time of a round) / (calls in it).

    A round calls back to back until ROUND_SECONDS have passed, then waits for the GPU: the GPU's queue
    is drained inside the round, so a call whose GPU work outlasts its host work is timed by the GPU.
    """
    def one_round(seconds):
        calls, start = 0, time.perf_counter()
        while calls == 0 or time.perf_counter() - start < seconds:
            call()
            calls += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / calls

    for _ in range(WARMUP_CALLS):
        call()
    return statistics.median(one_round(ROUND_SECONDS) for _ in range(ROUNDS))


@contextlib.contextmanager
def _one_cpu_thread(device):
    """On the CPU, one torch thread: a tiny op gains nothing from a pool, and waking one costs more than the op."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def measure(job, device):
    """(ms per call, kernel launches per call or None) for one overhead job."""
    with _one_cpu_thread(device):
        return _measure(job, device)


def _measure(job, device):
    case, provider = job.case, job.provider
    if provider == "triton-noop":
        if device.type == "cuda":
            raise Unsupported("triton-noop measures the CPU path; on a GPU the provider is 'triton'")
        with noop_kernels() as counter:
            call, _ = _call(provider, job.mode, case, device)
            call()
            before = counter[0]
            call()
            launches = counter[0] - before
            seconds = _per_call_seconds(call, device)
        return 1e3 * seconds, launches
    if provider == "triton" and device.type != "cuda":
        raise Unsupported("'triton' times the real kernels: GPU only (on the CPU: triton-noop)")
    call, _ = _call(provider, job.mode, case, device)
    return 1e3 * _per_call_seconds(call, device), None
