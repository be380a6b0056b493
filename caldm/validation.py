"""Held-out validation of the swept stages (adaptor, refiner): fixed inputs and their metrics.

The inputs are drawn the same way at every evaluation and in every trial (fixed slices, fixed
timesteps, noise from one seed), so trials compare on one scale. The functions here take plain
modules; :mod:`caldm.distributed.tune` gathers ZeRO-3 partitions or picks the EMA weights first.

- adaptor: slice reconstruction error (L1) of DecM on consecutive held-out slices, plus the
  inter-slice consistency term: the L1 distance between the slice-axis differences of the
  reconstruction and of the real slices (the stripe artefacts of decoding slice by slice).
- refiner: the denoising loss on held-out latent slices at fixed timesteps and fixed noise,
  as epsilon MSE so that epsilon- and v-prediction trials compare on one scale.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from caldm.config import Config
from caldm.stages import Modules, StepContext, _guide

METRIC = "val_score"  # what ASHA and the searcher minimise


def fixed_slices(depth: int, count: int) -> np.ndarray:
    """``count`` consecutive slice indices around the middle of a volume (or all)."""
    count = min(count, depth)
    start = (depth - count) // 2
    return np.arange(start, start + count)


def adaptor_windows(
    data: str, ids: tuple[str, ...], cfg: Config, slices: int
) -> list[torch.Tensor]:
    """For each held-out volume, the k-windows (Eq. 1, edges replicated as in training) of its
    ``slices`` consecutive middle slices, read and resized as the training stream does; each
    ``(n, k, 1, H, W)``."""
    from caldm.data.io import read_volume
    from caldm.data.layout import DatasetLayout
    from caldm.data.preprocess import resize, to_unit_range

    layout, k, windows = DatasetLayout(data), cfg.model.k, []
    for sample_id in ids:
        volume, _ = read_volume(layout.image_url(sample_id))
        volume = resize(to_unit_range(volume), cfg.model.image_shape, order="linear")
        centres = fixed_slices(volume.shape[0], slices)
        index = np.clip(centres[:, None] + np.arange(k) - k // 2, 0, volume.shape[0] - 1)
        windows.append(torch.from_numpy(np.ascontiguousarray(volume[index]))[:, :, None])
    return windows


@torch.no_grad()
def validate_adaptor(
    enc2d: nn.Module,
    decm: nn.Module,
    windows: list[torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
    consistency_weight: float = 1.0,
) -> dict[str, float]:
    """DecM (``decm``: Dec2D with the adaptors) on held-out windows. ``val_rec`` is the L1 error
    to the real centre slices; ``val_consistency`` the L1 error of the slice-to-slice
    differences (stripes show as jumps between neighbours that the real volume does not have).
    ``val_score = val_rec + consistency_weight * val_consistency``."""
    rec, consistency = [], []
    for volume in windows:
        n, k = volume.shape[:2]
        real = volume[:, k // 2].float()
        out = []
        for window in volume.split(1):  # one window at a time: paper-size slices
            window = window.to(device, dtype)
            z, _ = enc2d(window.flatten(0, 1))
            out.append(decm.decode_center(z.reshape(1, k, *z.shape[1:])).float().cpu())
        fake = torch.cat(out)
        rec.append((fake - real).abs().mean())
        consistency.append(((fake[1:] - fake[:-1]) - (real[1:] - real[:-1])).abs().mean())
    val_rec, val_cons = float(torch.stack(rec).mean()), float(torch.stack(consistency).mean())
    return {
        "val_rec": val_rec,
        "val_consistency": val_cons,
        METRIC: val_rec + consistency_weight * val_cons,
    }


def refiner_batch(
    latents: str,
    ids: tuple[str, ...],
    cfg: Config,
    condition: str | None,
    num_train_timesteps: int,
    slices: int = 8,
    timesteps: int = 4,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """``slices`` evenly spaced latent slices of each held-out volume, each at ``timesteps``
    evenly spaced timesteps with noise drawn once from ``seed``."""
    from caldm.data.datasets import LatentDataset

    # The stage dataset's loader: the cache format, shape checks and label reduction.
    reader = LatentDataset(latents, cfg, "refiner", condition)
    parts: dict[str, list[torch.Tensor]] = {}
    for sample_id in ids:
        sample = reader._load(sample_id)
        depth = sample["z_hr"].shape[1]
        index = np.unique(np.linspace(0, depth - 1, min(slices, depth)).round()).astype(np.int64)
        parts.setdefault("z_hr", []).append(torch.from_numpy(sample["z_hr"][:, index]))
        parts.setdefault("z_sr", []).append(torch.from_numpy(sample["z_sr"][:, index]))
        if "label" in sample:
            # class fractions (C, D, ...): slice i is [:, i]
            label = sample["label"][:, index]
            parts.setdefault("label", []).append(torch.from_numpy(label).movedim(1, 0))
    batch = {
        "z_hr": torch.cat([p.movedim(1, 0) for p in parts["z_hr"]]),  # (N, c, H', W')
        "z_sr": torch.cat([p.movedim(1, 0) for p in parts["z_sr"]]),
    }
    if "label" in parts:
        batch["label"] = torch.cat(parts["label"])
    m = batch["z_hr"].shape[0]
    t = torch.linspace(0, num_train_timesteps - 1, timesteps).round().long()
    # Every slice at every timestep: repeat the slices, tile the timesteps.
    batch = {k: v.repeat_interleave(timesteps, 0) for k, v in batch.items()}
    batch["t"] = t.repeat(m)
    batch["noise"] = torch.randn(batch["z_hr"].shape, generator=torch.Generator().manual_seed(seed))
    return batch


@torch.no_grad()
def validate_refiner(
    nets: Modules, batch: dict[str, torch.Tensor], ctx: StepContext
) -> dict[str, float]:
    """Denoising loss of ``nets["refiner"]`` on a :func:`refiner_batch`. ``val_loss`` is the
    training objective (its value depends on the prediction type); ``val_score`` is the MSE of
    the implied noise, comparable across prediction types. No condition dropout: the
    conditional model is what is sampled."""
    from caldm.diffusion.objective import diffusion_loss

    schedule, scale = ctx.schedule, ctx.latent_scale
    x0, t, noise = batch["z_hr"] * scale, batch["t"], batch["noise"]
    guide = _guide(nets, "refiner", batch, ctx, batch["z_sr"] * scale, dropout=False)
    loss = diffusion_loss(lambda x, tt: nets["refiner"](x, tt, guide), schedule, x0, t, noise)
    x_t = schedule.add_noise(x0, noise, t)
    _, eps = schedule.to_x0_eps(nets["refiner"](x_t, t, guide), x_t, t)
    return {"val_loss": float(loss), METRIC: float(((eps - noise) ** 2).mean())}
