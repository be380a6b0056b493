"""Segmentation as the judge of synthetic data: (image, label) pairs, a segmenter's scores,
label fidelity, and the Table 2 report's table and chart.

Used by ``jobs/evaluate.py`` (label fidelity: does each synthetic volume follow its guiding
label?) and ``jobs/downstream.py`` (Table 2: is synthetic data worth training on?); the Ray
wiring of both lives in :mod:`caldm.distributed.evaluation` and
:mod:`caldm.distributed.downstream`. The segmenter itself is
:mod:`caldm.nn.nets.segmenter`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from caldm import metrics
from caldm.data.io import read_label, read_volume
from caldm.data.layout import DatasetLayout
from caldm.errors import CaldmError, DataError
from caldm.nn.nets.segmenter import (
    VESSEL_CLASSES,
    SegmenterConfig,
    Task,
    image_planes,
    label_planes,
    resize_images,
    resize_labels,
    segment_volume,
)

METRIC_KEYS: dict[str, tuple[str, ...]] = {"layers": ("dice", "mad"), "vessels": ("iou_a", "iou_v")}
METRIC_NAMES = {"dice": "Dice", "mad": "MAD (px)", "iou_a": "IoU-A", "iou_v": "IoU-V"}
HIGHER_IS_BETTER = {"dice": True, "mad": False, "iou_a": True, "iou_v": True}


# ------------------------------------------------------------------------ reading pairs


@dataclass
class Pair:
    """One volume and its label, as the task sees them."""

    id: str
    image_url: str
    label_url: str
    volume: np.ndarray
    label: np.ndarray  # layers: D x H x W; vessels: D x W


def read_pair(layout: DatasetLayout, sample_id: str, task: Task, num_classes: int | None) -> Pair:
    """A sample's volume and its ``task`` label, checked: the label exists, matches the image's
    shape and (given ``num_classes``) holds no class >= ``num_classes``. DataError names the
    file otherwise."""
    image_url = layout.image_url(sample_id)
    label_url = layout.label_url(task, sample_id)
    if sample_id not in layout.label_ids(task):
        raise DataError(label_url, f"missing {task} label for image {image_url}")
    volume, _ = read_volume(image_url)
    label = read_label(label_url, task, expect_shape=tuple(volume.shape))
    if num_classes is not None and label.size and int(label.max()) >= num_classes:
        raise DataError(
            label_url,
            f"{task} label has class {int(label.max())}, but the real training labels have "
            f"{num_classes} classes (0..{num_classes - 1})",
        )
    return Pair(sample_id, image_url, label_url, volume, label)


def iter_pairs(
    root: str, task: Task, num_classes: int | None, ids: Iterable[str] | None = None
) -> Iterator[Pair]:
    """Every (checked) pair of a dataset, one at a time; DataError when it has no images or no
    ``task`` labels at all."""
    layout = DatasetLayout(root)
    ids = list(ids) if ids is not None else layout.ids()
    if not layout.label_ids(task):
        raise DataError(f"{layout.root}/labels/{task}", f"no {task} labels (<id>.nii.gz) found")
    for sample_id in ids:
        yield read_pair(layout, sample_id, task, num_classes)


def num_classes_of(root: str, task: Task) -> int:
    """The class count of a dataset's ``task`` labels: vessels 3; layers from the manifest's
    ``layer_classes`` when every record gives one, else the largest class in the labels + 1."""
    if task == "vessels":
        return VESSEL_CLASSES
    layout = DatasetLayout(root)
    declared = {r.get("layer_classes") for r in layout.read_manifest()}
    if declared and None not in declared:
        return int(max(declared))
    top = 0
    for sample_id in layout.label_ids(task):
        top = max(top, int(read_label(layout.label_url(task, sample_id), task).max()))
    if top < 1:
        raise DataError(f"{layout.root}/labels/{task}", "labels hold no foreground class")
    return top + 1


def synthetic_by_label(roots: Iterable[str], task: Task) -> dict[str, list[tuple[str, str]]]:
    """Guiding label id -> [(dataset root, sample id), ...] over the synthetic datasets, each
    list in (dataset, id) order. The label comes from the manifest's ``label_id``, else from
    the ``<label>_s<k>`` sample id, else the sample is its own label."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for root in roots:
        layout = DatasetLayout(root)
        ids = layout.ids()
        if not layout.label_ids(task):
            raise DataError(f"{layout.root}/labels/{task}", f"no {task} labels (<id>.nii.gz) found")
        source = {r["id"]: r.get("label_id") for r in layout.read_manifest() if "id" in r}
        for sample_id in ids:
            label_id = source.get(sample_id)
            if not label_id:
                stem, _, k = sample_id.rpartition("_s")
                label_id = stem if stem and k.isdigit() else sample_id
            groups.setdefault(str(label_id), []).append((layout.root, sample_id))
    return groups


