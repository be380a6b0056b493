"""The denoising training objective shared by Diff3D and Diff_slice."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from caldm.diffusion.schedule import NoiseSchedule


def diffusion_loss(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    kind: str = "mse",
) -> torch.Tensor:
    """MSE (or L1, ``kind="l1"``, the released code's choice) between the network output and
    its target at random (or given) timesteps."""
    if kind not in ("mse", "l1"):
        raise ValueError(f"unknown diffusion loss {kind!r}; expected mse or l1")
    if t is None:
        t = torch.randint(
            0, schedule.num_train_timesteps, (x0.shape[0],), device=x0.device, generator=generator
        )
    if noise is None:
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    x_t = schedule.add_noise(x0, noise, t)
    distance = F.mse_loss if kind == "mse" else F.l1_loss
    return distance(model(x_t, t).float(), schedule.target(x0, noise, t).float())
