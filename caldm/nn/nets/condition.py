"""Condition encoders: a real label -> features on the latent grid, for label-guided sampling.

Two kinds of label (DESIGN.md dataset layout):
- ``layers``: a layer map, class index per voxel, ``(D, H, W)`` (one B-scan: ``(H, W)``);
- ``vessels``: an en-face artery/vein map ``(D, W)`` (one B-scan: its row, ``(W,)``), values
  0 background, 1 artery, 2 vein. It has no depth axis, so its features are broadcast over H'.

For Diff3D the grid is ``(D', H', W')``; for Diff_slice a slice grid ``(H', W')``. The encoder
reads class fractions on twice that grid (:func:`caldm.data.labels.reduce_label`: an
area-averaged one-hot map of the full-resolution label, so thin bands and one-voxel boundary
moves reach it), and a strided conv lands them on the grid.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from caldm.data.labels import VESSEL_CLASSES


class ConditionEncoder(nn.Module):
    """``forward(fractions) -> (B, channels, *grid)``.

    ``fractions``: ``(B, num_classes, *label_grid)`` with ``label_grid`` twice the latent grid
    (without H' for vessels), as :func:`caldm.data.labels.reduce_label` makes them.

    Args:
        kind: ``"layers"`` or ``"vessels"``.
        grid: the latent grid, ``(D', H', W')`` (for Diff3D) or ``(H', W')`` (for Diff_slice).
        num_classes: layer classes (from the data); ignored for vessels.
        channels: feature channels produced.
    """

    def __init__(
        self,
        kind: Literal["layers", "vessels"],
        grid: tuple[int, ...],
        channels: int,
        num_classes: int = 8,
    ) -> None:
        super().__init__()
        if kind not in ("layers", "vessels"):
            raise ValueError(f"unknown condition kind {kind!r}")
        self.kind = kind
        self.grid = tuple(grid)
        self.num_classes = num_classes if kind == "layers" else VESSEL_CLASSES
        # the label's own grid: vessels lack the depth axis H' (always second to last)
        self.label_grid = self.grid if kind == "layers" else self.grid[:-2] + self.grid[-1:]
        dims = len(self.label_grid)
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.embed = nn.Sequential(
            conv(self.num_classes, channels, 3, padding=1),
            nn.SiLU(),
            conv(channels, channels, 4, stride=2, padding=1),
            nn.SiLU(),
            conv(channels, channels, 3, padding=1),
        )
        out_conv = {2: nn.Conv2d, 3: nn.Conv3d}[len(self.grid)]
        self.mix = out_conv(channels, channels, 3, padding=1)

    def forward(self, fractions: torch.Tensor) -> torch.Tensor:
        want = (self.num_classes, *(2 * g for g in self.label_grid))
        if tuple(fractions.shape[1:]) != want:
            raise ValueError(
                f"{self.kind} condition encoder expects class fractions (B, {want}), got "
                f"{tuple(fractions.shape)}; reduce labels with caldm.data.labels.reduce_label"
            )
        feats = self.embed(fractions.to(self.mix.weight.dtype))
        if self.kind == "vessels":  # broadcast the en-face features over depth H'
            feats = feats.unsqueeze(-2).expand(*feats.shape[:-1], self.grid[-2], feats.shape[-1])
        return self.mix(feats)
