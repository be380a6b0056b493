"""f_sr: latent uniaxial super-resolution, z ``(c, D', H', W')`` -> z_sr ``(c, D, H', W')``."""

from __future__ import annotations

import torch
from monai.networks.nets.autoencoderkl import AEKLResBlock
from torch import nn

from caldm.config import FSRConfig
from caldm.nn.blocks.checkpointing import enable_checkpointing
from caldm.nn.blocks.uniaxial import UniaxialUpsample


def _groups(channels: int, wanted: int) -> int:
    g = min(wanted, channels)
    while channels % g:
        g -= 1
    return g


class FSR(nn.Module):
    """3D residual blocks and slice-axis upsampling: ``len(channels) - 1`` doublings of D.

    ``channels[i]`` is the width at the i-th scale (coarse to fine); each scale has
    ``num_res_blocks`` residual blocks and all but the last end with a uniaxial upsample.
    """

    def __init__(self, cfg: FSRConfig, latent_channels: int = 4) -> None:
        super().__init__()
        chans = cfg.channels
        self.conv_in = nn.Conv3d(latent_channels, chans[0], 3, padding=1)
        blocks: list[nn.Module] = []
        width = chans[0]
        for i, out in enumerate(chans):
            for _ in range(cfg.num_res_blocks):
                blocks.append(
                    AEKLResBlock(3, width, _groups(width, cfg.norm_num_groups), 1e-6, out)
                )
                width = out
            if i < len(chans) - 1:
                blocks.append(UniaxialUpsample(width))
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = nn.GroupNorm(_groups(width, cfg.norm_num_groups), width, eps=1e-6)
        self.conv_out = nn.Conv3d(width, latent_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.blocks:
            h = block(h)
        return self.conv_out(torch.nn.functional.silu(self.norm_out(h)))

    def checkpoint_activations(self) -> None:
        enable_checkpointing(self.blocks)
