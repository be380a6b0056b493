"""Noise schedule, training objective and samplers, apart from any network."""

from caldm.diffusion.objective import diffusion_loss
from caldm.diffusion.samplers import DDIM, DPMSolverPP, make_sampler, sample_loop
from caldm.diffusion.schedule import NoiseSchedule

__all__ = ["DDIM", "DPMSolverPP", "NoiseSchedule", "diffusion_loss", "make_sampler", "sample_loop"]
