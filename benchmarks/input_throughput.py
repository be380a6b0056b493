"""Input-path throughput per CPU core vs what one 24 GB card consumes, per stage, old vs corpus.

    python benchmarks/input_throughput.py [--preset paper] [--volumes 2] [--json]

- Old path: the stage datasets of :mod:`caldm.data.datasets` on their usual inputs (a gzipped
  uint8 volume of OCTA-500's 6 mm shape, 400 x 640 x 400, per item read, normalised and
  resized to the preset; fp32 safetensors latents of the preset's shapes for the diffusion
  stages), ``cfg.data.slices_per_volume`` items per read.
- New path: :class:`~caldm.data.corpus.CorpusDataset` on the corpus written from the same
  inputs (local shards, as after the first epoch's cache fill), shuffle buffer on.
- Both run in this process with one torch thread, timed in CPU seconds of the process (user +
  system, so page-cache reads count; the old path's S3 waits would add to it): items/s per
  core. A loader with W worker processes delivers about W times that, so with 8 vCPUs (a
  g5.2xlarge) 8 x per core.
- Conditioned fine-tunes (``diff3d+layers``, ``refiner+layers``): the old path reads the
  latents and the volume's full-resolution uint8 layer label (7 classes, OCTA-500's 6 layer
  surfaces) and reduces it to the condition encoder's grid per item; the corpus stores the
  reduced label beside the latents.
- Card: FLOPs of one training step at the preset (:func:`caldm.bench.memory.stage_step_flops`:
  forward, backward, recomputation, discriminator) on an assumed A10G 24 GB, dense bf16
  tensor peak ``--peak-tflops`` (125) at ``--mfu`` (0.4): items/s = peak x mfu / FLOPs per item.

feed ratio r = (items/s the input path delivers with 8 cores) / (items/s one card consumes);
r >= 2 keeps the card fed with headroom. With ``--json`` the last line is
``{"feed_ratio": {stage: r}, "old_feed_ratio": {stage: r}, ...}``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from caldm.bench.memory import stage_step_flops
from caldm.config import STAGES, preset
from caldm.data import corpus as C
from caldm.data.io import write_volume
from caldm.data.latents import latent_url, write_latent_source, write_latents
from caldm.data.layout import DatasetLayout
from caldm.stages import stage_dataset

SOURCE_SHAPE = (400, 640, 400)  # OCTA-500 6 mm: 400 B-scans of 640 x 400
CORES = 8  # g5.2xlarge vCPUs
LAYER_CLASSES = 7  # OCTA-500: 6 layer surfaces


def make_inputs(root: Path, cfg, volumes: int) -> tuple[str, str]:
    """A dataset of uint8 OCT-like volumes and a latent cache of the preset's shapes (kept
    when ``root`` holds them already)."""
    rng = np.random.default_rng(0)
    data, latents = str(root / "data"), str(root / "latents")
    d, h, w = SOURCE_SHAPE
    depth = np.linspace(0, 1, h, dtype=np.float32)[None, :, None]
    for i in range(volumes):
        if (root / "latents" / f"v{i:03d}.safetensors").exists():
            continue
        layers = 90 + 60 * np.sin(depth * 40 + i)  # bands along the A-scan
        speckle = rng.gamma(2.0, 20.0, size=(d, h, w)).astype(np.float32)
        vol = np.clip(layers * (depth < 0.6) + speckle, 0, 255).astype(np.uint8)
        write_volume(DatasetLayout(data).image_url(f"v{i:03d}"), vol)
        label = np.broadcast_to(np.digitize(depth, np.linspace(0.2, 0.6, LAYER_CLASSES - 1)),
                                (d, h, w)).astype(np.uint8)  # fmt: skip
        write_volume(DatasetLayout(data).label_url("layers", f"v{i:03d}"), label)
        m = cfg.model
        write_latents(
            latent_url(latents, f"v{i:03d}"),
            z=rng.standard_normal(m.latent_shape, dtype=np.float32),
            z_sr=rng.standard_normal(m.z_sr_shape, dtype=np.float32),
            z_hr=rng.standard_normal(m.z_sr_shape, dtype=np.float32),
        )
    write_latent_source(latents, data)
    (root / "latents" / "stats.json").write_text(
        json.dumps({"count": volumes, **{k: {"mean": 0, "std": 1} for k in ("z", "z_sr", "z_hr")}})
    )
    return data, latents


def items_per_s(dataset, n: int, warmup: int = 1) -> float:
    """Items per CPU-second of this process (user + system): items/s of one dedicated core,
    and unaffected by other work on a shared machine (wall time is not)."""
    it = iter(dataset)
    for _ in range(warmup):
        next(it)
    start = time.process_time()
    for _ in range(n):
        next(it)
    return n / (time.process_time() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="paper")
    p.add_argument("--volumes", type=int, default=2, help="source volumes (old path: items)")
    p.add_argument("--new-items", type=int, default=400, help="items timed on the new path")
    p.add_argument("--peak-tflops", type=float, default=125.0, help="card's dense bf16 peak")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation")
    p.add_argument("--json", action="store_true", help="end with the JSON line")
    p.add_argument("--workdir", help="keep inputs and corpus here (reused when rerun)")
    args = p.parse_args()
    torch.set_num_threads(1)  # per core, as Ray's workers run (one OMP thread)
    cfg = preset(args.preset)
    cfg.model.condition.layer_classes = LAYER_CLASSES
    from caldm.distributed.corpus import DEFAULT_DRAWS, volume_shards

    runs = [(s, None) for s in STAGES] + [(s, "layers") for s in C.LATENT_STAGES]

    rows = {}
    with tempfile.TemporaryDirectory(prefix="caldm-input-") as tmp:
        root = Path(args.workdir or tmp)
        data, latents = make_inputs(root, cfg, args.volumes)
        corpus = str(root / "corpus")
        ids = DatasetLayout(data).ids()
        for i in ids:
            volume_shards(i, data, corpus, STAGES, cfg, latents, DEFAULT_DRAWS, 0)
            volume_shards(i, data, corpus, C.LATENT_STAGES, cfg, latents, {}, 0, "layers")
        keys = (*STAGES, *(C.stage_key(s, "layers") for s in C.LATENT_STAGES))
        C.update_manifest(corpus, cfg, keys, ids, DEFAULT_DRAWS, data=data)
        (root / "corpus" / "stats.json").write_text((root / "latents" / "stats.json").read_text())
        for stage, cond in runs:
            source = latents if stage in C.LATENT_STAGES else data
            old_n = max(1, args.volumes - 1) * cfg.data.slices_per_volume
            old = items_per_s(stage_dataset(stage, source, cfg, condition=cond), old_n)
            new = items_per_s(
                stage_dataset(stage, corpus, cfg, condition=cond), args.new_items, warmup=50
            )
            flops = stage_step_flops(stage, cfg, condition=cond) / cfg.train.micro_batch
            card = args.peak_tflops * 1e12 * args.mfu / flops
            stage = C.stage_key(stage, cond)
            rows[stage] = {
                "old_per_core": old,
                "new_per_core": new,
                "card_items_per_s": card,
                "tflop_per_item": flops / 1e12,
                "old_feed_ratio": CORES * old / card,
                "feed_ratio": CORES * new / card,
            }
            r = rows[stage]
            print(
                f"{stage:>14}: old {old:9.3f} items/s/core  new {new:9.1f} items/s/core  "
                f"card {card:8.2f} items/s ({r['tflop_per_item']:.2f} TFLOP/item)  "
                f"feed ratio x{CORES}: old {r['old_feed_ratio']:.3f}  new {r['feed_ratio']:.1f}",
                flush=True,
            )
    print(
        f"card: A10G 24 GB assumed, {args.peak_tflops:g} TFLOPS dense bf16 x MFU {args.mfu:g}; "
        f"preset {args.preset}, micro-batch {cfg.train.micro_batch}, "
        f"slices_per_volume {cfg.data.slices_per_volume}, {CORES} cores"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "feed_ratio": {s: r["feed_ratio"] for s, r in rows.items()},
                    "old_feed_ratio": {s: r["old_feed_ratio"] for s, r in rows.items()},
                    "per_stage": rows,
                }
            )
        )


if __name__ == "__main__":
    main()
