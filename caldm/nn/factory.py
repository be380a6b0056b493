"""Build every CA-LDM network of a config by its bundle name.

Bundle module names (DESIGN.md): ``enc2d``, ``dec2d``, ``enc3d``, ``f_sr``, ``adaptors``,
``diff3d``, ``refiner``, and for label guidance ``cond_diff3d`` / ``cond_refiner``. The
discriminator (``disc``) trains alongside the autoencoder stages but is not exported.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from caldm.config import Config, ModelConfig, preset
from caldm.nn.nets.ae2d import Dec2D, Enc2D
from caldm.nn.nets.condition import ConditionEncoder
from caldm.nn.nets.dec_m import Adaptors
from caldm.nn.nets.diff3d import Diff3D
from caldm.nn.nets.discriminator import build_discriminator
from caldm.nn.nets.enc3d import Enc3D
from caldm.nn.nets.f_sr import FSR
from caldm.nn.nets.refiner import DiffSlice

MODULES = ("enc2d", "dec2d", "enc3d", "f_sr", "adaptors", "diff3d", "refiner")
COND_MODULES = ("cond_diff3d", "cond_refiner")
#: The modules that write the latent cache the diffusion stages train on (Enc3D -> z,
#: f_sr -> z_sr, Enc2D -> z_hr).
NHAE_MODULES = ("enc3d", "f_sr", "enc2d")


def build(
    name: str,
    cfg: Config | ModelConfig,
    condition: str | None = None,
    num_classes: int | None = None,
) -> nn.Module:
    """A freshly initialised network.

    Args:
        name: a bundle module name, or ``disc``.
        cfg: the run config (or just its model part).
        condition: ``layers`` or ``vessels`` for diff3d/refiner/cond_* (label guidance).
        num_classes: layer classes for a ``layers`` condition (default: the config's).
    """
    m = cfg.model if isinstance(cfg, Config) else cfg
    c = m.latent_channels
    cond_ch = m.condition.channels if condition else 0
    if name == "enc2d":
        return Enc2D(m.ae2d, c)
    if name == "dec2d":
        return Dec2D(m.ae2d, c)
    if name == "enc3d":
        return Enc3D(m.enc3d, c)
    if name == "f_sr":
        return FSR(m.f_sr, c)
    if name == "adaptors":
        return Adaptors(Dec2D(m.ae2d, c), m.adaptor, m.ae2d.norm_num_groups)
    if name == "diff3d":
        return Diff3D(m, cond_ch)
    if name == "refiner":
        return DiffSlice(m, cond_ch)
    if name in COND_MODULES:
        if condition is None:
            raise ValueError(f"{name} needs a condition kind (layers or vessels)")
        grid = m.latent_shape[1:] if name == "cond_diff3d" else m.slice_latent_shape[1:]
        return ConditionEncoder(
            condition, grid, m.condition.channels, num_classes or m.condition.layer_classes
        )
    if name == "disc":
        return build_discriminator(m.discriminator)
    raise ValueError(
        f"unknown module {name!r}; expected one of {', '.join(MODULES + COND_MODULES)}"
    )


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_info(preset_name: str) -> dict[str, Any]:
    """Shapes and parameter counts of every network, built on the meta device (no memory)."""
    import torch

    cfg = preset(preset_name)
    m = cfg.model
    with torch.device("meta"):
        params = {name: count_params(build(name, cfg)) for name in MODULES}
    return {
        "image_shape": list(m.image_shape),
        "thumbnail_shape": list(m.thumbnail_shape),
        "latent_shape": list(m.latent_shape),
        "slice_latent_shape": list(m.slice_latent_shape),
        "z_sr_shape": list(m.z_sr_shape),
        "k": m.k,
        "params": params,
    }
