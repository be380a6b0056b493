"""The 3D adaptor of DecM (paper Fig. 1c): a Conv3d across the slice axis, mixed in by alpha."""

from __future__ import annotations

import torch
from torch import nn


class Adaptor3D(nn.Module):
    """Reinterprets a batch of ``n`` consecutive 2D feature maps as one 3D volume.

    Input and output are ``(B * n, C, h, w)``: the 2D layers of DecM see slices as batch items;
    the adaptor folds them into ``(B, C, n, h, w)``, applies GroupNorm, SiLU and a Conv3d whose
    kernel spans ``kernel_size`` slices, and mixes the result with its input:
    ``out = x + alpha * (adapt(x) - x)``. With ``alpha = 0`` the adaptor is the identity, so a
    fresh DecM decodes exactly like the frozen Dec2D it was built from.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        alpha_init: float = 0.0,
        norm_num_groups: int = 32,
    ) -> None:
        super().__init__()
        groups = min(norm_num_groups, channels)
        while channels % groups:
            groups -= 1
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.act = nn.SiLU()
        self.conv = nn.Conv3d(
            channels, channels, (kernel_size, 3, 3), padding=(kernel_size // 2, 1, 1)
        )
        # Shape (1,), not a 0-dim scalar: DeepSpeed broadcasts parameters viewed as bytes,
        # which fails for 0-dim tensors.
        self.alpha = nn.Parameter(torch.full((1,), float(alpha_init)))

    def forward(self, x: torch.Tensor, num_slices: int) -> torch.Tensor:
        bn, c, h, w = x.shape
        vol = x.reshape(bn // num_slices, num_slices, c, h, w).transpose(1, 2)
        adapted = self.conv(self.act(self.norm(vol))).transpose(1, 2).reshape(bn, c, h, w)
        return x + self.alpha.to(x.dtype) * (adapted - x)
