"""Pytest set-up shared by every test.

The device is chosen once, here, before any kernel module is imported:
CUDA when present, otherwise the CPU with Triton's interpreter
(TRITON_INTERPRET=1), which runs the real kernels in NumPy, one program after
another. Setting the variable later is too late: triton reads it when a
kernel is decorated, that is when `kernels` is first imported.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if HAS_CUDA else "cpu"

if not HAS_CUDA:
    # The CPU suite runs many tiny ops; with a 2-thread pool each one waits on the
    # other core, which CI shares with the interpreter, and small ops get ~40x slower.
    torch.set_num_threads(1)


def pytest_report_header(config):
    mode = "CUDA" if HAS_CUDA else "CPU, Triton interpreter"
    return f"attention playground: device={DEVICE} ({mode}), torch {torch.__version__}"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
