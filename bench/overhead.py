"""The host cost of one call, at a shape so small that launching dominates, as a ratio to a bare custom op.

    python -m bench --suite overhead

A tiny call does microseconds of GPU work; what it costs is the host's: the
input checks, the config choice, the torch.library op and its autograd when
they are on the path, the output buffers, and Triton's launch of each kernel.
That cost is paid on every call, and in a decode loop it is most of the call.

The calls (the job's mode):

    fwd           flash_attention(q, k, v), inputs that do not require grad   B1 H2 N128 D64
    fwd+bwd       flash_attention(q, k, v).backward(dout), inputs that require grad, .grad reset each call
    decode        decode_attention(q, k_cache, v_cache, cache_seqlens): one new token per sequence
                  against a contiguous cache                                 B4 H8:2, 256 cached keys, D64
    decode-paged  the same over a pool of 16-key pages with a block table

The yardstick is a bare 5-argument torch.library.custom_op (BARE_OP: q, k, v,
a bool, a float; it allocates its output and does nothing else), timed in the
same process, in rounds interleaved with the call's: each round times the bare
op, then the call, and `ratio` is the median over the rounds of call / bare op.
Both drift together when other work shares the machine, so the ratio is far
steadier than either time. The issue-17 floors: decode (contiguous and paged)
<= 1.5x, fwd <= 2x, fwd+bwd <= 10x.

    GPU  provider "triton": the real calls. Wall time per call of many calls
         in a row, the GPU synchronized once per round: with microseconds of
         GPU work per call, that is the host's cost.
    CPU  provider "triton-noop": the same loop with every Triton kernel of the
         `kernels` package stubbed at its launch (`kernel[grid](...)` counts a
         launch and returns; the interpreter would spend milliseconds per
         launch). Everything above the launch is in: the checks, the config
         choice, the op and autograd where the call takes them, the buffers.
         Triton's own launcher (argument binding, the compiled kernel's
         lookup, the driver call) is out: read it as a lower bound of the GPU
         figure.
    both provider "sdpa": F.scaled_dot_product_attention on the same inputs (for
         decode, one query against the whole cache), PyTorch's own dispatch for
         scale (on the CPU it also computes). On the CPU every row runs on one
         torch thread.

Each time is the median of ROUNDS rounds of ROUND_SECONDS of back-to-back
calls, in the thread's CPU time on the CPU (other work on a shared machine
stretches wall time, not that) and in wall time on a GPU. The row's `launches`
column counts the kernels one call launched (CPU, from the stubs); the GPU
leaves it empty.
"""
import contextlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from .providers import Unsupported

ROUNDS = 15
ROUND_SECONDS = 0.02
WARMUP_CALLS = 3
MODES = ("fwd", "fwd+bwd", "decode", "decode-paged")
FLOORS = {"fwd": 2.0, "fwd+bwd": 10.0, "decode": 1.5, "decode-paged": 1.5}  # issue 17's, against BARE_OP
PAGE_SIZE = 16


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


_bare_op = None


def bare_op():
    """BARE_OP, registered on first use: the custom op every call's host cost is divided by."""
    global _bare_op
    if _bare_op is None:
        @torch.library.custom_op("bench_overhead::bare_op", mutates_args=())
        def bare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, sm_scale: float) -> torch.Tensor:
            return torch.empty_like(q)

        @bare.register_fake
        def _(q, k, v, causal, sm_scale):
            return torch.empty_like(q)

        _bare_op = bare
    return _bare_op


