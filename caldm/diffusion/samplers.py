"""Samplers: small stateless objects in the style of diffusers' schedulers.

``timesteps(n)`` gives the descending train-time indices to visit; ``step(...)`` maps a model
output at ``x_t`` to the sample at the next timestep. The schedule travels with the sampler;
state that a multistep method needs (DPM-Solver++'s previous x_0) is passed in and returned,
so one sampler object can serve many volumes at once.

- :class:`DDIM`: Song et al. 2021, any step count, ``eta`` from 0 (deterministic) to 1.
- ``ddpm``: ancestral sampling (Ho et al. 2020, the released code's 1000 steps) is DDIM with
  ``eta = 1``: its noise is the DDPM posterior's, sigma_t^2 = (1 - abar_prev) / (1 - abar_t)
  beta_t at every step, and at any coarser step count the same posterior between visited steps.
- :class:`DPMSolverPP`: DPM-Solver++(2M), Lu et al. 2022, data prediction, multistep order 2
  with a first-order final step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from caldm.diffusion.schedule import NoiseSchedule


def spaced_timesteps(num_train: int, n: int) -> torch.Tensor:
    """``n`` evenly spaced descending timesteps in ``[0, num_train)`` ("leading" spacing)."""
    if not 1 <= n <= num_train:
        raise ValueError(f"steps must be in 1..{num_train}, got {n}")
    step = num_train // n
    return (torch.arange(n - 1, -1, -1) * step).long()


@dataclass(frozen=True)
class DDIM:
    schedule: NoiseSchedule
    eta: float = 0.0

    def timesteps(self, n: int) -> torch.Tensor:
        return spaced_timesteps(self.schedule.num_train_timesteps, n)

    def step(
        self,
        model_output: torch.Tensor,
        t: int,
        t_prev: int,
        x_t: torch.Tensor,
        state: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        """One update from ``t`` to ``t_prev`` (``t_prev = -1``: to clean data).

        With ``eta > 0``, ``noise`` (standard normal, ``x_t``'s shape) is the fresh noise of
        this step; by default it is drawn from ``generator``. Passing it lets a caller derive
        each item's noise from its own seed, independent of how items are batched.
        """
        x0, eps = self.schedule.to_x0_eps(model_output, x_t, t)
        a_t = self.schedule.abar(t, x_t)
        a_prev = self.schedule.abar(t_prev, x_t)
        sigma = self.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0).sqrt()
        x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
        if self.eta > 0:
            if noise is None:
                noise = torch.randn(x_t.shape, generator=generator, device=x_t.device)
            x_prev = x_prev + sigma * noise
        return x_prev.to(x_t.dtype), None


@dataclass(frozen=True)
class DPMSolverPP:
    """DPM-Solver++(2M). ``state`` carries (x_0 prediction, lambda) of the previous step."""

    schedule: NoiseSchedule

    def timesteps(self, n: int) -> torch.Tensor:
        """Steps evenly spaced in log-SNR (lambda), as the DPM-Solver papers advise for few
        steps: even spacing in t makes the last steps so long that the order-2 extrapolation
        overshoots."""
        abar = self.schedule.alphas_cumprod
        lam = 0.5 * (torch.log(abar) - torch.log1p(-abar))
        grid = torch.linspace(lam[-1].item(), lam[0].item(), n, dtype=torch.float64)
        ts = torch.searchsorted(-lam.contiguous(), -grid).clamp(max=len(abar) - 1)
        ts = torch.unique_consecutive(ts)
        return ts.long()

    def _lambda(
        self, t: int, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = self.schedule.abar(t, like[:1].flatten()[:1]).reshape(())
        alpha, sigma = a.sqrt(), (1 - a).sqrt()
        return alpha, sigma, torch.log(alpha) - torch.log(sigma)

    def step(
        self,
        model_output: torch.Tensor,
        t: int,
        t_prev: int,
        x_t: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        x0, _ = self.schedule.to_x0_eps(model_output, x_t, t)
        _, sigma_t, lam_t = self._lambda(t, x_t)
        if t_prev < 0:  # last step: the data prediction itself
            return x0.to(x_t.dtype), (x0, lam_t, lam_t)
        alpha_s, sigma_s, lam_s = self._lambda(t_prev, x_t)
        h = lam_s - lam_t
        d = x0
        if state is not None:
            x0_prev, lam_prev, _ = state
            r = (lam_t - lam_prev) / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        x_prev = (sigma_s / sigma_t) * x_t.float() - alpha_s * torch.expm1(-h) * d
        return x_prev.to(x_t.dtype), (x0, lam_t, lam_s)


Sampler = DDIM | DPMSolverPP


SAMPLERS = ("ddim", "dpm++", "ddpm")


def make_sampler(name: str, schedule: NoiseSchedule, eta: float = 0.0) -> Sampler:
    """``ddim`` (with ``eta``), ``dpm++`` or ``ddpm`` (ancestral: DDIM with eta 1)."""
    if name == "ddim":
        return DDIM(schedule, eta)
    if name == "ddpm":
        return DDIM(schedule, 1.0)
    if name in ("dpm++", "dpmpp", "dpm-solver++"):
        return DPMSolverPP(schedule)
    raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}")


def sample_loop(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    sampler: Sampler,
    x_T: torch.Tensor,
    steps: int,
    generator: torch.Generator | None = None,
    progress: bool = False,
    desc: str = "denoise",
    noise: Callable[[], torch.Tensor] | None = None,
    on_step: Callable[[int], object] | None = None,
) -> torch.Tensor:
    """Run the reverse process from ``x_T``; ``model(x_t, t_batch)`` returns the prediction.

    A stochastic sampler (DDIM with ``eta > 0``) draws each step's fresh noise from
    ``noise()`` when given (a caller can then derive every item's noise from its own seed,
    independent of batching), else from ``generator``. ``on_step(1)`` follows every step.
    """
    ts = sampler.timesteps(steps).tolist()
    stochastic = noise is not None and getattr(sampler, "eta", 0.0) > 0
    x, state = x_T, None
    for i, t in enumerate(tqdm(ts, desc=desc, disable=not progress, leave=False)):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        out = model(x, t_batch)
        if stochastic:
            x, state = sampler.step(out, t, t_prev, x, state, noise=noise().to(x))
        else:
            x, state = sampler.step(out, t, t_prev, x, state, generator)
        if on_step is not None:
            on_step(1)
    return x
