"""The latent cache the diffusion stages train on, written by a Ray Data job.

For every volume of a dataset, with a trained NHAE from a bundle:

- ``z    = mean of Enc3D(thumbnail)``            (c, D', H', W')  Diff3D's data
- ``z_sr = f_sr(z)``                            (c, D, H', W')   the refiner's guide
- ``z_hr = mean of Enc2D(x_i)`` for every slice  (c, D, H', W')   the refiner's target

written as ``<out>/<id>.safetensors``, and for each shifted view of the volume
(``data.augment.views``, :func:`caldm.data.latents.view_shifts`: the volume moved down by
part of a latent pixel before encoding, so that label-conditioned training sees every offset)
as ``<out>/<id>~dy<rows>.safetensors``; with ``<out>/source.json`` (dataset and bundle URLs) and
``<out>/stats.json`` (mean and std of each latent over all volumes; the training stages scale
latents by 1/std; ``nhae_hash``: the hash of the encoders that wrote the cache, which training
and later encodes into the same ``out`` check against their bundle). An actor pool of ``actors``
holds the networks (``gpus_per_actor`` each): sized by the caller, never from the resources
present at start, so on an autoscaling cluster that starts empty the pending actors are what
makes it grow. Rerunning skips volumes whose latents exist and only reads them back for the
stats.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import numpy as np
import torch

from caldm.bundle import Bundle, nhae_hash, open_bundle
from caldm.data.latents import KEYS, STATS_FILE, check_nhae
from caldm.stages import STAGES

log = logging.getLogger("caldm.encode")

#: The modules that write the cache: the encoders of the diffusion stages it feeds (both
#: stages read one cache, so they name the same ones).
NEEDS = STAGES["diff3d"].encoders


@torch.no_grad()
def encode_volume(
    nets: Any, volume: np.ndarray, cfg: Any, slice_batch: int = 32
) -> dict[str, np.ndarray]:
    """z, z_sr and z_hr (float32 numpy) of one volume in [-1, 1] on the model's image grid,
    with ``nets`` holding enc3d, f_sr and enc2d (on one device)."""
    from caldm.data.preprocess import thumbnail

    device = next(nets["enc3d"].parameters()).device
    thumb = torch.from_numpy(thumbnail(volume, cfg.model.thumbnail_shape).copy())[None, None]
    z, _ = nets["enc3d"](thumb.to(device))
    z_sr = nets["f_sr"](z)
    slices = torch.from_numpy(np.ascontiguousarray(volume))[:, None]  # (D, 1, H, W)
    z_hr = torch.cat([nets["enc2d"](chunk.to(device))[0] for chunk in slices.split(slice_batch)])
    latents = {"z": z[0], "z_sr": z_sr[0], "z_hr": z_hr.movedim(0, 1)}  # z_hr: (c, D, H', W')
    return {k: v.float().cpu().numpy() for k, v in latents.items()}


class LatentEncoder:
    """A Ray Data actor: encodes (or reads back) the latents of a batch of volume ids and
    returns per-volume sums for the statistics."""

    def __init__(self, bundle: str | Bundle, data: str, out: str, slice_batch: int = 32) -> None:
        from caldm.data.layout import DatasetLayout

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.nets = open_bundle(bundle)
        self.nets.load(NEEDS, device=self.device)
        self.cfg = self.nets.cfg
        self.layout = DatasetLayout(data)
        self.out = out
        self.slice_batch = slice_batch
        # the last volume read: a volume's shifted views arrive one after another
        self._volume: tuple[str, np.ndarray] | None = None

    @torch.no_grad()
    def encode(self, cache_id: str) -> dict[str, np.ndarray]:
        """The three latents of one volume or shifted view (float32 numpy)."""
        from caldm.data.labels import shift_depth
        from caldm.data.latents import parse_view
        from caldm.data.preprocess import read_model_volume

        sample_id, rows = parse_view(cache_id)
        if self._volume is None or self._volume[0] != sample_id:  # read each volume once
            url, shape = self.layout.image_url(sample_id), self.cfg.model.image_shape
            self._volume = (sample_id, read_model_volume(url, shape))
        volume = self._volume[1]
        return encode_volume(self.nets, shift_depth(volume, rows, axis=1), self.cfg,
                             self.slice_batch)  # fmt: skip

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from safetensors.numpy import load

        from caldm.data.io import read_bytes, url_exists
        from caldm.data.latents import latent_url, write_latents

        rows: dict[str, list[Any]] = {"id": [], "cached": []}
        for sample_id in batch["id"]:
            url = latent_url(self.out, str(sample_id))
            cached = url_exists(url)
            if cached:
                latents = load(read_bytes(url))
            else:
                latents = self.encode(str(sample_id))
                write_latents(url, **latents)
            rows["id"].append(str(sample_id))
            rows["cached"].append(cached)
            for key in KEYS:
                # contiguous: numpy's pairwise sum order (so the stats' last bits) depends on
                # the layout, and a fresh encode is a strided view where a cached file is not
                x = np.ascontiguousarray(latents[key], dtype=np.float64)
                for stat, value in (("n", x.size), ("sum", x.sum()), ("sumsq", (x * x).sum())):
                    rows.setdefault(f"{key}_{stat}", []).append(value)
        return {k: np.asarray(v) for k, v in rows.items()}


def encode_latents(
    bundle: str | Bundle,
    data: str,
    out: str,
    actors: int = 1,
    gpus_per_actor: float = 0.0,
    ids: list[str] | None = None,
    exclude: list[str] | None = None,
    views: int | None = None,
) -> dict:
    """Cache z, z_sr and z_hr of every volume of ``data`` (and of its shifted views) under
    ``out``; returns the stats. ``bundle`` is an opened :class:`~caldm.bundle.Bundle` or its
    URL.

    ``ids`` / ``exclude`` narrow the volumes (e.g. a split's train part); ``views`` overrides
    the bundle's ``data.augment.views``. Raises a BundleError before any work when the bundle
    lacks enc3d, f_sr or enc2d.
    """
    from caldm.errors import ConfigError

    if actors < 1 or gpus_per_actor < 0 or (views is not None and views < 0):
        raise ConfigError(f"--actors must be >= 1, --gpus-per-actor and --views >= 0 ({actors}, "
                          f"{gpus_per_actor}, {views})")  # fmt: skip
    import ray

    from caldm.data.io import write_bytes
    from caldm.data.latents import view_id, view_shifts, write_latent_source
    from caldm.data.layout import DatasetLayout, select_ids
    from caldm.distributed.cluster import ensure_ray
    from caldm.distributed.plan import absolute, opened

    data, out = absolute(data), absolute(out)
    ids = select_ids(DatasetLayout(data).ids(), ids, exclude, what=f"--ids (volumes of {data})")
    bundle = opened(bundle)  # after the ids: a wrong --ids is named before anything else
    bundle.require(NEEDS, "encoding latents (the trained NHAE and slice encoder)")
    cfg = bundle.cfg.model_copy(deep=True)  # --views changes this run, not the bundle
    if views is not None:
        cfg.data.augment.views = views
    cache_ids = [view_id(i, rows) for i in ids for rows in view_shifts(cfg)]
    encoders = nhae_hash(bundle)
    check_nhae(out, encoders)
    ensure_ray()
    ray.data.DataContext.get_current().print_on_execution_start = False  # a page of settings
    stats_rows = (
        ray.data.from_items([{"id": i} for i in cache_ids])
        .map_batches(
            LatentEncoder,
            fn_constructor_kwargs={"bundle": bundle, "data": data, "out": out},
            batch_size=1,
            concurrency=max(1, min(actors, len(cache_ids))),
            num_gpus=gpus_per_actor,
            num_cpus=1,
        )
        .take_all()
    )
    stats_rows.sort(key=lambda r: r["id"])  # the same sums in the same order on every rerun
    stats: dict[str, Any] = {"count": len(stats_rows), "nhae_hash": encoders}
    for key in KEYS:
        n = sum(int(r[f"{key}_n"]) for r in stats_rows)
        mean = math.fsum(r[f"{key}_sum"] for r in stats_rows) / n
        var = math.fsum(r[f"{key}_sumsq"] for r in stats_rows) / n - mean * mean
        stats[key] = {"mean": float(mean), "std": float(np.sqrt(max(var, 0.0)))}
    cached = sum(bool(r["cached"]) for r in stats_rows)
    write_latent_source(out, data, bundle=bundle.url)
    write_bytes(f"{out}/{STATS_FILE}", json.dumps(stats, indent=1).encode())
    log.warning("encoded %d volumes and views (%d already cached) of %d volumes to %s",
                len(cache_ids) - cached, cached, len(ids), out)  # fmt: skip
    return {**stats, "volumes": len(ids), "encoded": len(cache_ids) - cached, "cached": cached}