@dataclass
class PlaneSet:
    """Training planes at the segmenter's plane shape (uint8 labels, float16 images)."""

    images: np.ndarray  # (N, h, w)
    labels: np.ndarray  # (N, h, w)
    volumes: list[str]


def planes_of(pairs: Iterable[Pair], cfg: SegmenterConfig) -> PlaneSet:
    """The training planes of pairs, resized to ``cfg.plane_shape``."""
    import torch

    images, labels, names = [], [], []
    for pair in pairs:
        x = resize_images(torch.from_numpy(image_planes(pair.volume, cfg.task)), cfg.plane_shape)
        y = resize_labels(torch.from_numpy(label_planes(pair.label, cfg.task)), cfg.plane_shape)
        images.append(x[:, 0].numpy().astype(np.float16))
        labels.append(y[:, 0].numpy().astype(np.uint8))
        names.append(pair.image_url)
    h, w = cfg.plane_shape
    if not names:
        return PlaneSet(np.zeros((0, h, w), np.float16), np.zeros((0, h, w), np.uint8), [])
    return PlaneSet(np.concatenate(images), np.concatenate(labels), names)


# ------------------------------------------------------------------------------ scoring


def score_segmenter(model: Any, cfg: SegmenterConfig, pairs: Iterable[Pair]) -> dict[str, Any]:
    """Segment every pair's volume and compare with its label; one value per volume.

    Returns ``{metric: {"mean", "std"}, "n": volumes}`` (metrics of :data:`METRIC_KEYS`).
    """
    if cfg.task == "layers":
        dice, mad = metrics.MeanDice(cfg.num_classes), metrics.BoundaryMAD(cfg.num_classes)
        scorers: list[Callable[[np.ndarray, np.ndarray], Any]] = [dice, mad]
    else:
        iou = metrics.ArteryVeinIoU()
        scorers = [iou]
    n = 0
    for pair in pairs:
        pred = segment_volume(model, cfg, pair.volume)
        for scorer in scorers:
            scorer(pred, pair.label)
        n += 1
    if n == 0:
        raise DataError("test set", "no volumes to score")
    if cfg.task == "layers":
        values = {"dice": dice.values, "mad": mad.values}
    else:
        values = {k: [v[k] for v in iou.values] for k in ("iou_a", "iou_v")}
    out: dict[str, Any] = {k: nan_mean_std(v) for k, v in values.items()}
    out["n"] = n
    return out


