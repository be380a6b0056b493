"""Upsampling along the slice axis only, the building block of f_sr."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class UniaxialUpsample(nn.Module):
    """Doubles D of a ``(B, C, D, H, W)`` tensor (nearest) and smooths with a Conv3d.

    H and W are untouched: f_sr recovers one latent slice per B-scan from a thumbnail latent
    whose in-plane grid already matches the slice autoencoder's.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, (3, 3, 3), padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=(2.0, 1.0, 1.0), mode="nearest")
        return self.conv(x)
