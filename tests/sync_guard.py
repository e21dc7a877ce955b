"""`no_host_sync()`: fail, naming the operation, on anything inside the block that waits for the device.

A host-device sync is any step whose result the host needs before it can go
on: a value read back (`.item()`, `.tolist()`, `bool(t)`, `int(t)`), an
output whose size depends on the data (`nonzero`, a boolean-mask index,
`masked_select`, `unique`), or a copy from the device to the host. On a GPU
each one stalls the host until the queue drains and makes the code unusable
inside CUDA-graph capture, once per layer in a decode loop.

The check works on the CPU too, where there is no device to wait for:

  * a TorchDispatchMode sees every aten operation the block dispatches and
    fails on the ones that sync (SYNC_OPS, boolean-mask indexing, and any copy
    to the CPU from another device);
  * `torch.Tensor.item`, `.tolist`, `.numpy`, `__bool__`, `__int__`,
    `__float__` and `__index__` are replaced for the duration of the block,
    since on a CPU tensor some of them read memory without dispatching
    anything.

Triton's interpreter copies each kernel argument to a host tensor and back
(CPU to CPU under the interpreter): those copies are not syncs and pass. The
operations the guard sees are the block's own, and those of the custom ops it
calls (whose implementations run below the mode only for ops the mode hands
on). Use:

    from tests.sync_guard import no_host_sync
    with no_host_sync():
        decode_attention(q, k_cache, v_cache, lengths)
"""
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


class HostSyncError(AssertionError):
    """A host-device sync inside no_host_sync()."""


# Operations that read device data on the host, or whose output size depends on the data.
SYNC_OPS = {
    aten._local_scalar_dense.default: "reads a value on the host (.item(), int(), float(), bool())",
    aten.item.default: "reads a value on the host",
    aten.is_nonzero.default: "reads a value on the host (bool(tensor))",
    aten.equal.default: "returns a host bool (torch.equal)",
    aten.nonzero.default: "has a data-dependent size (nonzero)",
    aten.nonzero.out: "has a data-dependent size (nonzero)",
    aten.masked_select.default: "has a data-dependent size (masked_select)",
    aten._unique.default: "has a data-dependent size (unique)",
    aten._unique2.default: "has a data-dependent size (unique)",
    aten.unique_dim.default: "has a data-dependent size (unique)",
    aten.unique_consecutive.default: "has a data-dependent size (unique_consecutive)",
}
PATCHED = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")


def _device_of(value):
    return value.device if isinstance(value, torch.Tensor) else None


class _SyncCatcher(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = SYNC_OPS.get(func)
        if reason is None and func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            reason = "has a data-dependent size (repeat_interleave with tensor repeats and no output_size)"
        if reason is None and func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
                reason = "indexes with a boolean mask (an implicit nonzero)"
        if reason is None:
            reason = _device_to_host(func, args, kwargs)
        if reason is not None:
            raise HostSyncError(f"host-device sync inside no_host_sync(): {func} {reason}")
        return func(*args, **kwargs)


def _device_to_host(func, args, kwargs):
    """The reason a copy goes from another device to the CPU, or None."""
    if func in (aten._to_copy.default, aten.to.device, aten.to.dtype_layout):
        source = _device_of(args[0])
        target = kwargs.get("device")
        if target is None and func is aten.to.device and len(args) > 1:
            target = args[1]
        target = torch.device(target) if target is not None else source
    elif func in (aten.copy_.default, aten._copy_from.default, aten._copy_from_and_resize.default):
        destination, source = (args[0], args[1]) if func is aten.copy_.default else (args[1], args[0])
        target, source = _device_of(destination), _device_of(source)
    else:
        return None
    if source is not None and target is not None and target.type == "cpu" and source.type != "cpu":
        return f"copies from {source} to the host"
    return None


def _refuse(name):
    def method(self, *args, **kwargs):
        raise HostSyncError(f"host-device sync inside no_host_sync(): Tensor.{name}() reads the data on the host")
    method.__name__ = name
    return method


@contextlib.contextmanager
def no_host_sync():
    """Within the block, any host-device sync raises HostSyncError naming the operation."""
    saved = {name: torch.Tensor.__dict__.get(name) for name in PATCHED}
    for name in PATCHED:
        setattr(torch.Tensor, name, _refuse(name))
    try:
        with _SyncCatcher():
            yield
    finally:
        for name, original in saved.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)
