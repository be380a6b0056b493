"""Bulk label-guided synthetic datasets ("200% Syn") as a Ray Data job.

For every real label of the kind the bundle was fine-tuned on (``layers`` or ``vessels``) at
``labels``, ``per_label`` volumes are sampled and written under ``out`` in the dataset layout:

```
<out>/images/<label_id>_s<index>.nii.gz          the synthetic volume (uint8, D x H x W)
<out>/labels/<kind>/<label_id>_s<index>.nii.gz   the label it was conditioned on
<out>/manifest.jsonl                             one row per sample (provenance, checksums)
<out>/errors.jsonl                               {"label", "error"} per label that failed,
                                                 {"sample", "label", "error"} per sample
<out>/.manifest/<sample_id>.json                 per-sample rows: the resume journal
```

Pipeline: a list of tiny sample rows (one block each) -> an actor pool (one actor per GPU) that
loads the bundle once and samples -> CPU tasks that encode, write and verify. Ray Data streams
the stages, so an actor starts its next volume while the previous one is being written.

Determinism: a sample's seed is a hash of (label id, index) and never depends on task order or
on which actor ran it, so a rerun reproduces the same volumes (gzip with a fixed mtime makes
the files byte-identical too).

Labels: the written label is the one the volume was conditioned on. A real label whose grid
differs from the bundle's image shape is resized with nearest neighbour to it (D x H x W for
layers, D x W for vessels); the voxel spacing of the real label is scaled so the physical
extent is kept (a vessels map has no depth axis; its H spacing is written as 1). The sampler
itself reads the label at its own resolution (class fractions, :mod:`caldm.data.labels`).

Resume and integrity: a sample is complete when ``.manifest/<sample_id>.json`` exists, matches
this run's bundle hash, sampler and steps, and its image and label exist with the sizes that row
records. The row is written only after both files were written (atomically: temp file + rename
locally, one PUT on S3) and verified (size read back; on S3 also the object's stored SHA-256
additional checksum, which, unlike the ETag, is the content's hash on SSE-KMS and SSE-C
buckets too), so a kill at any moment leaves each sample either complete or redone by the next
run. The per-sample
rows are consolidated into ``manifest.jsonl`` (one atomic write, sorted by id) at the end of
every run, giving exactly one row per sample; the rows stay as the journal for later reruns.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

# caldm.bundle (and with it torch) is imported inside the driver functions only: writer tasks
# import this module, and a torch import costs seconds of each fresh worker's start.
from caldm.data.generated import (
    ATTEMPTS,
    Provenance,
    complete_samples,
    consolidate_manifest,
    plan_samples,
    remove_stale_temp_files,
    write_errors,
    write_sample,
)
from caldm.data.io import LabelKind
from caldm.data.labels import read_label_map, resize_to_image
from caldm.data.layout import DatasetLayout
from caldm.errors import BundleError, ConfigError, DataError, caldm_cause, one_line
from caldm.progress import RateProgress

if TYPE_CHECKING:
    from caldm.bundle import Bundle

SAMPLERS = ("ddim", "dpm++", "ddpm")  # caldm.diffusion.samplers.SAMPLERS (no torch import here)
#: Test hook: ``<sample_id>[:n],...`` makes sampling those samples raise (the first n attempts;
#: every attempt without n), as a CUDA OOM or a NaN would.
FAIL_SAMPLE_ENV = "CALDM_FAIL_SAMPLE"


def parse_fail_hook(value: str | None) -> dict[str, int]:
    """``"a_s0,b_s1:1"`` -> ``{"a_s0": ATTEMPTS, "b_s1": 1}`` (attempts that fail per sample)."""
    hook = {}
    for item in (value or "").split(","):
        if item.strip():
            sid, _, times = item.strip().partition(":")
            hook[sid] = int(times) if times else ATTEMPTS
    return hook


@dataclass
class GenerateReport:
    """Outcome of :func:`generate_dataset`."""

    total: int  # samples the dataset should hold (labels that were readable x per_label)
    skipped: int  # already complete before this run
    generated: int
    #: {"label", "error"} per failed label; {"sample", "label", "error"} per failed sample
    errors: list[dict[str, str]] = field(default_factory=list)
    wall_s: float = 0.0
    sample_s: float = 0.0  # summed time actors spent inside the sampler
    write_s: float = 0.0  # summed time writer tasks spent encoding, writing and verifying
    # From the first sampling start to the last write end (wall clock): the steady state,
    # without Ray start-up and model loading.
    span_s: float = 0.0

    @property
    def failed(self) -> bool:
        return bool(self.errors)

    @property
    def failed_samples(self) -> int:
        """Samples of readable labels that could not be made (after their retries)."""
        return sum(1 for e in self.errors if "sample" in e)

    @property
    def failed_labels(self) -> int:
        return sum(1 for e in self.errors if "sample" not in e)


# --- workers -------------------------------------------------------------------------------


class SamplerActor:
    """Ray Data actor: loads the bundle once, then turns sample rows into volumes.

    A label that cannot be read gives a row with ``error`` set (scope ``label``) instead of
    raising, so one bad label does not stop the job. Any other exception while sampling (a
    CUDA OOM, a NaN check, a transient storage error) is retried up to :data:`ATTEMPTS` times,
    then gives an error row of scope ``sample``. The last label (or its error) is cached: a
    label's samples usually follow each other on the same actor.
    """

    def __init__(
        self,
        bundle: str | Bundle,
        kind: LabelKind,
        image_shape: tuple[int, int, int],
        prov: Provenance,
        fail: dict[str, int] | None = None,
    ) -> None:
        from caldm.pipeline import CALDMPipeline

        self.pipeline = CALDMPipeline.from_bundle(bundle, ablation=prov.ablation)
        self.kind = kind
        self.image_shape = tuple(image_shape)
        self.prov = prov
        self.fail = dict(fail or {})  # test hook (FAIL_SAMPLE_ENV): failures left per sample
        self._cached: tuple[str, Any] | None = None

    def _label(self, url: str) -> tuple[Any, np.ndarray, np.ndarray]:
        """(labels reduced for the encoders, label on the image grid, its affine)."""
        if self._cached is None or self._cached[0] != url:
            try:
                label = read_label_map(url, self.kind)
                value: Any = (
                    self.pipeline.prepare_labels(label.array, url),
                    *resize_to_image(label, self.image_shape),
                )
            except DataError as exc:
                value = exc
            self._cached = (url, value)
        if isinstance(self._cached[1], DataError):
            raise self._cached[1]
        return self._cached[1]

    @staticmethod
    def _error_row(row: dict[str, Any], error: str, scope: str) -> dict[str, Any]:
        empty = np.zeros((0,), np.uint8)  # same columns as a sample row
        return {**row, "error": error, "scope": scope, "volume": empty, "label": empty,
                "affine": np.eye(4), "sample_s": 0.0, "started": 0.0}  # fmt: skip

    def _sample(self, row: dict[str, Any], prepared: Any) -> np.ndarray:
        if self.fail.get(row["id"], 0) > 0:
            self.fail[row["id"]] -= 1
            raise RuntimeError(f"{FAIL_SAMPLE_ENV}: simulated failure of {row['id']}")
        volume = self.pipeline.sample(
            seed=int(row["seed"]), labels=prepared, sampler=self.prov.sampler, steps=self.prov.steps
        )
        return np.asarray(volume, dtype=np.uint8)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                prepared, label, affine = self._label(row["label_url"])
                started, start = time.time(), time.perf_counter()
                volume = self._sample(row, prepared)
                elapsed = time.perf_counter() - start
                break
            except DataError as exc:
                # The sampler checks labels against the bundle (say, layer classes it was not
                # trained on): a DataError from it is about this label and its other samples.
                error = DataError(row["label_url"], exc.problem)
                self._cached = (row["label_url"], error)
                return self._error_row(row, str(error), "label")
            except Exception as exc:  # OOM, NaN, a flaky store: retried, then an error row
                _free_accelerator_memory()
                if attempt == ATTEMPTS:
                    problem = f"sampling failed {attempt} times ({one_line(exc)})"
                    return self._error_row(row, f"{row['id']}: {problem}", "sample")
        return {**row, "error": "", "scope": "", "volume": volume, "label": label,
                "affine": affine, "sample_s": elapsed, "started": started}  # fmt: skip


def _free_accelerator_memory() -> None:
    """Release cached CUDA blocks after a failed attempt (an OOM's retry needs them)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- driver --------------------------------------------------------------------------------


def resolve_provenance(
    bundle: str | Bundle, sampler: str | None, steps: int | None, ablation: str = "full"
) -> Provenance:
    """Sampler and steps (defaults from the bundle's config) and the bundle's content hash."""
    from caldm.bundle import open_bundle

    bundle = open_bundle(bundle)
    cfg = bundle.cfg
    sampler = sampler or cfg.sampling.sampler
    if sampler not in SAMPLERS:
        raise ConfigError(f"--sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
    steps = steps if steps is not None else cfg.sampling.steps
    if steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    from caldm.pipeline import ABLATIONS

    if ablation not in ABLATIONS:
        raise ConfigError(f"--ablation {ablation!r}: expected one of {', '.join(ABLATIONS)}")
    return Provenance(bundle.url.rstrip("/"), bundle.hash, sampler, int(steps), ablation)


def bundle_condition(bundle: str | Bundle) -> LabelKind:
    """The label kind ``bundle`` was fine-tuned on; BundleError when it has none (or when it
    is not a bundle at all)."""
    from caldm.bundle import open_bundle

    bundle = open_bundle(bundle)
    condition = bundle.condition
    if condition not in ("layers", "vessels"):
        raise BundleError(
            f"{bundle.url}: the bundle has no label condition (fine-tune diff3d and refiner with "
            "--condition layers|vessels); label-guided generation needs one"
        )
    return condition


def generate_dataset(
    bundle: str | Bundle,
    labels: str,
    out: str,
    per_label: int,
    sampler: str | None = None,
    steps: int | None = None,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
    progress_every: float = 60.0,
    log: Callable[[str], None] = print,
    ablation: str = "full",
    ids: list[str] | None = None,
    exclude: list[str] | None = None,
) -> GenerateReport:
    """Sample ``per_label`` volumes per label at ``labels`` into ``out`` (module docstring)
    with ``bundle`` (opened, or its URL: its config and meta are read once per run).

    Everything that can fail on bad arguments (bundle without a condition, no labels, ``out``
    made by another model) fails before any cluster work. Labels that fail, and samples that
    still fail after :data:`ATTEMPTS` tries (or whose worker died), are reported in
    ``report.errors`` and ``<out>/errors.jsonl``; every other sample is still made, and a rerun
    retries the failed ones.
    """
    if per_label < 1:
        raise ConfigError(f"--per-label must be >= 1, got {per_label}")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    from caldm.bundle import open_bundle

    out, bundle = out.rstrip("/"), open_bundle(bundle)
    kind = bundle_condition(bundle)
    prov = resolve_provenance(bundle, sampler, steps, ablation)
    image_shape = tuple(bundle.cfg.model.image_shape)
    plan = plan_samples(DatasetLayout(labels), kind, per_label)
    if ids is not None or exclude:  # --ids / --exclude: of the label volumes
        from caldm.data.layout import select_ids

        listed = sorted({row["label_id"] for row in plan})
        keep = set(select_ids(listed, ids, exclude, what=f"--ids ({kind} labels of {labels})"))
        plan = [row for row in plan if row["label_id"] in keep]
    remove_stale_temp_files(out, kind)
    done = complete_samples(out, kind, prov)
    todo = [row for row in plan if row["id"] not in done]
    report = GenerateReport(total=len(plan), skipped=len(plan) - len(todo), generated=0)
    log(
        f"generate: {len(plan)} samples ({per_label} per {kind} label), {report.skipped} "
        f"already complete, {len(todo)} to make with {prov.sampler} x {prov.steps} steps"
    )
    start = time.monotonic()
    if todo:
        _run(todo, bundle, kind, image_shape, prov, out, workers, gpus_per_worker,
             cpus_per_worker, progress_every, log, report)  # fmt: skip
    report.wall_s = time.monotonic() - start
    # Samples of failed labels were planned but cannot exist; the total counts what can.
    failed = {e["label"] for e in report.errors if "sample" not in e}
    report.total -= sum(1 for row in todo if row["label_url"] in failed)
    write_errors(out, report.errors)
    count = consolidate_manifest(out)
    log(
        f"generate: manifest.jsonl has {count} rows; {report.failed_samples} sample(s) and "
        f"{report.failed_labels} label(s) failed"
    )
    return report


def _run(
    todo: list[dict[str, Any]],
    bundle: Bundle,
    kind: LabelKind,
    image_shape: tuple[int, ...],
    prov: Provenance,
    out: str,
    workers: int,
    gpus_per_worker: float,
    cpus_per_worker: float,
    progress_every: float,
    log: Callable[[str], None],
    report: GenerateReport,
) -> None:
    from caldm.distributed.cluster import ensure_ray

    ray = ensure_ray(log_to_driver=False)
    # The pool is --workers actors whatever the cluster holds now: on an autoscaling cluster
    # that starts empty, these pending actors (and the writer tasks) are what grow it.
    # One block per sample: blocks are the unit an actor takes, so this spreads the work.
    # Errors inside a sample become error rows; a block that errors anyway (its worker died
    # past its restarts) must not end the job either: Ray Data's default stops at the first.
    context = ray.data.DataContext.get_current()
    saved_max_errored = context.max_errored_blocks
    context.max_errored_blocks = -1
    fail = parse_fail_hook(os.environ.get(FAIL_SAMPLE_ENV))
    samples = ray.data.from_items(todo, override_num_blocks=len(todo)).map(
        SamplerActor,
        fn_constructor_kwargs={
            "bundle": bundle, "kind": kind, "image_shape": image_shape, "prov": prov,
            "fail": fail,
        },
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_gpus=gpus_per_worker,
        num_cpus=cpus_per_worker,
    )  # fmt: skip
    # Separate CPU tasks (different resources, so Ray Data does not fuse them into the actor):
    # the actor returns its volume and samples the next while this one is encoded and uploaded.
    written = samples.map(
        write_sample, fn_kwargs={"out": out, "kind": kind, "prov": prov}, num_cpus=0.5
    )
    bar = RateProgress(len(todo), progress_every, log, "generate", "volumes")
    errors: dict[str, str] = {}
    sample_errors: dict[str, dict[str, str]] = {}
    seen: set[str] = set()
    first, last = float("inf"), 0.0
    rows = iter(written.iter_rows())
    try:
        for row in rows:
            seen.add(row["id"])
            if row["scope"] == "sample":
                sample_errors[row["id"]] = {
                    "sample": row["id"], "label": row["label_url"], "error": row["error"]
                }  # fmt: skip
            elif row["error"]:
                errors.setdefault(row["label_url"], row["error"])
            else:
                report.generated += 1
                first, last = min(first, row["started"]), max(last, row["finished"])
            report.sample_s += float(row["sample_s"])
            report.write_s += float(row["write_s"])
            bar.update(bool(row["error"]))
    except Exception as exc:
        # A worker's DataError (say, S3 gone while writing) arrives wrapped in Ray's
        # exceptions; surface it as the one-line error it is. The run resumes when rerun.
        cause = caldm_cause(exc)
        if cause is None:
            raise
        raise cause from None
    finally:
        # Closing the stream shuts its executor down now: an abandoned one keeps its writer
        # tasks leased, holding the cluster's CPUs after the job has returned.
        getattr(rows, "close", lambda: None)()
        bar.close()
        context.max_errored_blocks = saved_max_errored
    for row in todo:  # in an errored block: no result came back
        if row["id"] not in seen:
            sample_errors[row["id"]] = {
                "sample": row["id"], "label": row["label_url"],
                "error": f"{row['id']}: no result (its Ray Data block failed; see the Ray logs)",
            }  # fmt: skip
    report.errors = [{"label": k, "error": v} for k, v in sorted(errors.items())]
    report.errors += [sample_errors[k] for k in sorted(sample_errors)]
    report.span_s = max(last - first, 0.0)
