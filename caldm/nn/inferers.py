"""Streaming slice decoding: refined latent slices in, image slices out, a window at a time.

:class:`SliceDecoder` receives the refined latent slices z_hr_0 .. z_hr_{D-1} in order, in
batches of any size, decodes every output slice as soon as the latent slices it depends on have
arrived, hands the decoded slices to a sink and forgets the latents no later output needs. Only
a window of ``O(chunk + context)`` latent slices and one decoder batch live on the device,
however many slices the volume has.

Two decoding modes (DecM, :mod:`caldm.nn.nets.dec_m`):

- ``exact`` (Eq. 1): output slice i is the center of DecM applied to the k latent slices
  i - k//2 .. i + k//2. Every latent slice passes through the 2D layers k times.
- ``chunked``: ``chunk`` consecutive output slices are decoded together from the chunk plus
  ``halo`` latent slices each side; every latent slice passes through the 2D layers
  (chunk + 2 halo) / chunk times, and the adaptors see real neighbours instead of the window
  edge.

At the volume's ends both modes replicate the first and last latent slice.

Sinks (:mod:`caldm.data.sinks`) receive ``(start_index, slices)``: a host array of consecutive
image slices ``(n, H, W)``. Like MONAI's inferers, this runs a network over an input too large
to take at once and is kept apart from the networks themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from caldm.nn.nets.dec_m import DecM

DecodeMode = Literal["exact", "chunked"]


class SliceDecoder:
    """Decode a stream of latent slices ``(n, c, H', W')`` into image slices ``(n, H, W)``.

    Args:
        decm: the multi-slice decoder (Dec2D + adaptors), in eval mode on the device.
        num_slices: D, the number of slices of the volume.
        mode: ``exact`` or ``chunked``.
        k: DecM's window (Eq. 1), used in ``exact`` mode.
        chunk: output slices decoded per DecM call in ``chunked`` mode; in ``exact`` mode
            ``max(1, chunk // k)`` windows go through DecM together, so that both modes put
            about the same number of slices through the decoder at once.
        halo: latent slices of context each side of a chunk (``chunked`` mode).
        emit: called with ``(start_index, decoded)`` for each decoded group of slices;
            ``decoded`` is ``(n, 1, H, W)`` on the device, in the decoder's dtype.
        dtype: the decoder's input dtype.
    """

    def __init__(
        self,
        decm: DecM,
        num_slices: int,
        mode: DecodeMode,
        k: int,
        chunk: int,
        halo: int,
        emit: Callable[[int, torch.Tensor], None],
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if mode not in ("exact", "chunked"):
            raise ValueError(f"unknown decode mode {mode!r}; expected exact or chunked")
        self.decm = decm
        self.num_slices = num_slices
        self.mode = mode
        self.k = k
        self.context = k // 2 if mode == "exact" else halo
        self.group = max(1, chunk // k) if mode == "exact" else max(1, chunk)
        self.emit = emit
        self.dtype = dtype
        self.buffer: torch.Tensor | None = None  # latent slices [buffer_start, received)
        self.buffer_start = 0
        self.received = 0
        self.next_out = 0

    def push(self, z: torch.Tensor) -> None:
        """Add the next latent slices (in order) and decode all that can be decoded now."""
        if self.received + z.shape[0] > self.num_slices:
            raise ValueError(f"more than {self.num_slices} latent slices pushed")
        self.buffer = z if self.buffer is None else torch.cat([self.buffer, z])
        self.received += z.shape[0]
        self._drain()

    def close(self) -> None:
        """Check that the whole volume was decoded."""
        self._drain()
        if self.next_out != self.num_slices:
            raise RuntimeError(
                f"decoded {self.next_out} of {self.num_slices} slices: latent slices missing"
            )

    def _drain(self) -> None:
        last = self.num_slices - 1
        while self.next_out < self.num_slices:
            start = self.next_out
            stop = min(start + self.group, self.num_slices)
            if min(stop - 1 + self.context, last) >= self.received:
                return  # a later latent slice is still to come
            self.emit(start, self._decode(start, stop))
            self.next_out = stop
            # keep only what later outputs can still reach
            keep_from = max(0, stop - self.context)
            if keep_from > self.buffer_start:
                self.buffer = self.buffer[keep_from - self.buffer_start :]
                self.buffer_start = keep_from

    def _gather(self, index: torch.Tensor) -> torch.Tensor:
        """Latent slices at volume indices ``index`` (clamped: replicate at the ends)."""
        index = index.clamp(0, self.num_slices - 1) - self.buffer_start
        return self.buffer.index_select(0, index.to(self.buffer.device)).to(self.dtype)

    def _decode(self, start: int, stop: int) -> torch.Tensor:
        c = self.context
        if self.mode == "chunked":
            z = self._gather(torch.arange(start - c, stop + c))
            return self.decm(z[None])[0, c : c + stop - start]
        offsets = torch.arange(-c, c + 1)
        windows = torch.stack([self._gather(i + offsets) for i in range(start, stop)])
        return self.decm.decode_center(windows)
