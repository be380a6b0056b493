"""Evaluation as a Ray Data job: Intra-FID, Inter-FID, TV and slice consistency of a synthetic
set against a real one.

Pipeline (one row per volume, then one row per plane):

1. The driver lists ``<root>/images/`` of both sets (fails fast on a missing or empty root).
2. Read tasks (one volume each; on CPU-only clusters Ray fuses them into the actors of step 3)
   compute the volume's TV and slice-consistency measures (:func:`metrics.slice_consistency`)
   and cut its planes at deterministic indices: up to
   ``max_slices_per_volume`` B-scans (intra) and as many planes across slices (inter), each
   put on [0, 1] and resized to 299 x 299, the extractor's input size. That is the common
   size that lets sets of different volume shapes be compared, and it loses nothing: the FID
   Inception resizes to 299 bilinearly anyway.
3. An actor pool (one GPU per actor when GPUs are used) turns planes into 2048-d features.
4. The driver streams the features into per-(set, plane kind) mean/covariance accumulators
   (bounded memory for any number of planes) and computes the Fréchet distances.

Label fidelity (:func:`caldm.segmentation.label_fidelity`, when a segmenter is given or real
training data to train one): does each synthetic volume follow the label that guided it? A
segmenter trained on real (image, label) pairs segments every synthetic volume and every
held-out real volume; the report gives mean Dice and boundary MAD (layers) or IoU-A/IoU-V and
the en-face vessel contrast (vessels) of both against their own labels, and their ratio. The
segmenter runs on the driver, one volume at a time.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from caldm import metrics
from caldm.errors import CaldmError, DataError
from caldm.metrics import SETS, volume_planes
from caldm.nn.nets.inception import FEATURE_DIM, INPUT_SIZE
from caldm.preview import list_volumes, overlay_image, preview_image
from caldm.segmentation import label_fidelity


def _read_planes(url: str, max_slices: int) -> dict[str, Any]:
    from caldm.data.io import read_volume

    volume, _ = read_volume(url)
    if min(volume.shape) < 2:
        raise DataError(url, f"volume of shape {volume.shape} is too small to evaluate")
    return volume_planes(volume, max_slices)


def _read_batch(batch: dict[str, np.ndarray], max_slices: int) -> dict[str, np.ndarray]:
    """Ray Data map_batches fn: volumes (set, id, url) -> plane rows.

    A volume that cannot be read becomes one row whose ``error`` names the file (its plane is
    a dummy): the driver stops on it with that one line. Raising here instead would surface as
    a Ray stack trace and lose the DataError, which does not pickle.
    """
    rows: list[dict[str, np.ndarray]] = []
    for set_name, sample_id, url in zip(batch["set"], batch["id"], batch["url"]):
        try:
            planes = _read_planes(str(url), max_slices)
        except CaldmError as exc:
            error = np.zeros((1, INPUT_SIZE, INPUT_SIZE), np.float32)
            planes = {"error": error}
            message = str(exc)
        else:
            message = ""
        scalars = ("tv", *metrics.SLICE_CONSISTENCY)
        for kind in (k for k in planes if k not in scalars):
            n = len(planes[kind])
            rows.append(
                {
                    "set": np.full(n, set_name),
                    "id": np.full(n, sample_id),
                    "kind": np.full(n, kind),
                    **{s: np.full(n, planes.get(s, np.nan), np.float64) for s in scalars},
                    "error": np.full(n, message, dtype=object),
                    "plane": planes[kind],
                }
            )
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


class PlaneFeatures:
    """Ray Data actor: plane rows -> the same rows with a ``feature`` (2048-d) column."""

    def __init__(self, inception_weights: str | None) -> None:
        import torch

        from caldm.nn.nets.inception import build_fid_inception

        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, _ = build_fid_inception(inception_weights)
        self.model = model.to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = self.torch.from_numpy(np.ascontiguousarray(batch.pop("plane")))[:, None]
        with self.torch.inference_mode():
            batch["feature"] = self.model.features(x.to(self.device)).float().cpu().numpy()
        return batch


def compute_report(
    real: str,
    synthetic: str,
    inception_weights: str | None = None,
    max_slices_per_volume: int = 16,
    batch_size: int = 32,
    num_gpus: int | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    """Run the Ray Data pipeline and return the report (see :func:`evaluate`).

    The feature actors are ``num_gpus`` actors of one GPU each, or without GPUs a pool of 1 to
    ``workers`` CPU actors: sized by the caller, never from the resources present at start, so
    on an autoscaling cluster that starts empty the pending actors make it grow.
    """
    if max_slices_per_volume < 2:
        raise CaldmError(f"--max-slices-per-volume must be >= 2, got {max_slices_per_volume}")
    if batch_size < 1 or (num_gpus is not None and num_gpus < 0) or workers < 1:
        raise CaldmError(
            f"--batch-size and --workers must be >= 1 and --num-gpus >= 0 ({batch_size}, "
            f"{workers}, {num_gpus})"
        )
    from caldm.nn.nets.inception import build_fid_inception

    roots = dict(zip(SETS, (real, synthetic)))
    volumes = {name: list_volumes(root) for name, root in roots.items()}
    # Fail on bad weights on the driver, before any cluster work; the name goes in the report.
    _, extractor = build_fid_inception(inception_weights)

    from caldm.distributed.cluster import ensure_ray

    ray = ensure_ray()
    items = [
        {"set": name, "id": sample_id, "url": url}
        for name in SETS
        for sample_id, url in volumes[name]
    ]
    if num_gpus:
        pool = ray.data.ActorPoolStrategy(size=num_gpus)
        actor_resources = {"num_gpus": 1}
    else:
        pool = ray.data.ActorPoolStrategy(min_size=1, max_size=workers)
        actor_resources = {"num_cpus": 1}
    features = (
        ray.data.from_items(items, override_num_blocks=len(items))
        .map_batches(_read_batch, batch_size=1, fn_kwargs={"max_slices": max_slices_per_volume})
        .map_batches(
            PlaneFeatures,
            fn_constructor_kwargs={"inception_weights": inception_weights},
            batch_size=batch_size,
            compute=pool,
            **actor_resources,
        )
    )
    stats = {(s, k): metrics.FeatureStats(FEATURE_DIM) for s in SETS for k in metrics.PLANE_KINDS}
    scalars = ("tv", *metrics.SLICE_CONSISTENCY)
    per_volume: dict[str, dict[str, dict[str, float]]] = {m: {s: {} for s in SETS} for m in scalars}
    for batch in features.iter_batches(batch_size=256, batch_format="numpy"):
        errors = [e for e in batch["error"] if e]
        if errors:
            raise CaldmError(errors[0])
        for key, acc in stats.items():
            mask = (batch["set"] == key[0]) & (batch["kind"] == key[1])
            if mask.any():
                acc.update(batch["feature"][mask])
        for m in scalars:
            for set_name, sample_id, value in zip(batch["set"], batch["id"], batch[m]):
                per_volume[m][str(set_name)][str(sample_id)] = float(value)

    def values(m: str, s: str) -> list[float]:
        return list(per_volume[m][s].values())

    return {
        "intra_fid": stats["real", "intra"].frechet_distance(stats["synthetic", "intra"]),
        "inter_fid": stats["real", "inter"].frechet_distance(stats["synthetic", "inter"]),
        "tv": {s: metrics.mean_std(values("tv", s)) for s in SETS},
        "slice_consistency": {
            m: metrics.ratio_report(values(m, "real"), values(m, "synthetic"))
            for m in metrics.SLICE_CONSISTENCY
        },
        "feature_extractor": extractor,
        "n_real": len(volumes["real"]),
        "n_synthetic": len(volumes["synthetic"]),
        "slices": {
            "max_per_volume": max_slices_per_volume,
            **{s: {k: stats[s, k].n for k in metrics.PLANE_KINDS} for s in SETS},
        },
    }


def preview_url(out: str) -> str:
    """The preview PNG written beside the report: ``x/report.json`` -> ``x/report.png``."""
    return (out[: -len(".json")] if out.endswith(".json") else out) + ".png"


def overlay_url(out: str) -> str:
    """The label overlay PNG beside the report: ``x/report.json`` -> ``x/label_overlay.png``."""
    return out.rsplit("/", 1)[0] + "/label_overlay.png" if "/" in out else "label_overlay.png"


def evaluate(
    real: str,
    synthetic: str,
    inception_weights: str | None = None,
    max_slices_per_volume: int = 16,
    batch_size: int = 32,
    num_gpus: int | None = None,
    out: str | None = None,
    workers: int = 1,
    segmenter: str | None = None,
    train_real: str | None = None,
    segmenter_steps: int = 300,
) -> dict[str, Any]:
    """Intra-FID, Inter-FID and TV of ``synthetic`` against ``real`` (dataset roots).

    Returns ``{"intra_fid", "inter_fid", "tv": {"real": {"mean", "std"}, "synthetic": {...}},
    "slice_consistency": {<measure>: {"real", "synthetic", "ratio"}}, "feature_extractor",
    "n_real", "n_synthetic", "slices"}``; ``slices`` holds ``max_per_volume`` and the number
    of planes per set and plane kind. With ``segmenter`` (a file from ``jobs/downstream.py``)
    or ``train_real`` (real training data to train one on for ``segmenter_steps`` steps), the
    report also has ``label_fidelity`` (:func:`label_fidelity`, with ``real`` as the held-out
    set). With ``out`` (a ``.json`` path or URL) the report is written there, a preview PNG
    beside it (:func:`preview_url`; with label fidelity also :func:`overlay_url`), and all are
    logged to MLflow (experiment ``evaluate``). Raises :class:`CaldmError` (one line naming
    the file) on bad input.
    """
    fidelity = None
    if segmenter is not None or train_real is not None:
        # Labels are checked (and a segmenter trained) before the longer FID pass.
        fidelity = label_fidelity(real, synthetic, segmenter, train_real, segmenter_steps)
    report = compute_report(
        real, synthetic, inception_weights, max_slices_per_volume, batch_size, num_gpus,
        workers,
    )  # fmt: skip
    if fidelity is not None:
        report["label_fidelity"] = fidelity
    if out is not None:
        write_outputs(report, out, real, synthetic, inception_weights)
    return report


def write_outputs(
    report: dict[str, Any], out: str, real: str, synthetic: str, weights: str | None
) -> None:
    """Write the JSON and preview PNG; log metrics, params and the preview to MLflow."""
    import io

    from caldm.data.io import write_bytes
    from caldm.distributed import tracking

    image = preview_image(real, synthetic)
    png = io.BytesIO()
    image.save(png, format="PNG")
    write_bytes(out, (json.dumps(report, indent=2) + "\n").encode())
    write_bytes(preview_url(out), png.getvalue())
    out_dir = os.path.dirname(out) if "://" not in out else out.rsplit("/", 1)[0]
    params = {
        "real": real,
        "synthetic": synthetic,
        "inception_weights": weights,
        "feature_extractor": report["feature_extractor"],
        "slices": report["slices"],
    }
    overlay = None
    if "label_fidelity" in report:
        overlay = overlay_image(real, synthetic, report["label_fidelity"]["task"])
        buf = io.BytesIO()
        overlay.save(buf, format="PNG")
        write_bytes(overlay_url(out), buf.getvalue())
    with tracking.start_run(out_dir or ".", "evaluate", "evaluate", params):
        keys = ("intra_fid", "inter_fid", "tv", "slice_consistency", "label_fidelity")
        tracking.log_metrics({k: report[k] for k in keys if k in report})
        tracking.log_image(image, "preview.png")
        if overlay is not None:
            tracking.log_image(overlay, "label_overlay.png")
