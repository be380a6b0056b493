"""The noise schedule of the forward process and conversions between model parameterisations.

``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``. A model predicts either ``eps`` or
``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0``; :meth:`NoiseSchedule.to_x0_eps` turns either
into the pair (x_0, eps) that the samplers need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from caldm.config import DiffusionConfig

Prediction = Literal["epsilon", "v_prediction"]


def make_betas(kind: str, n: int, start: float, end: float) -> torch.Tensor:
    if kind == "linear":
        return torch.linspace(start, end, n, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
    if kind == "cosine":
        s = 0.008
        steps = torch.arange(n + 1, dtype=torch.float64) / n
        abar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {kind!r}")


@dataclass(frozen=True)
class NoiseSchedule:
    """Discrete-time variance-preserving schedule with ``T`` steps (float64 internally)."""

    alphas_cumprod: torch.Tensor
    prediction_type: Prediction = "epsilon"
    num_train_timesteps: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_train_timesteps", len(self.alphas_cumprod))

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> NoiseSchedule:
        betas = make_betas(cfg.beta_schedule, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end)
        return cls(torch.cumprod(1.0 - betas, 0), cfg.prediction_type)

    def abar(self, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """abar_t broadcast to ``like``'s shape; ``t = -1`` means abar = 1 (clean data)."""
        # index on like's device: works for cuda and for meta tensors (memory accounting)
        t = torch.as_tensor(t, device=like.device).long()
        table = self.alphas_cumprod.to(device=like.device, dtype=torch.float32)
        padded = torch.cat([table, table.new_ones(1)])
        index = torch.where(t < 0, torch.full_like(t, len(table)), t)
        # index_select, not padded[index]: a 0-d index would call .item(), impossible on meta
        a = padded.index_select(0, index.reshape(-1)).reshape(index.shape)
        return a.reshape(a.shape + (1,) * (like.dim() - a.dim()))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.abar(t, x0)
        return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output."""
        if self.prediction_type == "epsilon":
            return noise
        a = self.abar(t, x0)
        return (a.sqrt() * noise.float() - (1 - a).sqrt() * x0.float()).to(x0.dtype)

    def to_x0_eps(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_0, eps) implied by a model output at ``x_t``, computed in float32."""
        a = self.abar(t, x_t)
        out, x = model_output.float(), x_t.float()
        if self.prediction_type == "epsilon":
            eps = out
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        else:
            x0 = a.sqrt() * x - (1 - a).sqrt() * out
            eps = (1 - a).sqrt() * x + a.sqrt() * out
        return x0, eps
