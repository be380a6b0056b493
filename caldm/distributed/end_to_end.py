"""The paper's whole path as one resumable job (``jobs/pipeline.py``, ``make demo``).

phantom data (when none is given) -> ae2d -> nhae -> adaptor -> encode latents -> diff3d ->
refiner -> label-guided fine-tune of both diffusion stages -> a synthetic dataset guided by
held-out real labels -> evaluation (Intra-FID, Inter-FID, TV, depth profiles, label fidelity)
-> previews -> the paper's Table 2 on a few real volumes (downstream segmentation trained on
Real, Syn, Real+Syn, scored on the held-out volumes).

Layout under ``--out``::

    data/train, data/heldout     phantom datasets (only when --data is not given)
    runs/<step>/                 one training run per step (bundle/, summary.json, MLflow)
    latents/                     the latent cache of encode_latents
    synthetic/                   the generated dataset (dataset layout)
    report.json, report.png      evaluation, plus depth-profile correlation and TV ratio,
                                 label fidelity and the Table 2 rows
    label_overlay.png            synthetic B-scans with their guiding label's boundaries,
                                 beside real ones with their own
    depth_profiles.png           mean intensity per depth row, real vs synthetic
    downstream/real              the first DOWNSTREAM_REAL training volumes (Table 2's "Real")
    downstream/synthetic         DOWNSTREAM_PER_LABEL synthetic volumes per label of those
    downstream/report.*          Table 2: report.json, report.md, report.png (jobs/downstream.py)

Rerunning resumes: finished steps are skipped (their summary says they reached their step
count), an interrupted training step resumes from its newest checkpoint, the latent cache and
the generated dataset skip what is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from caldm.config import load_config
from caldm.data.io import (
    join_url,
    read_bytes,
    read_json,
    read_volume,
    url_exists,
    write_bytes,
    write_json,
)
from caldm.data.latents import STATS_FILE
from caldm.data.layout import DatasetLayout
from caldm.data.preprocess import to_unit_range
from caldm.errors import ConfigError, DataError


@dataclass(frozen=True)
class Step:
    """One training step of the path: its stage, its input data and how long it trains."""

    name: str
    stage: str
    data: str  # "images" (the real dataset) or "latents"
    max_steps: int
    condition: bool = False


# Table 2 on the demo: few real volumes (so that synthetic data has room to help), 2 synthetic
# samples per real label ("200% Syn"), a short budget per model and 2 seeds. The segmenters are
# the measuring instrument: their steps do not follow --steps-scale.
DOWNSTREAM_REAL = 3
DOWNSTREAM_PER_LABEL = 2
DOWNSTREAM_STEPS = 150
DOWNSTREAM_SEEDS = 2
FIDELITY_STEPS = 300  # the label-fidelity segmenter, trained on every real training volume

# Step counts for the tiny preset on 2 CPU cores (the demo's 20-minute budget); scale them
# with --steps-scale for larger presets or real data.
PATH: tuple[Step, ...] = (
    Step("ae2d", "ae2d", "images", 400),
    Step("nhae", "nhae", "images", 300),
    Step("adaptor", "adaptor", "images", 100),
    Step("diff3d", "diff3d", "latents", 1500),
    Step("refiner", "refiner", "latents", 1000),
    Step("diff3d_guided", "diff3d", "latents", 1000, condition=True),
    # The refiner is where a label is honoured or lost (benchmarks/fidelity_ceiling.py: with
    # 500 guided steps a perfect Diff3D still gave Dice 0.75 of real 0.96; 2500: 0.86; 5000:
    # 0.875, near the slice autoencoder's own 0.896).
    Step("refiner_guided", "refiner", "latents", 5000, condition=True),
)


def depth_profile(volume: np.ndarray) -> np.ndarray:
    """Mean intensity (in [-1, 1]) per depth row H of a D x H x W volume."""
    return to_unit_range(np.asarray(volume)).mean(axis=(0, 2))


def mean_depth_profile(root: str, limit: int | None = None) -> np.ndarray:
    """The depth profile averaged over the volumes of a dataset, resampled to 256 rows."""
    profiles = []
    for sid in DatasetLayout(root).ids()[:limit]:
        volume, _ = read_volume(DatasetLayout(root).image_url(sid))
        p = depth_profile(volume)
        profiles.append(np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(p)), p))
    if not profiles:
        raise DataError(root, "no volumes to profile")
    return np.mean(profiles, axis=0)


def _profile_png(real: np.ndarray, synthetic: np.ndarray, url: str) -> None:
    """A small plot of both profiles (depth downwards, as in a B-scan)."""
    from io import BytesIO

    from PIL import Image, ImageDraw

    w, h = 320, 280
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    lo = min(real.min(), synthetic.min())
    hi = max(real.max(), synthetic.max())
    for profile, colour in ((real, (40, 90, 200)), (synthetic, (220, 80, 40))):
        x = 20 + (profile - lo) / max(hi - lo, 1e-6) * (w - 40)
        y = 20 + np.linspace(0, 1, len(profile)) * (h - 50)
        draw.line(list(zip(x.tolist(), y.tolist())), fill=colour, width=2)
    draw.text((20, h - 24), "real", fill=(40, 90, 200))
    draw.text((70, h - 24), "synthetic", fill=(220, 80, 40))
    draw.text((170, h - 24), "depth: top to bottom", fill=(0, 0, 0))
    buf = BytesIO()
    img.save(buf, format="PNG")
    write_bytes(url, buf.getvalue())


def subset_dataset(src: str, dst: str, n: int, kinds: tuple[str, ...]) -> list[str]:
    """Copy the first ``n`` samples of ``src`` (image and ``kinds`` labels, manifest rows) to
    ``dst``; samples already there are kept. Returns their ids."""
    from caldm.data.io import list_dir

    source, target = DatasetLayout(src), DatasetLayout(dst)
    ids = source.ids()[:n]
    have = set(list_dir(join_url(dst, "images")))
    for sid in ids:
        for kind in kinds:  # labels first: an image without its label is never left behind
            write_bytes(target.label_url(kind, sid), read_bytes(source.label_url(kind, sid)))
        url = source.image_url(sid)
        if url.rsplit("/", 1)[-1] not in have:
            write_bytes(join_url(dst, "images", url.rsplit("/", 1)[-1]), read_bytes(url))
    wanted = set(ids)
    target.write_manifest([r for r in source.read_manifest() if r.get("id") in wanted])
    return ids


def _table2(
    out: str,
    data: str,
    test: str,
    bundle: str,
    condition: str,
    sampling_steps: int | None,
    workers: int,
    gpus_per_worker: float,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Table 2 on the first DOWNSTREAM_REAL volumes of ``data``: synthetic samples guided by
    their labels, then jobs/downstream.py's Ray Train run scored on ``test``."""
    from caldm.distributed.downstream import DownstreamRequest, run_downstream
    from caldm.distributed.generate import generate_dataset

    real, synthetic = join_url(out, "downstream", "real"), join_url(out, "downstream", "synthetic")
    ids = subset_dataset(data, real, DOWNSTREAM_REAL, (condition,))
    log(f"pipeline: Table 2: {DOWNSTREAM_PER_LABEL} synthetic volumes per label of {len(ids)} "
        "real training volumes")
    gen = generate_dataset(
        bundle, real, synthetic, per_label=DOWNSTREAM_PER_LABEL, steps=sampling_steps,
        workers=workers, gpus_per_worker=gpus_per_worker, log=log,
    )
    if gen.errors:
        raise DataError(real, f"{len(gen.errors)} label(s) failed; see {synthetic}/errors.jsonl")
    return run_downstream(
        DownstreamRequest(
            real=real, test=test, synthetic=(synthetic,), task=condition,
            out=join_url(out, "downstream"), seeds=DOWNSTREAM_SEEDS,
            max_steps=DOWNSTREAM_STEPS,
            workers=workers, gpus_per_worker=gpus_per_worker,
        ),
        log=log,
    )


