"""Write the sharded training corpus (:mod:`caldm.data.corpus`) as a Ray Data job.

One task per volume reads it once (normalise, resize) and writes a shard for every image
stage asked for; with a latent cache, the same task converts the volume's cached latents into
the diffusion stages' bf16 rows, and with a ``condition`` into labelled rows (the volume's
label reduced once to what the condition encoder reads, for the volume and each of its
shifted views). Shards that exist are skipped, so a killed job resumes.
Tasks take ``cpus_per_task`` CPUs and run at most ``workers`` at once (the caller's choice,
never read from the cluster at start).
"""

from __future__ import annotations

import logging
import zlib
from typing import Any

import numpy as np

from caldm.config import Config
from caldm.data import corpus as C
from caldm.errors import ConfigError

log = logging.getLogger("caldm.corpus")

DEFAULT_DRAWS = {"nhae": 8, "adaptor": 64}  # random items per volume of the sampled stages


def volume_shards(
    sample_id: str,
    data: str,
    out: str,
    stages: tuple[str, ...],
    cfg: Config,
    latents: str | None,
    draws: dict[str, int],
    seed: int,
    condition: str | None = None,
    views: tuple[str, ...] = (),
) -> dict[str, int]:
    """Write the missing shards of one volume; returns rows per stage written (0: existed).

    With ``condition`` the latent stages are written as ``<stage>+<condition>`` items, with a
    row for the volume and for each of its shifted ``views`` (latent cache ids)."""
    from caldm.data.io import read_bytes, url_exists
    from caldm.data.layout import DatasetLayout
    from caldm.data.preprocess import read_model_volume

    keys = {s: C.stage_key(s, condition) if s in C.LATENT_STAGES else s for s in stages}
    todo = [s for s in stages if not url_exists(C.shard_url(out, keys[s], sample_id))]
    written = dict.fromkeys(stages, 0)
    # the volume's own stream: the same draws whatever the order the tasks run in
    rng = np.random.default_rng([seed, zlib.crc32(sample_id.encode())])
    images = [s for s in todo if s in C.IMAGE_STAGES]
    if images:
        volume = read_model_volume(DatasetLayout(data).image_url(sample_id), cfg.model.image_shape)
        for stage in images:
            rows = C.image_rows(stage, volume, cfg, draws.get(stage, 0), rng)
            written[stage] = C.write_shard(C.shard_url(out, stage, sample_id), sample_id, rows)
    lat = [s for s in todo if s in C.LATENT_STAGES]
    if lat:
        from safetensors.numpy import load

        from caldm.data.datasets import latent_label, volume_label
        from caldm.data.latents import latent_url

        layout = DatasetLayout(data)
        # read once per volume: a labelled stage also carries the volume's shifted views (the
        # label moved with each), and both stages reduce the same label to their grids
        label = volume_label(layout, cfg, condition, sample_id) if condition else None
        cache_ids = [sample_id, *(views if condition is not None else ())]
        rows: dict[str, dict[str, list[bytes]]] = {stage: {} for stage in lat}
        for view in cache_ids:
            tensors = load(read_bytes(latent_url(latents, view)))
            for stage in lat:
                reduced = None
                if label is not None:
                    reduced = latent_label(layout, cfg, condition, stage, view, label)
                for k, v in C.latent_rows(stage, tensors, reduced).items():
                    rows[stage].setdefault(k, []).extend(v)
        for stage in lat:
            url = C.shard_url(out, keys[stage], sample_id)
            written[stage] = C.write_shard(url, sample_id, rows[stage])
    return written


def prepare_corpus(
    data: str,
    out: str,
    cfg: Config,
    stages: tuple[str, ...] = C.IMAGE_STAGES,
    latents: str | None = None,
    draws: dict[str, int] | None = None,
    ids: list[str] | None = None,
    workers: int = 1,
    cpus_per_task: float = 1.0,
    seed: int = 0,
    condition: str | None = None,
) -> dict[str, Any]:
    """Write (or complete) the corpus of ``stages`` under ``out``; returns ``corpus.json``.

    With ``condition`` (layers or vessels) the latent stages are written as labelled
    ``<stage>+<condition>`` items, the layer class count taken from the labels of ``data``."""
    from caldm.data.io import read_bytes, write_bytes
    from caldm.data.layout import DatasetLayout
    from caldm.distributed.cluster import ensure_ray
    from caldm.distributed.train import absolute

    unknown = [s for s in stages if s not in (*C.IMAGE_STAGES, *C.LATENT_STAGES)]
    if unknown:
        raise ConfigError(f"--stages: unknown stage {unknown[0]!r}")
    if any(s in C.LATENT_STAGES for s in stages) and not latents:
        raise ConfigError("--stages diff3d/refiner need --latents (jobs/encode_latents.py)")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if condition not in (None, "layers", "vessels"):
        raise ConfigError(f"--condition must be layers or vessels, got {condition!r}")
    if condition and not any(s in C.LATENT_STAGES for s in stages):
        raise ConfigError("--condition labels the diffusion stages: add diff3d and/or refiner "
                          "to --stages")  # fmt: skip
    draws = {**DEFAULT_DRAWS, **(draws or {})}
    data, out = absolute(data), absolute(out)
    latents = absolute(latents) if latents else None
    all_ids = DatasetLayout(data).ids()
    if ids is not None:
        missing = sorted(set(ids) - set(all_ids))
        if missing:
            raise ConfigError(f"--ids: {missing[0]} is not a volume of {data}")
    ids = sorted(ids if ids is not None else all_ids)
    if condition == "layers":
        from caldm.data.datasets import num_layer_classes

        cfg = cfg.model_copy(deep=True)
        cfg.model.condition.layer_classes = num_layer_classes(data)
    keys = tuple(C.stage_key(s, condition) if s in C.LATENT_STAGES else s for s in stages)
    C.check_shapes(out, cfg, keys)  # before any work
    views: dict[str, list[str]] = {}
    if condition is not None and latents:  # the cache is listed once, not once per volume
        from caldm.data.latents import cached_ids, parse_view

        for cache_id in cached_ids(latents):
            volume, rows = parse_view(cache_id)
            if rows:
                views.setdefault(volume, []).append(cache_id)
    ray = ensure_ray()
    ray.data.DataContext.get_current().print_on_execution_start = False

    def shards(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [
            volume_shards(str(i), data, out, stages, cfg, latents, draws, seed, condition,
                          tuple(sorted(views.get(str(i), ()))))  # fmt: skip
            for i in batch["id"]
        ]
        return {
            "id": batch["id"],
            **{s: np.asarray([r[s] for r in rows]) for s in stages},
        }

    results = (
        ray.data.from_items([{"id": i} for i in ids], override_num_blocks=max(1, len(ids)))
        .map_batches(shards, batch_size=1, num_cpus=cpus_per_task, concurrency=workers)
        .take_all()
    )
    written = {s: sum(int(r[s]) for r in results) for s in stages}
    if latents:  # the diffusion stages scale latents by the cache's statistics
        write_bytes(f"{out}/stats.json", read_bytes(f"{latents}/stats.json"))
    manifest = C.update_manifest(out, cfg, keys, ids, draws, data=data, latents=latents, seed=seed)
    log.warning("corpus %s: %s rows written (%d volumes)", out, written, len(ids))
    return {"written": written, **manifest}
