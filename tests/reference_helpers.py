"""Helpers of the reference tests (the kernel tests' tolerance rule lives in tests/helpers.py).

The reference tests compare float64 computations that should agree to
rounding, so a fixed, tight tolerance is the right judge there.
"""
import pytest
import torch

TIGHT = 1e-12


def assert_close(actual, expected, what, atol=TIGHT, rtol=TIGHT):
    """torch.testing.assert_close, which reports the largest difference and where, prefixed with what differed."""
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda default: f"{what}: {default}")


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """Run a test module on one CPU thread, then restore the previous setting.

    The reference tests use tensors of a few kilobytes, too small for
    intra-op parallelism to pay; and when another process keeps a core busy,
    torch's thread pool waits on it at every op (measured: 28 s instead of
    2 s for the functional tests on a 2-core machine).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
