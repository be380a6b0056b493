"""DecM: the multi-slice decoder (paper Sec. 2.1.4, Fig. 1b-c, Eq. 1).

Dec2D's 2D layers, frozen, run on each latent slice independently; a learnable 3D adaptor after
each residual block convolves across the slices of the batch. Decoding modes:

- ``exact`` (Eq. 1): each output slice i is the center of a window of k latent slices.
- ``chunked``: a chunk of n consecutive slices goes through the 2D layers once and the
  adaptors convolve across the whole chunk; the caller overlaps chunks by a halo.
"""

from __future__ import annotations

import torch
from monai.networks.nets.autoencoderkl import AEKLResBlock, Upsample
from torch import nn

from caldm.config import AdaptorConfig
from caldm.nn.blocks.adaptor import Adaptor3D
from caldm.nn.blocks.checkpointing import enable_checkpointing
from caldm.nn.nets.ae2d import Dec2D


def resblock_levels(dec2d: Dec2D) -> list[int]:
    """The decoder level (0 = lowest resolution) of each residual block, in forward order."""
    levels, level = [], 0
    for block in dec2d.blocks:
        if isinstance(block, AEKLResBlock):
            levels.append(level)
        elif isinstance(block, Upsample):
            level += 1
    return levels


class Adaptors(nn.Module):
    """The trainable part of DecM: one :class:`Adaptor3D` per (selected) decoder residual block.

    Stored as its own bundle module (``adaptors.safetensors``) so that DecM = Dec2D + adaptors.
    Keys of ``adaptors`` are the indices of the residual blocks in ``Dec2D.blocks``.
    """

    def __init__(self, dec2d: Dec2D, cfg: AdaptorConfig, norm_num_groups: int = 32) -> None:
        super().__init__()
        levels = resblock_levels(dec2d)
        res_idx = [i for i, b in enumerate(dec2d.blocks) if isinstance(b, AEKLResBlock)]
        self.adaptors = nn.ModuleDict()
        for idx, level in zip(res_idx, levels):
            if cfg.levels is None or level in cfg.levels:
                ch = dec2d.blocks[idx].out_channels
                self.adaptors[str(idx)] = Adaptor3D(
                    ch, cfg.kernel_size, cfg.alpha_init, norm_num_groups, cfg.form, cfg.in_plane
                )

    def halo(self) -> int:
        """Slices each side that influence an output slice (the adaptors' receptive field)."""
        return sum(a.conv.kernel_size[0] // 2 for a in self.adaptors.values())

    def checkpoint_activations(self) -> None:
        """Keep only each adaptor's input for backward (its norm, activation and conv are
        recomputed): the adaptor stage's activations are full-resolution volumes."""
        enable_checkpointing(self.adaptors.values())


class DecM(nn.Module):
    """``(B, n, c, H', W')`` latent slices -> ``(B, n, 1, H, W)`` image slices.

    ``adaptors=None`` (or :meth:`forward` with ``use_adaptors=False``) decodes slice by slice,
    identical to Dec2D.
    """

    def __init__(self, dec2d: Dec2D, adaptors: Adaptors | None) -> None:
        super().__init__()
        self.dec2d = dec2d
        self.adaptors = adaptors

    def forward(self, z: torch.Tensor, use_adaptors: bool = True) -> torch.Tensor:
        b, n = z.shape[:2]
        table = self.adaptors.adaptors if (use_adaptors and self.adaptors is not None) else {}

        def adapt(i: int, h: torch.Tensor) -> torch.Tensor:
            return table[str(i)](h, n) if str(i) in table else h

        h = self.dec2d.run(z.flatten(0, 1), adapt)
        return h.reshape(b, n, *h.shape[1:])

    def decode_center(self, window: torch.Tensor) -> torch.Tensor:
        """Eq. 1: ``(B, k, c, H', W')`` -> the center image slice ``(B, 1, H, W)``."""
        return self.forward(window)[:, window.shape[1] // 2]

    def checkpoint_activations(self) -> None:
        enable_checkpointing(self.dec2d.blocks)
