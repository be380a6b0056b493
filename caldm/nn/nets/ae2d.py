"""Enc2D and Dec2D: the LDM-style KL autoencoder on single B-scans (f = 8, c = 4 at paper scale).

Built from MONAI's AutoencoderKL encoder and decoder. Enc2D also serves as the auxiliary 2D
encoder of the refiner (z_hr_i = Enc2D(x_i)); Dec2D is frozen inside DecM and in the nhae stage.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.networks.nets.autoencoderkl import AEKLResBlock, Decoder, Encoder, Upsample
from torch import nn

from caldm.config import AE2DConfig
from caldm.nn.blocks.checkpointing import enable_checkpointing
from caldm.nn.blocks.noise import NoiseInjection, latent_key


def _levels(cfg: AE2DConfig) -> dict:
    n = len(cfg.channels)
    return dict(
        spatial_dims=2,
        channels=cfg.channels,
        num_res_blocks=[cfg.num_res_blocks] * n,
        norm_num_groups=cfg.norm_num_groups,
        norm_eps=1e-6,
        attention_levels=[False] * n,
        with_nonlocal_attn=cfg.attention,
    )


class Enc2D(nn.Module):
    """B-scan ``(B, 1, H, W)`` -> latent mean and log-variance, each ``(B, c, H/f, W/f)``."""

    def __init__(self, cfg: AE2DConfig, latent_channels: int = 4) -> None:
        super().__init__()
        self.encoder = Encoder(in_channels=1, out_channels=cfg.channels[-1], **_levels(cfg))
        self.quant_conv_mu = nn.Conv2d(cfg.channels[-1], latent_channels, 1)
        self.quant_conv_log_var = nn.Conv2d(cfg.channels[-1], latent_channels, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x
        for block in self.encoder.blocks:
            h = block(h)
        log_var = self.quant_conv_log_var(h).clamp(-30.0, 20.0)
        return self.quant_conv_mu(h), log_var

    def checkpoint_activations(self) -> None:
        enable_checkpointing(self.encoder.blocks)


class Dec2D(nn.Module):
    """Latent slice ``(B, c, H', W')`` -> image slice ``(B, 1, H, W)``.

    ``blocks`` is the decoder's sequence of layers; DecM walks the same sequence
    (:meth:`run`) and inserts 3D adaptors after each residual block. With ``cfg.noise`` a
    :class:`~caldm.nn.blocks.noise.NoiseInjection` follows each full-resolution residual block
    (fresh noise in training, noise keyed by the latent slice in evaluation).
    """

    def __init__(self, cfg: AE2DConfig, latent_channels: int = 4) -> None:
        super().__init__()
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.decoder = Decoder(
            in_channels=latent_channels,
            out_channels=1,
            **_levels(cfg),
        )
        self.noise = nn.ModuleDict()
        if cfg.noise:
            last = sum(isinstance(b, Upsample) for b in self.blocks)
            level = 0
            for i, block in enumerate(self.blocks):
                level += isinstance(block, Upsample)
                if level == last and isinstance(block, AEKLResBlock):
                    self.noise[str(i)] = NoiseInjection(block.out_channels, salt=i)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.decoder.blocks

    def run(
        self, z: torch.Tensor, after: Callable[[int, torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Decode ``(N, c, H', W')``; ``after(i, h)`` follows block ``i`` (DecM's adaptors)."""
        key = latent_key(z) if len(self.noise) and not self.training else None
        h = self.post_quant_conv(z)
        for i, block in enumerate(self.blocks):
            h = block(h)
            if str(i) in self.noise:
                h = self.noise[str(i)](h, key)
            if after is not None:
                h = after(i, h)
        return h

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.run(z)

    def checkpoint_activations(self) -> None:
        enable_checkpointing(self.blocks)
