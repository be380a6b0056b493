"""Diff3D: the global 3D diffusion UNet on z ``(c, D', H', W')`` (paper Sec. 2.2)."""

from __future__ import annotations

from caldm.config import ModelConfig
from caldm.nn.nets.diffusion_unet import DiffusionUNet


class Diff3D(DiffusionUNet):
    """Denoises z; with label guidance, condition features are concatenated to its input."""

    def __init__(self, cfg: ModelConfig, cond_channels: int = 0) -> None:
        c = cfg.latent_channels
        super().__init__(cfg.diff3d, spatial_dims=3, in_channels=c + cond_channels, out_channels=c)