def _decode_inputs(case, device, paged):
    """q (B, Hq, 1, D), the cache (contiguous, or a pool of pages with a block table) and the lengths."""
    h_kv = case.heads_kv
    q = torch.randn(case.batch, case.heads, 1, case.head_dim, device=device, dtype=case.dtype)
    lengths = torch.full((case.batch,), case.n, dtype=torch.int32, device=device)
    if not paged:
        k, v = (torch.randn(case.batch, h_kv, case.n, case.head_dim, device=device, dtype=case.dtype)
                for _ in range(2))
        return q, k, v, lengths, None
    pages = -(-case.n // PAGE_SIZE)
    k, v = (torch.randn(case.batch * pages, h_kv, PAGE_SIZE, case.head_dim, device=device, dtype=case.dtype)
            for _ in range(2))
    table = torch.randperm(case.batch * pages, device=device).to(torch.int32).view(case.batch, pages)
    return q, k, v, lengths, table


def _call(provider, mode, case, device):
    """The callable to time for this provider and mode."""
    from kernels import decode_attention, flash_attention

    if mode.startswith("decode"):
        q, k, v, lengths, table = _decode_inputs(case, device, mode == "decode-paged")
        if provider == "sdpa":
            if table is not None:
                raise Unsupported("SDPA has no paged cache")
            return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return lambda: decode_attention(q, k, v, lengths, table)

    grad = mode == "fwd+bwd"

    def rand(heads):
        return torch.randn(case.batch, heads, case.n, case.head_dim, device=device, dtype=case.dtype,
                           requires_grad=grad)

    q, k, v = rand(case.heads), rand(case.heads_kv), rand(case.heads_kv)
    attend = (lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=case.heads != case.heads_kv)) \
        if provider == "sdpa" else (lambda: flash_attention(q, k, v))
    if not grad:
        return attend  # the inputs do not require grad: no autograd, and no no_grad() block to pay for
    dout = torch.randn(q.shape, device=device, dtype=case.dtype)

    def forward_backward():
        q.grad = k.grad = v.grad = None
        attend().backward(dout)
    return forward_backward


def _bare_call(device):
    op = bare_op()
    q, k, v = (torch.randn(1, 2, 128, 64, device=device) for _ in range(3))
    return lambda: op(q, k, v, False, 0.125)


def _round(call, seconds, device):
    """Seconds per call of back-to-back calls for `seconds`, the GPU's queue drained inside the round.

    On the CPU the clock is this thread's CPU time (time.thread_time): the host work of a call,
    which other processes on a shared machine do not stretch the way they stretch wall time.
    On a GPU it is wall time, which holds the GPU's time when the GPU is the slower side.
    """
    clock = time.perf_counter if device.type == "cuda" else time.thread_time
    calls, start = 0, clock()
    while calls == 0 or clock() - start < seconds:
        call()
        calls += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (clock() - start) / calls


def interleaved(call, baseline, device, rounds=ROUNDS, seconds=ROUND_SECONDS):
    """(median seconds per call, median seconds per baseline call, median per-round ratio call / baseline)."""
    for _ in range(WARMUP_CALLS):
        baseline()
        call()
    times, bases, ratios = [], [], []
    for _ in range(rounds):
        base = _round(baseline, seconds, device)
        took = _round(call, seconds, device)
        times.append(took)
        bases.append(base)
        ratios.append(took / base)
    return statistics.median(times), statistics.median(bases), statistics.median(ratios)


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
    """(ms per call, kernel launches per call or None, host cost / bare op) for one overhead job."""
    with _one_cpu_thread(device):
        return _measure(job, device)


def _measure(job, device):
    case, provider = job.case, job.provider
    if provider == "triton-noop":
        if device.type == "cuda":
            raise Unsupported("triton-noop measures the CPU path; on a GPU the provider is 'triton'")
        with noop_kernels() as counter:
            call = _call(provider, job.mode, case, device)
            call()
            before = counter[0]
            call()
            launches = counter[0] - before
            seconds, _, ratio = interleaved(call, _bare_call(device), device)
        return 1e3 * seconds, launches, ratio
    if provider == "triton" and device.type != "cuda":
        raise Unsupported("'triton' times the real kernels: GPU only (on the CPU: triton-noop)")
    seconds, _, ratio = interleaved(_call(provider, job.mode, case, device), _bare_call(device), device)
    return 1e3 * seconds, None, ratio
