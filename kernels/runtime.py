"""Where the kernels run: a CUDA GPU, or the CPU under Triton's interpreter.

Triton reads TRITON_INTERPRET when a kernel is decorated, which happens when
`kernels` is first imported, so the variable must be set before that import:

    TRITON_INTERPRET=1 python my_script.py

The interpreter runs each program one after another in NumPy. That makes the
real kernels debuggable on a laptop (`breakpoint()` inside a kernel works),
but it differs from a GPU in three ways the kernels account for:
  * NumPy has no bfloat16, and bf16 tiles give wrong numbers: kernels upcast
    their tiles to fp32 right after loading (the UPCAST constexpr flag);
  * autotuning needs a GPU driver to time configs: one fixed config is used;
  * programs never run concurrently, so races cannot show on the CPU.
"""
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# float64 is there for torch.autograd.gradcheck; the kernels then accumulate in float64 too.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
LOW_PRECISION_DTYPES = (torch.float16, torch.bfloat16)

CPU_HINT = (
    "Triton kernels need a CUDA GPU, or Triton's interpreter on the CPU: set "
    "TRITON_INTERPRET=1 in the environment before importing `kernels` "
    "(e.g. `TRITON_INTERPRET=1 python your_script.py`)"
)


def check_runnable(t: torch.Tensor, name: str) -> None:
    """Raise a clear error if a kernel cannot run on tensor `t` here."""
    if t.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
        raise TypeError(f"{name} has dtype {t.dtype}; the Triton kernels support {names}")
    if t.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(f"{name} is on {t.device} but the Triton interpreter is off. {CPU_HINT}")


def upcast_tiles(dtype: torch.dtype) -> bool:
    """Whether kernels must lift tiles to fp32 after loading (low precision under the interpreter)."""
    return INTERPRET and dtype in LOW_PRECISION_DTYPES


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs are multiplied in true fp32 ("ieee"), never silently in tf32."""
    return "tf32" if dtype in LOW_PRECISION_DTYPES and not upcast_tiles(dtype) else "ieee"


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics and accumulators: fp32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32
