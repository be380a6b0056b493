"""Diff_slice, the refiner: a 2D diffusion UNet generating z_hr_i guided by z_sr_i (Sec. 2.2).

Input channels: the noisy z_hr_i (c), then z_sr_i (c), then optional condition features.
"""

from __future__ import annotations

from caldm.config import ModelConfig
from caldm.nn.nets.diffusion_unet import DiffusionUNet


class DiffSlice(DiffusionUNet):
    def __init__(self, cfg: ModelConfig, cond_channels: int = 0) -> None:
        c = cfg.latent_channels
        super().__init__(
            cfg.refiner, spatial_dims=2, in_channels=2 * c + cond_channels, out_channels=c
        )