def nan_mean_std(values: list[float]) -> dict[str, float]:
    """Mean and std of the finite values (NaN, NaN when there are none)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    return metrics.mean_std(v) if v.size else {"mean": float("nan"), "std": float("nan")}


# ----------------------------------------------------------------------- label fidelity


def fidelity_task(synthetic: str) -> str:
    """The label kind the synthetic dataset was guided by: ``layers`` if it has layer labels,
    else ``vessels``; DataError naming ``<synthetic>/labels`` when it has neither."""
    from caldm.data.layout import DatasetLayout

    layout = DatasetLayout(synthetic)
    for kind in ("layers", "vessels"):
        if layout.label_ids(kind):
            return kind
    raise DataError(
        f"{layout.root}/labels",
        "no layers or vessels labels beside the images: label fidelity needs the guiding labels",
    )


def load_or_train_segmenter(
    task: str,
    segmenter: str | None = None,
    train_real: str | None = None,
    steps: int = 300,
    seed: int = 0,
    log: Any = print,
) -> tuple[Any, Any, str]:
    """(model, SegmenterConfig, where it came from): the segmenter file at ``segmenter``
    (written by ``jobs/downstream.py``), or one trained here on the real dataset ``train_real``
    for ``steps`` steps. Nothing is downloaded."""
    from caldm.data.io import read_bytes
    from caldm.nn.nets.segmenter import (
        SegmenterConfig,
        plane_shape_for,
        segmenter_from_bytes,
        train_segmenter,
    )

    if segmenter is not None:
        try:
            model, cfg = segmenter_from_bytes(read_bytes(segmenter), segmenter)
        except ValueError as exc:
            raise DataError(segmenter, str(exc).removeprefix(f"{segmenter}: ")) from None
        if cfg.task != task:
            raise DataError(segmenter, f"a {cfg.task} segmenter; the synthetic labels are {task}")
        return model, cfg, segmenter
    if train_real is None:
        raise CaldmError("label fidelity needs --segmenter PATH or --train-real URL")
    num_classes = num_classes_of(train_real, task)
    pairs = list(iter_pairs(train_real, task, num_classes))
    cfg = SegmenterConfig(task, num_classes, plane_shape_for(pairs[0].volume.shape, task))
    planes = planes_of(pairs, cfg)
    log(f"evaluate: training a {task} segmenter on {len(pairs)} real volumes ({steps} steps)")
    model = train_segmenter(
        planes.images.astype(np.float32),
        planes.labels,
        cfg,
        steps,
        seed,
        log=lambda step, loss: log(f"evaluate: segmenter step {step}/{steps}, loss {loss:.3f}"),
    )
    return model, cfg, f"trained on {train_real} ({steps} steps, seed {seed})"


def label_fidelity(
    heldout: str,
    synthetic: str,
    segmenter: str | None = None,
    train_real: str | None = None,
    steps: int = 300,
    log: Any = print,
) -> dict[str, Any]:
    """Label fidelity of ``synthetic`` (each volume against the label that guided it), next to
    the same numbers on the held-out real volumes of ``heldout``.

    Returns ``{"task", "segmenter", "num_classes", "real": {metric: {"mean", "std"}, "n"},
    "synthetic": {...}, "ratio": {metric: synthetic mean / real mean}}``; metrics are
    ``dice``, ``mad`` (layers) or ``iou_a``, ``iou_v``, ``vessel_contrast`` (vessels). Labels
    with a class the segmenter does not know, or of another shape than their image, are a
    DataError naming the file.
    """
    task = fidelity_task(synthetic)
    model, cfg, source = load_or_train_segmenter(task, segmenter, train_real, steps, log=log)
    report: dict[str, Any] = {"task": task, "segmenter": source, "num_classes": cfg.num_classes}
    for name, root in (("real", heldout), ("synthetic", synthetic)):
        contrast: list[float] = []

        def pairs(root: str = root, contrast: list[float] = contrast) -> Any:
            for pair in iter_pairs(root, task, cfg.num_classes):
                if task == "vessels":
                    contrast.append(metrics.vessel_contrast(pair.volume, pair.label))
                yield pair

        report[name] = score_segmenter(model, cfg, pairs())
        if task == "vessels":
            finite = [c for c in contrast if np.isfinite(c)]
            report[name]["vessel_contrast"] = (
                metrics.mean_std(finite) if finite else {"mean": float("nan"), "std": 0.0}
            )
    report["ratio"] = {
        k: report["synthetic"][k]["mean"] / report["real"][k]["mean"]
        if report["real"][k]["mean"]
        else None
        for k in report["real"]
        if k != "n"
    }
    return report


# ------------------------------------------------------------------ the Table 2 report


def markdown_table(report: dict[str, Any]) -> str:
    """The report as a markdown table (mean +- std over seeds)."""
    keys = METRIC_KEYS[report["task"]]
    head = ["Train", "volumes", *(METRIC_NAMES[k] + (" ↑" if HIGHER_IS_BETTER[k] else " ↓")
                                  for k in keys)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report["rows"]:
        cells = [row["name"], str(row["n_volumes"])]
        cells += [f"{row[k]['mean']:.3f} ± {row[k]['std']:.3f}" for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"\n{report['task']}: {report['n_test']} real test volumes, {report['seeds']} seed(s), "
            f"{report['max_steps']} steps x batch {report['batch_size']} per row.\n")
    return "\n".join(lines) + "\n" + note


def bar_chart(report: dict[str, Any]) -> Any:
    """A PIL bar chart: one panel per metric, one bar (mean, with a +- std whisker) per row."""
    from PIL import Image, ImageDraw

    keys = METRIC_KEYS[report["task"]]
    rows = report["rows"]
    pw, ph, pad = 60 + 70 * len(rows), 260, 20
    img = Image.new("RGB", (pw * len(keys), ph + 60), "white")
    draw = ImageDraw.Draw(img)
    colours = [(70, 110, 190), (220, 120, 50), (90, 170, 90), (160, 90, 170), (120, 120, 120)]
    for j, key in enumerate(keys):
        x0 = j * pw
        vals = [r[key]["mean"] for r in rows]
        errs = [r[key]["std"] for r in rows]
        finite = [v + e for v, e in zip(vals, errs) if np.isfinite(v)]
        top = max(finite + [1e-6]) * 1.1
        arrow = "higher is better" if HIGHER_IS_BETTER[key] else "lower is better"
        draw.text((x0 + pad, 4), f"{METRIC_NAMES[key]} ({arrow})", fill="black")
        base = ph
        draw.line([(x0 + pad, base), (x0 + pw - pad, base)], fill="black")
        for i, (row, v, e) in enumerate(zip(rows, vals, errs)):
            bx = x0 + pad + 10 + i * 70
            if np.isfinite(v):
                y = base - (v / top) * (ph - 40)
                draw.rectangle([bx, y, bx + 40, base], fill=colours[i % len(colours)])
                ye0, ye1 = base - ((v - e) / top) * (ph - 40), base - ((v + e) / top) * (ph - 40)
                draw.line([(bx + 20, ye0), (bx + 20, ye1)], fill="black", width=2)
                draw.text((bx, y - 14), f"{v:.3f}", fill="black")
            draw.text((bx - 4, base + 6), row["name"][:12], fill="black")
    return img
