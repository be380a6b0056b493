"""The paper's Table 2 as a Ray Train job: is synthetic data worth training on?

``jobs/downstream.py --real URL --test URL --synthetic URL [--synthetic URL] --task T --out URL``
trains the same segmenter (:mod:`caldm.nn.nets.segmenter`) under the same budget (steps,
batch size) and seeds on several training sets and scores every model on the real test set:

| row (``train``)  | ``syn_per_label`` | training planes                                     |
|------------------|-------------------|-----------------------------------------------------|
| real             | 0                 | the real training volumes                           |
| synthetic        | k (1 or 2)        | k synthetic samples per guiding label ("200% Syn")  |
| real+synthetic   | 1                 | real + 1 sample per label ("Real+100% Syn")         |
| real+synthetic   | 2                 | real + 2 samples per label ("Real+200% Syn")        |

Rows needing 2 samples per label appear when the synthetic datasets hold 2 per label (the
manifest's ``label_id``, else the ``<label>_s<k>`` id, tells which label a sample came from;
several ``--synthetic`` datasets are pooled label by label). Metrics on the real test set,
mean +- std over seeds: layers: mean foreground Dice and boundary MAD (px; see
:class:`caldm.metrics.BoundaryMAD`); vessels: IoU-A and IoU-V of the en-face map.

Outputs under ``--out``: ``report.json`` (the contract below), ``report.md`` (the table),
``report.png`` (bar chart), ``segmenter_real.safetensors`` (the real-trained model of seed 0,
for ``jobs/evaluate.py --segmenter``), one MLflow run per row plus a ``table2`` run with the
chart (experiment ``downstream``), and Ray Train's checkpoints under ``<out>/downstream``:
a rerun of the same command resumes after the last finished (row, seed).

Every input is read and checked on the driver before anything is written: a synthetic
dataset without labels, a label of another shape or class count, an empty test set stop the
job with one line naming the file.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from caldm.data.io import write_bytes
from caldm.data.layout import DatasetLayout
from caldm.errors import CaldmError, ConfigError, root_cause
from caldm.nn.nets.segmenter import TASKS, SegmenterConfig, Task, plane_shape_for, segmenter_bytes
from caldm.segmentation import (
    METRIC_KEYS,
    Pair,
    PlaneSet,
    bar_chart,
    iter_pairs,
    markdown_table,
    nan_mean_std,
    num_classes_of,
    planes_of,
    read_pair,
    score_segmenter,
    synthetic_by_label,
)

SEGMENTER_FILE = "segmenter_real.safetensors"


class DownstreamFailed(CaldmError):
    """The Ray Train run failed; the message names the root cause."""

    exit_code = 1


@dataclass
class DownstreamRequest:
    """One Table 2 run (see the module docstring)."""

    real: str
    test: str
    synthetic: tuple[str, ...]
    task: Task
    out: str
    seeds: int = 3
    max_steps: int = 300
    batch_size: int = 8
    lr: float = 2e-3
    workers: int = 1
    gpus_per_worker: float = 0.0
    per_label: tuple[int, ...] = (1, 2)  # Real+100% and Real+200% Syn, when available
    callbacks: list[Any] = field(default_factory=list)

    def check(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"--task must be layers or vessels, got {self.task!r}")
        if not self.synthetic:
            raise ConfigError("--synthetic: give at least one synthetic dataset")
        for name, value in (("--seeds", self.seeds), ("--max-steps", self.max_steps),
                            ("--batch-size", self.batch_size), ("--workers", self.workers)):
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if self.gpus_per_worker < 0:
            raise ConfigError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}")


# ----------------------------------------------------------------------------- planning


@dataclass
class Row:
    """One training set of the table."""

    train: str  # "real" | "synthetic" | "real+synthetic"
    syn_per_label: int
    volumes: list[str]

    @property
    def key(self) -> str:
        return self.train if self.train == "real" else f"{self.train}x{self.syn_per_label}"

    @property
    def name(self) -> str:
        syn = f"{100 * self.syn_per_label}% Syn"
        return {"real": "Real", "synthetic": syn}.get(self.train, f"Real+{syn}")


@dataclass
class Plan:
    """Everything the workers need, checked and loaded on the driver."""

    req: DownstreamRequest
    cfg: SegmenterConfig
    rows: list[Row]
    sets: dict[str, PlaneSet]  # row key -> training planes
    test: list[Pair]


def plan(req: DownstreamRequest, log: Callable[[str], None] = print) -> Plan:
    """Read and check every input (nothing is written): class count from the real training
    labels, every synthetic and test label against it, planes of every training set."""
    req.check()
    task = req.task
    num_classes = num_classes_of(req.real, task)
    real_pairs = list(iter_pairs(req.real, task, num_classes))
    cfg = SegmenterConfig(task, num_classes, plane_shape_for(real_pairs[0].volume.shape, task))
    test = list(iter_pairs(req.test, task, num_classes))
    groups = synthetic_by_label(req.synthetic, task)
    most = max(len(v) for v in groups.values())
    per_label = sorted({k for k in req.per_label if k <= most} | {min(most, max(req.per_label))})
    layouts = {layout.root: layout for layout in map(DatasetLayout, req.synthetic)}
    one: dict[tuple[str, str], PlaneSet] = {}  # (root, id) -> its planes, read once
    for group in groups.values():
        for root, sid in group[: max(per_label)]:
            one[root, sid] = planes_of([read_pair(layouts[root], sid, task, num_classes)], cfg)
    real_set = planes_of(real_pairs, cfg)

    def joined(parts: list[PlaneSet]) -> PlaneSet:
        return PlaneSet(
            np.concatenate([s.images for s in parts]),
            np.concatenate([s.labels for s in parts]),
            [v for s in parts for v in s.volumes],
        )

    def syn(k: int) -> list[PlaneSet]:
        return [one[key] for group in groups.values() for key in group[:k]]

    k_syn = max(per_label)
    rows = [Row("real", 0, real_set.volumes), Row("synthetic", k_syn, joined(syn(k_syn)).volumes)]
    rows += [Row("real+synthetic", k, joined([real_set, *syn(k)]).volumes) for k in per_label]
    sets = {"real": real_set, rows[1].key: joined(syn(k_syn))}
    sets.update({r.key: joined([real_set, *syn(r.syn_per_label)]) for r in rows[2:]})
    log(
        f"downstream: {task}, {num_classes} classes, {len(real_pairs)} real / "
        f"{sum(len(v) for v in groups.values())} synthetic ({len(groups)} labels) / "
        f"{len(test)} test volumes; rows: {', '.join(r.name for r in rows)}"
    )
    # Callbacks stay on the driver; the plan travels to the workers.
    return Plan(replace(req, callbacks=[]), cfg, rows, sets, test)


# ------------------------------------------------------------------------------ workers


def result_key(p: Plan, row: Row, seed: int) -> str:
    """A (row, seed) result's key in the checkpoint; it names the budget and the row's
    volumes, so a rerun with other settings or data retrains instead of reusing results."""
    import hashlib

    volumes = hashlib.sha256("\n".join(row.volumes).encode()).hexdigest()[:12]
    r = p.req
    return f"{row.key}/seed{seed}/steps{r.max_steps}/batch{r.batch_size}/lr{r.lr}/{volumes}"


def _worker(config: dict[str, Any]) -> None:
    """Ray Train loop: train and score every (row, seed) not yet in the checkpoint."""
    import ray
    import ray.train
    import ray.train.torch

    p: Plan = ray.get(config["plan"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    results: dict[str, Any] = {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            with open(os.path.join(directory, "results.json")) as f:
                results = json.load(f)
    req = p.req
    reported = False

    def report() -> None:
        directory = tempfile.mkdtemp(prefix="caldm-downstream-")
        try:
            ckpt = None
            if rank == 0:
                with open(os.path.join(directory, "results.json"), "w") as f:
                    json.dump(results, f)
                ckpt = ray.train.Checkpoint.from_directory(directory)
            ray.train.report({"done": len(results)}, checkpoint=ckpt)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    for row in p.rows:
        for seed in range(req.seeds):
            key = result_key(p, row, seed)
            if key in results:
                continue
            model = train_segmenter_in_worker(p, p.sets[row.key], seed, device, rank, world)
            if rank == 0:
                results[key] = score_segmenter(model, p.cfg, p.test)
                if row.train == "real" and seed == 0:
                    write_bytes(f"{req.out}/{SEGMENTER_FILE}", segmenter_bytes(model, p.cfg))
            report()
            reported = True
    if not reported:  # a resumed run that had nothing left: report once so it has a result
        report()


def train_segmenter_in_worker(
    p: Plan, s: PlaneSet, seed: int, device: Any, rank: int, world: int
) -> Any:
    """:func:`~caldm.nn.nets.segmenter.train_segmenter` with DDP across the workers."""
    import ray.train.torch

    from caldm.nn.nets.segmenter import train_segmenter

    return train_segmenter(
        s.images.astype(np.float32),
        s.labels,
        p.cfg,
        steps=p.req.max_steps,
        seed=seed,
        batch_size=p.req.batch_size,
        lr=p.req.lr,
        device=device,
        prepare=ray.train.torch.prepare_model if world > 1 else None,
        rank=rank,
        world_size=world,
    )


# ------------------------------------------------------------------------------ driver


def summarise(p: Plan, results: dict[str, Any]) -> dict[str, Any]:
    """The report: per row, mean +- std over seeds of each seed's test-set mean."""
    rows = []
    for row in p.rows:
        per_seed = [results[result_key(p, row, s)] for s in range(p.req.seeds)]
        entry: dict[str, Any] = {
            "train": row.train,
            "name": row.name,
            "syn_per_label": row.syn_per_label,
            "n_volumes": len(row.volumes),
        }
        for m in METRIC_KEYS[p.req.task]:
            entry[m] = nan_mean_std([r[m]["mean"] for r in per_seed])
            entry[m]["per_seed"] = [r[m]["mean"] for r in per_seed]
        rows.append(entry)
    return {
        "task": p.req.task,
        "rows": rows,
        "num_classes": p.cfg.num_classes,
        "n_test": len(p.test),
        "seeds": p.req.seeds,
        "max_steps": p.req.max_steps,
        "batch_size": p.req.batch_size,
        "workers": p.req.workers,
        "segmenter": {**json.loads(p.cfg.to_json()), "url": f"{p.req.out}/{SEGMENTER_FILE}"},
        "real": p.req.real,
        "test": p.req.test,
        "synthetic": list(p.req.synthetic),
    }


