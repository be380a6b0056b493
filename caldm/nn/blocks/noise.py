"""Per-pixel noise inputs for Dec2D (StyleGAN's noise injection), keyed by the latent slice.

Speckle is an interference pattern, not anatomy: the latent (8x smaller each way) cannot carry
it, and a deterministic decoder trained with L1 draws its mean, a smooth image. With a noise
image added after the full-resolution residual blocks, times a learned per-channel scale
(zero at the start, so a fresh decoder is the plain one), the adversarial and perceptual terms
can teach the decoder to draw speckle of the right strength and grain instead.

In training the noise is fresh (``torch.randn``). In evaluation it is a fixed function of the
latent slice (:func:`latent_key`, :func:`keyed_normal`): a slice decodes to the same image
whichever batch, chunk or Eq. 1 window it is decoded in, so exact and chunked decoding agree
and generation stays reproducible for a seed, and different slices get different speckle.
"""

from __future__ import annotations

import torch
from torch import nn

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32) of int64 values in [0, 2^32), elementwise."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def latent_key(z: torch.Tensor) -> torch.Tensor:
    """``(B, c, h, w)`` latent slices -> ``(B,)`` int64 keys, one hash of each slice's values.

    A slice's key depends on its own values only (not on the batch around it). Values are
    quantised to 1/64 first, so that a latent that differs only in the last bits of float
    arithmetic (another batch size, bf16 vs fp32 upstream) usually keeps its key.
    """
    q = torch.round(z.detach().float() * 64).long().flatten(1)
    weights = _mix32(torch.arange(q.shape[1], device=z.device, dtype=torch.long) + 0x9E3779B9)
    return _mix32((q * weights).sum(1))


def keyed_normal(key: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B,)`` keys -> ``(B, 1, H, W)`` float32 standard normal noise, a function of the key."""
    h, w = size
    pixel = _mix32(torch.arange(h * w, device=key.device, dtype=torch.long) + 0x632BE5AB)
    # key and pixel each hashed before they meet: with a sum, two keys whose difference is a
    # multiple of the pixel step would give one image shifted (a test in tests/test_nn.py)
    base = _mix32(_mix32(key)[:, None] ^ pixel[None])
    u1 = (_mix32(base).float() + 1.0) / 4294967297.0  # (0, 1]: log is finite
    u2 = _mix32(base ^ 0x85EBCA6B).float() / 4294967296.0  # a second draw per pixel
    normal = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * torch.pi * u2)  # Box-Muller
    return normal.reshape(-1, 1, h, w)


class NoiseInjection(nn.Module):
    """``x + scale * noise``: one noise image per slice, a learned scale per channel."""

    def __init__(self, channels: int, salt: int = 0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.salt = salt  # each injection point draws its own noise from the same key

    def forward(self, x: torch.Tensor, key: torch.Tensor | None) -> torch.Tensor:
        if key is None:
            # torch's global generator: the training loop seeds it from train.seed and the
            # rank, so a run is reproducible for its seed
            noise = torch.randn(x.shape[0], 1, *x.shape[2:], device=x.device, dtype=x.dtype)
        else:
            noise = keyed_normal(_mix32(key + self.salt), tuple(x.shape[2:])).to(x.dtype)
        return x + self.scale.to(x.dtype) * noise
