"""The 3D adaptor of DecM (paper Fig. 1c): a Conv3d across the slice axis, mixed in by alpha."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn


class Adaptor3D(nn.Module):
    """Reinterprets a batch of ``n`` consecutive 2D feature maps as one 3D volume.

    Input and output are ``(B * n, C, h, w)``: the 2D layers of DecM see slices as batch items;
    the adaptor folds them into ``(B, C, n, h, w)``, applies GroupNorm, SiLU and a Conv3d whose
    kernel spans ``kernel_size`` slices and ``in_plane`` pixels each way in the slice
    (``adapt(x)``), and combines the result with its input:

    - ``mix`` (the paper): ``out = x + alpha * (adapt(x) - x)``. The identity at ``alpha = 0``,
      but there the conv gets no gradient and alpha only sees a random conv's output, so the
      adaptors stay near the identity (docs/design-notes.md, "DecM").
    - ``residual``: ``out = x + alpha * adapt(x)`` with the conv zero-initialised: also the
      identity when fresh, so DecM starts as the frozen Dec2D, and the conv learns at once.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        alpha_init: float = 0.0,
        norm_num_groups: int = 32,
        form: Literal["mix", "residual"] = "mix",
        in_plane: int = 3,
    ) -> None:
        super().__init__()
        if form not in ("mix", "residual"):
            raise ValueError(f"unknown adaptor form {form!r}; expected mix or residual")
        self.form = form
        groups = min(norm_num_groups, channels)
        while channels % groups:
            groups -= 1
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.act = nn.SiLU()
        self.conv = nn.Conv3d(
            channels,
            channels,
            (kernel_size, in_plane, in_plane),
            padding=(kernel_size // 2, in_plane // 2, in_plane // 2),
        )
        if form == "residual":
            nn.init.zeros_(self.conv.weight)
            nn.init.zeros_(self.conv.bias)
        # Shape (1,), not a 0-dim scalar: DeepSpeed broadcasts parameters viewed as bytes,
        # which fails for 0-dim tensors.
        self.alpha = nn.Parameter(torch.full((1,), float(alpha_init)))

    def forward(self, x: torch.Tensor, num_slices: int) -> torch.Tensor:
        bn, c, h, w = x.shape
        vol = x.reshape(bn // num_slices, num_slices, c, h, w).transpose(1, 2)
        adapted = self.conv(self.act(self.norm(vol))).transpose(1, 2).reshape(bn, c, h, w)
        if self.form == "residual":
            return x + self.alpha.to(x.dtype) * adapted
        return x + self.alpha.to(x.dtype) * (adapted - x)