def write_report(p: Plan, report: dict[str, Any], log: Callable[[str], None] = print) -> None:
    """report.json, report.md, report.png under ``out``; MLflow runs (experiment
    ``downstream``): one per row with its metrics, and ``table2`` with the chart and table."""
    from caldm.distributed import tracking

    out = p.req.out.rstrip("/")
    image = bar_chart(report)
    png = io.BytesIO()
    image.save(png, format="PNG")
    table = markdown_table(report)
    write_bytes(f"{out}/report.json", (json.dumps(report, indent=1) + "\n").encode())
    write_bytes(f"{out}/report.md", table.encode())
    write_bytes(f"{out}/report.png", png.getvalue())
    params = {k: report[k] for k in ("task", "num_classes", "n_test", "seeds", "max_steps",
                                     "batch_size", "workers", "real", "test", "synthetic")}
    for row in report["rows"]:
        name = f"{report['task']}: {row['name']}"
        with tracking.start_run(out, "downstream", name, {**params, "train": row["train"],
                                                          "syn_per_label": row["syn_per_label"],
                                                          "n_volumes": row["n_volumes"]}):
            tracking.log_metrics({k: row[k] for k in METRIC_KEYS[report["task"]]})
    with tracking.start_run(out, "downstream", f"{report['task']}: table2", params):
        tracking.log_image(image, "report.png")
        import mlflow

        mlflow.log_text(table, "report.md")
        mlflow.log_dict(report, "report.json")
    log(table)


def run_downstream(req: DownstreamRequest, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Check the inputs, train and score every (row, seed) on Ray Train, write the outputs
    (module docstring); returns the report. Rerunning resumes."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from caldm.distributed.cluster import ensure_ray, worker_env
    from caldm.distributed.train import _storage

    p = plan(req, log)
    ray = ensure_ray()
    storage_path, storage_fs = _storage(req.out.rstrip("/"))
    use_gpu = req.gpus_per_worker > 0
    resources = {"CPU": 1, **({"GPU": req.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"plan": ray.put(p)},
        scaling_config=ScalingConfig(
            num_workers=req.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name="downstream",  # fixed: a rerun finds the finished (row, seed)s and resumes
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=1),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            worker_runtime_env={"env_vars": worker_env()},
            callbacks=list(req.callbacks) or None,
        ),
    )
    try:
        result = trainer.fit()
    except Exception as exc:
        raise DownstreamFailed(
            f"{req.out}: downstream training failed ({root_cause(exc)}); rerun to resume"
        ) from exc
    with result.checkpoint.as_directory() as directory:
        with open(os.path.join(directory, "results.json")) as f:
            results = json.load(f)
    report = summarise(p, results)
    write_report(p, report, log)
    return report
