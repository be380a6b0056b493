"""Enc3D: the thumbnail encoder of the non-holistic autoencoder.

A 3D KL encoder (MONAI's AutoencoderKL encoder in 3D, without global attention, which would not
fit at 64^3) maps the thumbnail ``(B, 1, D/2, H/2, W/2)`` to z of shape ``(B, c, D', H', W')``.
"""

from __future__ import annotations

import torch
from monai.networks.nets.autoencoderkl import Encoder
from torch import nn

from caldm.config import Enc3DConfig
from caldm.nn.blocks.checkpointing import enable_checkpointing


class Enc3D(nn.Module):
    def __init__(self, cfg: Enc3DConfig, latent_channels: int = 4) -> None:
        super().__init__()
        n = len(cfg.channels)
        self.encoder = Encoder(
            spatial_dims=3,
            in_channels=1,
            channels=cfg.channels,
            out_channels=cfg.channels[-1],
            num_res_blocks=[cfg.num_res_blocks] * n,
            norm_num_groups=cfg.norm_num_groups,
            norm_eps=1e-6,
            attention_levels=[False] * n,
            with_nonlocal_attn=False,
        )
        self.quant_conv_mu = nn.Conv3d(cfg.channels[-1], latent_channels, 1)
        self.quant_conv_log_var = nn.Conv3d(cfg.channels[-1], latent_channels, 1)

    def forward(self, thumbnail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the latent mean and log-variance of z."""
        h = thumbnail
        for block in self.encoder.blocks:
            h = block(h)
        return self.quant_conv_mu(h), self.quant_conv_log_var(h).clamp(-30.0, 20.0)

    def checkpoint_activations(self) -> None:
        enable_checkpointing(self.encoder.blocks)
