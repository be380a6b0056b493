"""Peak-memory accounting on the meta device: run the real code, allocate nothing.

Tensors on ``meta`` have shapes, dtypes and storages but no data. :class:`PeakMemory` is a
``TorchDispatchMode`` that sees every tensor an operator creates (forward, backward and
in-place optimizer math alike), counts its storage's bytes while the storage is alive (weak
references tell when it dies) and keeps the high-water mark. Tensors that existed before the
mode started (parameters, buffers) are passed in as a baseline.

What it does not see: allocator rounding and fragmentation, cuDNN/cuBLAS workspaces, the CUDA
context. Benchmarks on a GPU report the measured peak next to this figure.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[id(st)] = st.nbytes()
    return sum(seen.values())


def module_bytes(*modules: torch.nn.Module) -> int:
    """Parameters and buffers of ``modules`` (shared storages counted once)."""
    return tensor_bytes(t for m in modules for t in [*m.parameters(), *m.buffers()])


class PeakMemory(TorchDispatchMode):
    """``with PeakMemory(baseline) as pm: ...`` then ``pm.peak`` (bytes, baseline included).

    ``device_type`` is the device whose tensors are counted: ``meta`` for accounting; ``cpu``
    lets a CPU dry run of a GPU benchmark count what it really allocates the same way.
    """

    def __init__(self, baseline: int = 0, device_type: str = "meta") -> None:
        super().__init__()
        self.baseline = baseline
        self.device_type = device_type
        self.current = baseline
        self.peak = baseline
        self._live: dict[int, weakref.ref] = {}

    def _free(self, key: int, nbytes: int) -> None:
        if self._live.pop(key, None) is not None:
            self.current -= nbytes

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self._live and self._live[key]() is st:
            return
        nbytes = st.nbytes()
        self._live[key] = weakref.ref(st, lambda _, k=key, n=nbytes: self._free(k, n))
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # views and in-place ops return the storage of an input: no new memory
        inputs = {
            id(t.untyped_storage())
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and t.device.type == self.device_type
        }
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.device.type == self.device_type:
                if id(leaf.untyped_storage()) not in inputs:
                    self._track(leaf)
        return out
