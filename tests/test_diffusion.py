"""Samplers against a closed-form Gaussian case, and the schedule's parameterisations."""

import pytest
import torch

from caldm.config import DiffusionConfig
from caldm.diffusion import NoiseSchedule, diffusion_loss, make_sampler, sample_loop

MU, STD = 1.5, 0.5


def exact_model(schedule: NoiseSchedule):
    """The optimal predictor when the data are N(MU, STD^2) per element."""

    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = schedule.abar(t, x_t)
        var = a * STD**2 + 1 - a
        eps = (1 - a).sqrt() * (x_t - a.sqrt() * MU) / var
        if schedule.prediction_type == "epsilon":
            return eps
        x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0

    return model


def ode_solution(schedule: NoiseSchedule, x_T: torch.Tensor, t_T: int) -> torch.Tensor:
    """Where the probability-flow ODE takes x_T for Gaussian data: it keeps the z-score."""
    a = schedule.abar(t_T, x_T)
    return MU + STD * (x_T - a.sqrt() * MU) / (a * STD**2 + 1 - a).sqrt()


@pytest.mark.parametrize(
    "name,steps,prediction,tol",
    [
        ("ddim", 200, "epsilon", 0.01),
        ("ddim", 200, "v_prediction", 0.01),
        ("dpm++", 20, "epsilon", 0.02),
        ("dpm++", 20, "v_prediction", 0.02),
    ],
)
def test_sampler_follows_the_ode(name: str, steps: int, prediction: str, tol: float) -> None:
    schedule = NoiseSchedule.from_config(DiffusionConfig(prediction_type=prediction))
    sampler = make_sampler(name, schedule)
    x_T = torch.randn(4_000, generator=torch.Generator().manual_seed(0))
    t_T = int(sampler.timesteps(steps)[0])
    x0 = sample_loop(exact_model(schedule), sampler, x_T, steps)
    err = (x0 - ode_solution(schedule, x_T, t_T)).abs().mean().item()
    assert err < tol


def test_more_steps_less_error_and_dpm_beats_ddim_at_few_steps() -> None:
    schedule = NoiseSchedule.from_config(DiffusionConfig())
    x_T = torch.randn(4_000, generator=torch.Generator().manual_seed(0))

    def err(name: str, steps: int) -> float:
        sampler = make_sampler(name, schedule)
        t_T = int(sampler.timesteps(steps)[0])
        x0 = sample_loop(exact_model(schedule), sampler, x_T, steps)
        return (x0 - ode_solution(schedule, x_T, t_T)).abs().mean().item()

    assert err("ddim", 200) < err("ddim", 50) < err("ddim", 10)
    assert err("dpm++", 10) < err("ddim", 10) / 3


def test_wrong_update_is_caught() -> None:
    """The ODE test has teeth: a sampler stepping on a mismatched schedule misses by far."""
    schedule = NoiseSchedule.from_config(DiffusionConfig())
    wrong = make_sampler("ddim", NoiseSchedule.from_config(DiffusionConfig(beta_end=0.012)))
    x_T = torch.randn(4_000, generator=torch.Generator().manual_seed(0))
    x0 = sample_loop(exact_model(schedule), wrong, x_T, 200)
    assert (x0 - ode_solution(schedule, x_T, 995)).abs().mean().item() > 0.05


def test_ddim_eta_one_is_stochastic_and_still_correct() -> None:
    schedule = NoiseSchedule.from_config(DiffusionConfig())
    sampler = make_sampler("ddim", schedule, eta=1.0)
    g = torch.Generator().manual_seed(1)
    x0 = sample_loop(
        exact_model(schedule), sampler, torch.randn(8_000, generator=g), 100, generator=g
    )
    assert abs(x0.mean().item() - MU) < 0.03 and abs(x0.std().item() - STD) < 0.03


def test_ddpm_is_ancestral_sampling() -> None:
    schedule = NoiseSchedule.from_config(DiffusionConfig())
    sampler = make_sampler("ddpm", schedule)
    # at all 1000 steps the noise variance is the DDPM posterior's, beta~_t
    t, t_prev = 500, 499
    x_t = torch.zeros(20_000)
    g = torch.Generator().manual_seed(2)
    eps = torch.zeros_like(x_t)  # model says: no noise in x_t
    x_prev, _ = sampler.step(eps, t, t_prev, x_t, generator=g)
    a_t, a_prev = schedule.alphas_cumprod[t], schedule.alphas_cumprod[t_prev]
    beta_tilde = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    assert x_prev.var().item() == pytest.approx(beta_tilde.item(), rel=0.05)
    # the loop itself is DDIM's with eta 1 (test_ddim_eta_one_is_stochastic_and_still_correct)
    assert sampler == make_sampler("ddim", schedule, eta=1.0)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_parameterisation_round_trip(prediction: str) -> None:
    schedule = NoiseSchedule.from_config(DiffusionConfig(prediction_type=prediction))
    x0 = torch.randn(4, 3, 5)
    noise = torch.randn(4, 3, 5)
    t = torch.tensor([0, 10, 500, 999])
    x_t = schedule.add_noise(x0, noise, t)
    rec_x0, rec_eps = schedule.to_x0_eps(schedule.target(x0, noise, t), x_t, t)
    assert torch.allclose(rec_eps, noise, atol=1e-4)
    assert torch.allclose(rec_x0, x0, atol=2e-2)  # 1/sqrt(abar_999) amplifies rounding


def test_linear_schedule_matches_paper() -> None:
    s = NoiseSchedule.from_config(DiffusionConfig())
    betas = 1 - s.alphas_cumprod / torch.cat(
        [torch.ones(1, dtype=torch.float64), s.alphas_cumprod[:-1]]
    )
    assert s.num_train_timesteps == 1000
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(2e-2)


def test_diffusion_loss_is_zero_for_exact_model_on_point_mass() -> None:
    schedule = NoiseSchedule.from_config(DiffusionConfig())
    x0 = torch.full((64, 16), 0.3)
    g = torch.Generator().manual_seed(0)

    def oracle(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = schedule.abar(t, x_t)
        return (x_t - a.sqrt() * 0.3) / (1 - a).sqrt()

    assert diffusion_loss(oracle, schedule, x0, generator=g).item() < 1e-8
    zero = diffusion_loss(lambda x, t: torch.zeros_like(x), schedule, x0, generator=g)
    assert zero.item() > 0.8  # the noise itself: E[eps^2] = 1


def test_diffusion_loss_l1_is_the_mean_absolute_error() -> None:
    schedule = NoiseSchedule.from_config(DiffusionConfig())
    x0 = torch.full((512, 16), 0.3)
    t = torch.full((512,), 10)
    noise = torch.randn(512, 16, generator=torch.Generator().manual_seed(0))
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731  the target itself is the error
    l1 = diffusion_loss(zero, schedule, x0, t, noise, kind="l1")
    mse = diffusion_loss(zero, schedule, x0, t, noise)
    assert l1.item() == pytest.approx(noise.abs().mean().item())
    assert mse.item() == pytest.approx(noise.square().mean().item())
    with pytest.raises(ValueError, match="l1"):
        diffusion_loss(zero, schedule, x0, t, noise, kind="huber")
