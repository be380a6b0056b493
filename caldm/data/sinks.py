"""Where streamed image slices go: ``sink(start_index, slices)`` with a host array of
consecutive slices ``(n, H, W)`` (from :class:`caldm.nn.inferers.SliceDecoder`).
:class:`NiftiSink` assembles them and writes one NIfTI file atomically at the end;
:class:`ArraySink` just keeps the volume.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from caldm.data.io import write_volume
from caldm.errors import CaldmError

Sink = Callable[[int, np.ndarray], None]


class ArraySink:
    """Collects streamed slices into a host array ``(D, H, W)``."""

    def __init__(self, shape: tuple[int, int, int], dtype: np.dtype | type = np.uint8) -> None:
        self.volume = np.zeros(shape, dtype=dtype)
        self.filled = np.zeros(shape[0], dtype=bool)

    def __call__(self, start: int, slices: np.ndarray) -> None:
        self.volume[start : start + len(slices)] = slices
        self.filled[start : start + len(slices)] = True

    def result(self) -> np.ndarray:
        missing = np.flatnonzero(~self.filled)
        if missing.size:
            raise RuntimeError(f"slices {missing[:5].tolist()}... were never written")
        return self.volume


class NiftiSink(ArraySink):
    """Assembles streamed slices on the host; :meth:`close` writes the NIfTI file atomically.

    Nothing is written unless every slice arrived, so an interrupted run leaves no partial
    file (and an existing file at ``url`` is only replaced by a complete one).
    """

    def __init__(
        self,
        url: str,
        shape: tuple[int, int, int],
        affine: np.ndarray,
        dtype: np.dtype | type = np.uint8,
    ) -> None:
        super().__init__(shape, dtype)
        self.url = url
        self.affine = affine

    def close(self) -> None:
        try:
            volume = self.result()
        except RuntimeError as exc:
            raise CaldmError(f"{self.url}: not written, {exc}") from None
        write_volume(self.url, volume, self.affine)
