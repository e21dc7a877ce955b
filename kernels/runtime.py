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
import functools
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


def check_runnable(t: torch.Tensor, name: str, dtypes=SUPPORTED_DTYPES) -> None:
    """Raise a clear error if a kernel cannot run on tensor `t` here (in one of `dtypes`)."""
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {t.dtype}; the Triton kernels support {names}")
    if t.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(f"{name} is on {t.device} but the Triton interpreter is off. {CPU_HINT}")


def check_flag(value, name: str) -> bool:
    """A bool option as a bool; anything else (causal="no", a tensor, None) is a clear error, never truthiness."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {value!r}")
    return value


class on_device:
    """`with on_device(device):` Triton launches on `device`, and descriptor scratch is allocated there.

    Triton launches on the current CUDA device, which need not be the inputs'
    (a model spread over two GPUs has layers on cuda:1): every launcher enters
    this first. A no-op on the CPU.
    """

    __slots__ = ("guard",)

    def __init__(self, device: torch.device):
        self.guard = torch.cuda.device(device) if device.type == "cuda" else None

    def __enter__(self):
        if self.guard is not None:
            self.guard.__enter__()
        return self

    def __exit__(self, *exc):
        if self.guard is not None:
            self.guard.__exit__(*exc)
        return False


def upcast_tiles(dtype: torch.dtype) -> bool:
    """Whether kernels must lift tiles to fp32 after loading (low precision under the interpreter)."""
    return INTERPRET and dtype in LOW_PRECISION_DTYPES


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs are multiplied in true fp32 ("ieee"), never silently in tf32."""
    return "tf32" if dtype in LOW_PRECISION_DTYPES and not upcast_tiles(dtype) else "ieee"


def has_tma(device: torch.device) -> bool:
    """Whether `device` is a GPU with TMA, the copy engine of tensor-descriptor loads (Hopper, sm_90, and later).

    False under the interpreter, which runs descriptor loads as ordinary masked loads.
    """
    return device.type == "cuda" and not INTERPRET and _capability(device.index)[0] >= 9


@functools.lru_cache(maxsize=None)
def _capability(index):
    """A GPU's compute capability, asked once per device: it sits on every launch's path."""
    return torch.cuda.get_device_capability(index)


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics and accumulators: fp32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _skip_repatching_in_device_calls() -> None:
    """Make calls of this project's @triton.jit helpers cheap under the interpreter.

    Triton's interpreter patches `triton.language` when a kernel launches, and
    again at every call of a helper from inside it (InterpretedFunction.__call__),
    although the launch's patches are still in place: about 0.6 ms per call,
    a quarter of the CPU suite's time with the kernels' small helpers. For a
    helper that sees `triton.language` only as `tl` (ours), the launch has
    patched exactly that module, so the repeat is skipped; Triton's own helpers
    (tl.zeros lives in a module that sees triton.language.core) keep the full
    path. Installed only if Triton's method is the one it was written against
    (3.6 to 3.9).
    """
    import inspect

    import triton.language as tl
    from triton.runtime import interpreter

    function = getattr(interpreter, "InterpretedFunction", None)
    try:
        source = inspect.getsource(function.__call__)
    except (AttributeError, OSError, TypeError):
        return
    if "_patch_lang(self.fn)" not in source or "self.rewrite()" not in source:
        return
    original = function.__call__
    patched_by_launch = {}

    def __call__(self, *args, **kwargs):
        fn = self.fn
        if fn not in patched_by_launch:
            langs = [v for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)]
            patched_by_launch[fn] = langs == [tl]
        if not patched_by_launch[fn]:
            return original(self, *args, **kwargs)
        rewritten = self.rewrite()
        try:
            return rewritten(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e

    function.__call__ = __call__


if INTERPRET:
    _skip_repatching_in_device_calls()
