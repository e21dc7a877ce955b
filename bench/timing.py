"""How a call is timed and how much memory it needs.

GPU: `triton.testing.do_bench`, the median over as many runs as fit in
`rep` ms after `warmup` ms of warm-up, with the L2 cache flushed before each
run. CPU: a wall-clock median of a few runs after warm-up: there is no queue
to wait on, and the runs are long enough (milliseconds) for perf_counter.
In a sweep the job's first call (compile, autotune, setup) is the CPU's
warm-up run, so the sweep's CPU timer adds none of its own.

Both take `grad_to_none`, tensors whose .grad is reset before each run (not
timed), so a timed backward pass allocates its gradients every run instead
of accumulating into the last run's.

Extra memory is measured on the GPU only: the peak the caching allocator
saw during one call, minus what was allocated just before it (the inputs,
and for a backward pass the saved forward). On the CPU it is "not measured".
"""
import gc
import statistics
import time

import torch

GPU_WARMUP_MS = 25
GPU_REP_MS = 100
CPU_WARMUP_RUNS = 1
CPU_REPEATS = 5
CPU_MAX_SECONDS = 1.0  # stop repeating a slow call after this long (at least MIN_REPEATS runs)
MIN_REPEATS = 3
NOT_MEASURED = "not measured"


def synchronize(device):
    """Wait for the GPU's queue, so a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_grads(tensors):
    for t in tensors:
        t.grad = None


class GpuTimer:
    """Median time in ms of call() by triton.testing.do_bench."""

    method = f"triton.testing.do_bench (median; warm-up {GPU_WARMUP_MS} ms, runs for {GPU_REP_MS} ms, L2 flushed)"

    def __init__(self, warmup_ms=GPU_WARMUP_MS, rep_ms=GPU_REP_MS):
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms

    def __call__(self, call, grad_to_none=()):
        import triton.testing

        return triton.testing.do_bench(call, warmup=self.warmup_ms, rep=self.rep_ms,
                                       grad_to_none=list(grad_to_none) or None, return_mode="median")


class CpuTimer:
    """Median wall time in ms of call(), after warm-up runs."""

    def __init__(self, warmup=CPU_WARMUP_RUNS, repeats=CPU_REPEATS, max_seconds=CPU_MAX_SECONDS):
        self.warmup, self.repeats, self.max_seconds = warmup, repeats, max_seconds
        warm = f"{warmup} warm-up run(s)" if warmup else "the job's first (untimed) call"
        self.method = (f"wall-clock median of up to {repeats} runs (at least {MIN_REPEATS}, "
                       f"until {max_seconds:g} s) after {warm}")

    def __call__(self, call, grad_to_none=()):
        for _ in range(self.warmup):
            _reset_grads(grad_to_none)
            call()
        times = []
        started = time.perf_counter()
        while len(times) < self.repeats:
            _reset_grads(grad_to_none)
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
            if len(times) >= MIN_REPEATS and time.perf_counter() - started > self.max_seconds:
                break
        return 1e3 * statistics.median(times)


def timer_for(device, quick=False):
    """The sweep's timer: it always makes one untimed first call before timing (see the docstring)."""
    if device.type == "cuda":
        return GpuTimer(rep_ms=GPU_REP_MS // 2 if quick else GPU_REP_MS)
    return CpuTimer(warmup=0, repeats=3 if quick else CPU_REPEATS)


def extra_memory_mib(call, device, grad_to_none=()):
    """Peak memory allocated during one call() beyond what was allocated before it, in MiB (GPU only)."""
    if device.type != "cuda":
        return NOT_MEASURED
    _reset_grads(grad_to_none)
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    call()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def free_memory(device, collect=False):
    """Give the GPU back what the allocator caches; collect=True first breaks reference cycles
    (an exception's traceback holds its frames' tensors). A full gc pass costs tens of ms, so
    only after a failure."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
