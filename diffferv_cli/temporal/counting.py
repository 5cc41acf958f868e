"""Count what a UNet call asks of the host: torch calls, and the calls that make the host wait for the
device (host syncs). Device-independent: on the CPU nothing ever waits, but the same calls on a GPU would,
so they are counted by what they are, not by how long they take.

    with CallCounter() as counter:
        unet(...)
    counter.torch_calls, counter.syncs, counter.sync_calls   # total, syncs, {name: count}

A host sync is any of:

* reading a tensor's value on the host: `.item()`, `bool()` / `int()` / `float()` of a tensor (seen as
  `aten._local_scalar_dense` / `aten.is_nonzero` at dispatch level), `.tolist()`, `.numpy()`;
* an op whose output size depends on values: `nonzero` / `argwhere`, boolean-mask indexing (its hidden
  `nonzero`), `masked_select`, `unique`, `bincount`, `repeat_interleave` without `output_size`;
* `torch.equal` (returns a Python bool);
* a device-to-host copy: `.cpu()` (counted even on a CPU tensor: it is how code leaves the device),
  `.to("cpu")` / `.to(device=cpu)` of a tensor that is not on the CPU.

Torch calls are the calls a `TorchFunctionMode` sees (functions, tensor methods, properties, modules'
functional calls), the launch-bound cost of a call before any kernel runs.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
# ops that read device memory on the host, or whose output size depends on values
_SYNC_OPS = {
    _aten._local_scalar_dense.default: "item/bool/int/float",
    _aten.is_nonzero.default: "bool",
    _aten.nonzero.default: "nonzero",
    _aten.argwhere.default: "nonzero",
    _aten.masked_select.default: "masked_select",
    _aten.equal.default: "equal",
    _aten._unique2.default: "unique",
    _aten.unique_consecutive.default: "unique",
    _aten.bincount.default: "bincount",
}
_HOST_METHODS = {
    torch.Tensor.tolist: "tolist",
    torch.Tensor.numpy: "numpy",
    torch.Tensor.cpu: "device-to-host copy",
}


def _is_cpu_target(args, kwargs) -> bool:
    """Whether a `Tensor.to(...)` call names the CPU as its target device."""
    for value in (*args[1:], kwargs.get("device")):
        if isinstance(value, str) and value.startswith("cpu"):
            return True
        if isinstance(value, torch.device) and value.type == "cpu":
            return True
    return False


def _has_mask_index(index) -> bool:
    """Whether an indexing key holds a boolean mask (its size depends on the mask's values)."""
    if isinstance(index, torch.Tensor):
        return index.dtype == torch.bool and index.ndim > 0
    if isinstance(index, (tuple, list)):
        return any(_has_mask_index(part) for part in index)
    return False


_INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.index_put_, torch.Tensor.index_put,
             torch.index_put}


class _FunctionCounter(TorchFunctionMode):
    def __init__(self, owner: CallCounter):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.owner.torch_calls += 1
        if func in _HOST_METHODS:
            self.owner._sync(_HOST_METHODS[func])
        elif func is torch.Tensor.to and args[0].device.type != "cpu" and _is_cpu_target(args, kwargs):
            self.owner._sync("device-to-host copy")
        elif func in _INDEXING and len(args) > 1 and _has_mask_index(args[1]):
            self.owner._sync("boolean indexing")
        elif func is torch.repeat_interleave or func is torch.Tensor.repeat_interleave:
            if isinstance(args[1] if len(args) > 1 else kwargs.get("repeats"), torch.Tensor) and \
                    kwargs.get("output_size") is None:
                self.owner._sync("repeat_interleave")
        return func(*args, **kwargs)


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, owner: CallCounter):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = _SYNC_OPS.get(func)
        if name is not None:
            self.owner._sync(name)
        return func(*args, **(kwargs or {}))


class CallCounter:
    """Context manager counting torch calls and host syncs of the code run inside it (this thread)."""

    def __init__(self):
        self.torch_calls = 0
        self.sync_calls: Counter[str] = Counter()
        self._modes = (_FunctionCounter(self), _DispatchCounter(self))

    @property
    def syncs(self) -> int:
        return sum(self.sync_calls.values())

    def _sync(self, name: str) -> None:
        self.sync_calls[name] += 1

    def __enter__(self) -> CallCounter:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
