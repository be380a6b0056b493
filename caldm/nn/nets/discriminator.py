"""The patch discriminator of the autoencoder stages (MONAI's PatchDiscriminator, 2D)."""

from __future__ import annotations

from monai.networks.nets import PatchDiscriminator

from caldm.config import DiscriminatorConfig


def build_discriminator(cfg: DiscriminatorConfig) -> PatchDiscriminator:
    """A PatchGAN on single B-scans ``(B, 1, H, W)``; its last output is the logit map."""
    return PatchDiscriminator(
        spatial_dims=2,
        channels=cfg.channels,
        in_channels=1,
        out_channels=1,
        num_layers_d=cfg.num_layers,
        norm="INSTANCE",
    )
