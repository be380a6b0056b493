"""The denoising UNet shared by Diff3D and Diff_slice: MONAI's DiffusionModelUNet.

Conditioning is by channel concatenation (the noisy latent first, then any guide: z_sr_i for
the refiner, condition-encoder features for label guidance), so a model is fine-tuned for a new
guide by widening its input convolution with zero-initialised weights (:func:`widen_input`):
the widened model starts out computing exactly what the unconditional one did.
"""

from __future__ import annotations

import torch
from monai.networks.nets import DiffusionModelUNet
from torch import nn

from caldm.config import UNetConfig
from caldm.nn.blocks.checkpointing import enable_checkpointing


class DiffusionUNet(nn.Module):
    """``forward(x, t, guide=None)``: predicts epsilon (or v) for ``x`` at timesteps ``t``."""

    def __init__(
        self, cfg: UNetConfig, spatial_dims: int, in_channels: int, out_channels: int
    ) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.out_channels = out_channels
        self.unet = DiffusionModelUNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            num_res_blocks=cfg.num_res_blocks,
            channels=cfg.channels,
            attention_levels=cfg.attention_levels,
            norm_num_groups=cfg.norm_num_groups,
            num_head_channels=cfg.num_head_channels,
            # PyTorch SDPA: memory-efficient attention (flash kernels on GPU).
            use_flash_attention=True,
        )

    @property
    def in_channels(self) -> int:
        return self.unet.conv_in.conv.in_channels

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, guide: torch.Tensor | None = None
    ) -> torch.Tensor:
        if guide is not None:
            x = torch.cat([x, guide.to(x.dtype)], dim=1)
        if x.shape[1] != self.in_channels:
            raise ValueError(f"UNet expects {self.in_channels} input channels, got {x.shape[1]}")
        return self.unet(x, t)

    def checkpoint_activations(self) -> None:
        enable_checkpointing([*self.unet.down_blocks, self.unet.middle_block, *self.unet.up_blocks])


@torch.no_grad()
def widen_input(model: DiffusionUNet, extra_channels: int) -> None:
    """Append ``extra_channels`` zero-initialised input channels (for a new guide)."""
    old = model.unet.conv_in.conv
    new = type(old)(
        old.in_channels + extra_channels,
        old.out_channels,
        old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        bias=old.bias is not None,
    ).to(device=old.weight.device, dtype=old.weight.dtype)
    new.weight.zero_()
    new.weight[:, : old.in_channels] = old.weight
    if old.bias is not None:
        new.bias.copy_(old.bias)
    model.unet.conv_in.conv = new