def _run_path(
    out: str,
    data: str | None = None,
    heldout: str | None = None,
    preset: str = "tiny",
    count: int = 8,
    per_label: int = 1,
    steps_scale: float = 1.0,
    sampling_steps: int | None = None,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    condition: str = "layers",
    layer_classes: int = 9,
    overrides: tuple[str, ...] = (),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The body of :func:`run_pipeline`.

    Without ``data`` a phantom dataset of ``count`` training volumes and ``max(2, count // 4)``
    held-out volumes with ``layer_classes`` layer classes is written first (with ``data`` the
    class count comes from its labels). With ``data`` and no ``heldout``, the report compares
    against the training volumes themselves and says so (``"heldout": false``).
    """
    from caldm.data.phantom import write_phantom_dataset
    from caldm.distributed.encode import encode_latents
    from caldm.distributed.evaluation import evaluate
    from caldm.distributed.generate import generate_dataset
    from caldm.distributed.train import TrainRequest, train

    started = time.time()
    out = out.rstrip("/")
    if data is None:
        data, heldout = join_url(out, "data", "train"), join_url(out, "data", "heldout")
        if not url_exists(join_url(data, "manifest.jsonl")):
            log(f"pipeline: writing {count} phantom volumes to {data}")
            write_phantom_dataset(data, count, preset, seed=0, num_classes=layer_classes)
        if not url_exists(join_url(heldout, "manifest.jsonl")):
            n_heldout = max(2, count // 4)
            write_phantom_dataset(heldout, n_heldout, preset, 10_000, num_classes=layer_classes)
    reference = heldout or data

    latents = join_url(out, "latents")
    bundle: str | None = None
    for step in PATH:
        run = join_url(out, "runs", step.name)
        max_steps = max(2, int(round(step.max_steps * steps_scale)))
        if step.stage == "diff3d" and not url_exists(join_url(latents, STATS_FILE)):
            log(f"pipeline: encoding latents of {data} with {bundle}")
            encode_latents(bundle, data, latents)
        summary = read_json(join_url(run, "summary.json"))
        if summary and summary.get("global_step", 0) >= max_steps:
            log(f"pipeline: {step.name} already done ({summary['global_step']} steps)")
        else:
            log(f"pipeline: training {step.name} ({step.stage}, {max_steps} steps)")
            summary = train(
                TrainRequest(
                    stage=step.stage,
                    data=latents if step.data == "latents" else data,
                    out=run,
                    preset=preset,
                    bundle=bundle,
                    condition=condition if step.condition else None,
                    workers=workers,
                    gpus_per_worker=gpus_per_worker,
                    max_steps=max_steps,
                    # resume points and logging spaced for runs of hundreds of steps
                    overrides=(
                        f"train.checkpoint_every={max(2, max_steps // 4)}",
                        "train.log_every=10",
                        f"train.preview_every={max(2, max_steps // 2)}",
                        *overrides,  # the user's last: they win
                    ),
                )
            )
            log(f"pipeline: {step.name} loss {summary.get('loss')}")
        bundle = summary["bundle"]

    synthetic = join_url(out, "synthetic")
    log(f"pipeline: generating {per_label} volume(s) per label of {reference} into {synthetic}")
    gen = generate_dataset(
        bundle,
        reference,
        synthetic,
        per_label=per_label,
        steps=sampling_steps,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        log=log,
    )
    if gen.errors:
        n = len(gen.errors)
        raise DataError(reference, f"{n} label(s) failed; see {synthetic}/errors.jsonl")

    # Label fidelity: a segmenter trained on every real training volume segments the
    # synthetic volumes (against their guiding labels) and the held-out real ones.
    report = evaluate(
        reference,
        synthetic,
        out=join_url(out, "report.json"),
        max_slices_per_volume=8,
        train_real=data,
        segmenter_steps=FIDELITY_STEPS,
    )
    real_profile = mean_depth_profile(reference)
    syn_profile = mean_depth_profile(synthetic)
    corr = float(np.corrcoef(real_profile, syn_profile)[0, 1])
    tv_real, tv_syn = report["tv"]["real"]["mean"], report["tv"]["synthetic"]["mean"]
    report.update(
        {
            "depth_profile_correlation": corr,
            "tv_ratio": tv_syn / tv_real if tv_real else None,
            "heldout": heldout is not None,
            "bundle": bundle,
            "synthetic": synthetic,
            "wall_s": round(time.time() - started, 1),
        }
    )
    write_bytes(join_url(out, "report.json"), json.dumps(report, indent=1).encode())
    _profile_png(real_profile, syn_profile, join_url(out, "depth_profiles.png"))
    log(
        f"pipeline: intra-FID {report['intra_fid']:.3f}, inter-FID {report['inter_fid']:.3f}, "
        f"TV synthetic/real {report['tv_ratio']:.2f}, depth-profile correlation {corr:.3f}, "
        "slice consistency synthetic/real "
        + ", ".join(f"{k} {v['ratio']:.2f}" for k, v in report["slice_consistency"].items())
    )
    log(f"pipeline: label fidelity {_fidelity_line(report['label_fidelity'])}")

    started_table2 = time.time()
    table2 = _table2(out, data, reference, bundle, condition, sampling_steps, workers,
                     gpus_per_worker, log)
    report["table2"] = {
        "rows": table2["rows"],
        "report": join_url(out, "downstream", "report.json"),
        "wall_s": round(time.time() - started_table2, 1),
    }
    report["wall_s"] = round(time.time() - started, 1)
    write_bytes(join_url(out, "report.json"), json.dumps(report, indent=1).encode())
    return report


def _fidelity_line(fidelity: dict[str, Any]) -> str:
    """'Dice synthetic 0.70 vs held-out real 0.95 (ratio 0.74), MAD ...' for the log."""
    parts = []
    for key, value in fidelity["ratio"].items():
        syn, real = fidelity["synthetic"][key]["mean"], fidelity["real"][key]["mean"]
        ratio = f"{value:.2f}" if value is not None else "n/a"
        parts.append(f"{key} synthetic {syn:.3f} vs held-out real {real:.3f} (ratio {ratio})")
    return ", ".join(parts)


@contextlib.contextmanager
def _one_tracking_store(out: str) -> Iterator[None]:
    """One MLflow database for the whole path (else one per stage run), unless the user chose
    one; Ray workers receive it like every MLFLOW_* variable."""
    if "MLFLOW_TRACKING_URI" in os.environ:
        yield
        return
    from caldm.distributed.tracking import tracking_uri

    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri(out)
    try:
        yield
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)


def run_pipeline(out: str, **kwargs: Any) -> dict[str, Any]:
    """Run (or resume) the whole path; returns the final report (also ``<out>/report.json``).

    Keyword arguments: ``data``, ``heldout``, ``preset``, ``count``, ``per_label``,
    ``steps_scale``, ``sampling_steps``, ``workers``, ``gpus_per_worker``, ``condition``,
    ``layer_classes`` (phantom only), ``overrides`` (``key=value`` config overrides for every
    stage, after the job's own), ``log`` (see the module docstring). Without ``data`` a
    phantom dataset of ``count`` training volumes and ``max(2, count // 4)`` held-out volumes
    is written first.
    """
    _check_job(out.rstrip("/"), kwargs)
    with _one_tracking_store(out):
        return _run_path(out, **kwargs)


JOB_FILE = "job.json"  # what a rerun must repeat to resume the job


def _check_job(out: str, kw: dict[str, Any]) -> None:
    """Refuse, before anything is written, a bad or job-owned override or a rerun with another
    preset, condition or overrides than the first run (its finished stages used those)."""
    overrides = list(kw.get("overrides", ()))
    load_config(kw.get("preset", "tiny"), overrides=overrides)  # one line naming a bad key
    if any(o.split("=", 1)[0].strip() == "train.max_steps" for o in overrides):
        raise ConfigError("--set train.max_steps: the job sets each stage's; use --steps-scale")
    record = {"preset": kw.get("preset", "tiny"), "condition": kw.get("condition", "layers")}
    record["overrides"] = overrides
    url, before = join_url(out, JOB_FILE), read_json(join_url(out, JOB_FILE))
    changed = [f"{k} {before.get(k)!r}" for k in record if before and before.get(k) != record[k]]
    if changed:
        raise ConfigError(f"{url}: this job ran with {', '.join(changed)}; rerun it with the "
                          "same values (or use a new --out)")
    if before is None:
        write_json(url, record)
