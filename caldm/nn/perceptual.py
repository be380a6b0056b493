"""Perceptual distance on VGG16 features, with weights the user provides (never downloaded).

The weights file is a VGG16 state dict (torchvision's layout: ``features.<i>.weight``; other
keys are ignored), as ``.pth`` or ``.safetensors``, at a local path or fsspec URL. The distance
is LPIPS' "baseline" form: unit-normalise each feature map over channels, then average the
squared differences over space, summed over the five VGG stages.
"""

from __future__ import annotations

import io

import torch
import torch.nn.functional as F
from torch import nn

from caldm.errors import ConfigError

# torchvision's VGG16 "D" configuration; the indices of the stage-ending ReLUs are its taps.
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_TAPS = (3, 8, 15, 22, 29)
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    ch = 3
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(ch, int(v), 3, padding=1), nn.ReLU(inplace=False)]
            ch = int(v)
    return nn.Sequential(*layers)


def load_state_dict(url: str) -> dict[str, torch.Tensor]:
    """Read a ``.pth`` or ``.safetensors`` state dict from a path or fsspec URL."""
    import fsspec
    from safetensors.torch import load as load_safetensors

    try:
        with fsspec.open(url, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"{url}: weights file not found") from None
    if url.endswith(".safetensors"):
        return load_safetensors(raw)
    return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)


class PerceptualLoss(nn.Module):
    """``forward(x, y)`` for images in [-1, 1] of shape ``(B, 1, H, W)``; frozen."""

    def __init__(self, weights_url: str) -> None:
        super().__init__()
        self.features = _vgg16_features()
        state = load_state_dict(weights_url)
        own = {
            k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")
        }
        missing = set(self.features.state_dict()) - set(own)
        if missing:
            raise ConfigError(
                f"{weights_url}: not a VGG16 state dict (missing features.{sorted(missing)[0]})"
            )
        self.features.load_state_dict({k: own[k] for k in self.features.state_dict()})
        self.features.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = ((x.repeat(1, 3, 1, 1) + 1) / 2 - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                out.append(F.normalize(x, dim=1, eps=1e-10))
            if i >= _TAPS[-1]:
                break
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return sum((a - b).pow(2).sum(1).mean() for a, b in zip(self._taps(x), self._taps(y)))
