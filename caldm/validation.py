"""Held-out inputs of the swept stages (adaptor, refiner): what their validation runs on.

The inputs are drawn the same way at every evaluation and in every trial (fixed slices, fixed
timesteps, noise from one seed), so trials compare on one scale. The metrics themselves are
each stage's ``validate`` (:mod:`caldm.stages`), which names its ``held_out`` builder here;
:mod:`caldm.distributed.trial` gathers ZeRO-3 partitions or picks the EMA weights first.

- adaptor: the k-windows of consecutive middle slices of each held-out volume.
- refiner: latent slices of each held-out volume at fixed timesteps with fixed noise.
"""

from __future__ import annotations

import numpy as np
import torch

from caldm.config import Config

METRIC = "val_score"  # what ASHA and the searcher minimise


def fixed_slices(depth: int, count: int) -> np.ndarray:
    """``count`` consecutive slice indices around the middle of a volume (or all)."""
    count = min(count, depth)
    start = (depth - count) // 2
    return np.arange(start, start + count)


def adaptor_held_out(
    data: str,
    ids: tuple[str, ...],
    cfg: Config,
    condition: str | None = None,
    seed: int = 0,
    slices: int = 8,
) -> dict[str, torch.Tensor]:
    """``{"windows": (V, n, k, 1, H, W)}``: for each held-out volume, the k-windows (Eq. 1,
    edges replicated as in training) of its ``slices`` consecutive middle slices, read and
    resized as the training stream does. ``condition`` and ``seed`` are unused (fixed
    slices, no label)."""
    from caldm.data.layout import DatasetLayout
    from caldm.data.preprocess import read_model_volume

    layout, k, windows = DatasetLayout(data), cfg.model.k, []
    for sample_id in ids:
        volume = read_model_volume(layout.image_url(sample_id), cfg.model.image_shape)
        centres = fixed_slices(volume.shape[0], slices)
        index = np.clip(centres[:, None] + np.arange(k) - k // 2, 0, volume.shape[0] - 1)
        windows.append(torch.from_numpy(np.ascontiguousarray(volume[index]))[:, :, None])
    return {"windows": torch.stack(windows)}  # every volume is resized to one shape


def refiner_held_out(
    latents: str,
    ids: tuple[str, ...],
    cfg: Config,
    condition: str | None = None,
    seed: int = 0,
    slices: int = 8,
    timesteps: int = 4,
) -> dict[str, torch.Tensor]:
    """``slices`` evenly spaced latent slices of each held-out volume of the cache
    ``latents``, each at ``timesteps`` evenly spaced timesteps of the schedule with noise
    drawn once from ``seed``; with a ``condition``, the label rows of those slices."""
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
    t = torch.linspace(0, cfg.diffusion.num_train_timesteps - 1, timesteps).round().long()
    # Every slice at every timestep: repeat the slices, tile the timesteps.
    batch = {k: v.repeat_interleave(timesteps, 0) for k, v in batch.items()}
    batch["t"] = t.repeat(m)
    batch["noise"] = torch.randn(batch["z_hr"].shape, generator=torch.Generator().manual_seed(seed))
    return batch
