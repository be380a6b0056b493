"""Bulk label-guided synthetic datasets ("200% Syn") as a Ray Data job.

For every real label of the kind the bundle was fine-tuned on (``layers`` or ``vessels``) at
``labels``, ``per_label`` volumes are sampled and written under ``out`` in the dataset layout:

```
<out>/images/<label_id>_s<index>.nii.gz          the synthetic volume (uint8, D x H x W)
<out>/labels/<kind>/<label_id>_s<index>.nii.gz   the label it was conditioned on
<out>/manifest.jsonl                             one row per sample (provenance, checksums)
<out>/errors.jsonl                               {"label", "error"} per label that failed
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
extent is kept (a vessels map has no depth axis; its H spacing is written as 1).

Resume and integrity: a sample is complete when ``.manifest/<sample_id>.json`` exists, matches
this run's bundle hash, sampler and steps, and its image and label exist with the sizes that row
records. The row is written only after both files were written (atomically: temp file + rename
locally, one PUT on S3) and verified (size read back; on S3 also the ETag against the MD5), so a
kill at any moment leaves each sample either complete or redone by the next run. The per-sample
rows are consolidated into ``manifest.jsonl`` (one atomic write, sorted by id) at the end of
every run, giving exactly one row per sample; the rows stay as the journal for later reruns.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import nibabel as nib
import numpy as np
from fsspec.implementations.local import LocalFileSystem

# caldm.bundle (and with it torch) is imported inside the driver functions only: writer tasks
# import this module, and a torch import costs seconds of each fresh worker's start.
from caldm.data.io import (
    LabelKind,
    encode_nifti,
    read_label,
    spacing_affine,
    split_url,
    storage_errors,
    write_bytes,
)
from caldm.data.layout import DatasetLayout
from caldm.errors import BundleError, CaldmError, ConfigError, DataError

SAMPLERS = ("ddim", "dpm++", "ddpm")  # caldm.diffusion.samplers.SAMPLERS (no torch import here)
MANIFEST_DIR = ".manifest"


@dataclass(frozen=True)
class Provenance:
    """What every manifest row of one run records about how its sample was made."""

    bundle_url: str
    bundle_hash: str
    sampler: str
    steps: int
    ablation: str = "full"  # caldm.pipeline.ABLATIONS: which of Table 1's rows


@dataclass
class GenerateReport:
    """Outcome of :func:`generate_dataset`."""

    total: int  # samples the dataset should hold (labels that were readable x per_label)
    skipped: int  # already complete before this run
    generated: int
    errors: list[dict[str, str]] = field(default_factory=list)  # {"label", "error"} rows
    wall_s: float = 0.0
    sample_s: float = 0.0  # summed time actors spent inside the sampler
    write_s: float = 0.0  # summed time writer tasks spent encoding, writing and verifying
    # From the first sampling start to the last write end (wall clock): the steady state,
    # without Ray start-up and model loading.
    span_s: float = 0.0

    @property
    def failed(self) -> bool:
        return bool(self.errors)


# --- plan ----------------------------------------------------------------------------------


def sample_id(label_id: str, index: int) -> str:
    """The id of sample ``index`` of ``label_id``: ``<label_id>_s<index>``."""
    return f"{label_id}_s{index}"


def sample_seed(label_id: str, index: int) -> int:
    """A seed from (label id, index) only: the first 63 bits of their SHA-256 (fits int64)."""
    digest = hashlib.sha256(f"{label_id}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def plan_samples(layout: DatasetLayout, kind: LabelKind, per_label: int) -> list[dict[str, Any]]:
    """One row per sample to make (id, label id, label URL, index, seed), label by label."""
    label_ids = layout.label_ids(kind)
    if not label_ids:
        raise DataError(f"{layout.root}/labels/{kind}", f"no {kind} labels (<id>.nii.gz) found")
    return [
        {
            "id": sample_id(label_id, index),
            "label_id": label_id,
            "label_url": layout.label_url(kind, label_id),
            "index": index,
            "seed": sample_seed(label_id, index),
        }
        for label_id in label_ids
        for index in range(per_label)
    ]


def image_url(out: str, sid: str) -> str:
    return f"{out}/images/{sid}.nii.gz"


def label_url(out: str, kind: str, sid: str) -> str:
    return f"{out}/labels/{kind}/{sid}.nii.gz"


def row_url(out: str, sid: str) -> str:
    return f"{out}/{MANIFEST_DIR}/{sid}.json"


# --- labels --------------------------------------------------------------------------------


def _label_header(url: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(shape, voxel spacing) from a NIfTI label's header, reading only the file's first bytes."""
    fs, path = split_url(url)
    with storage_errors(url), fs.open(path, "rb", block_size=1 << 16) as fh:
        head = fh.read(1 << 16)
    try:
        if head[:2] == b"\x1f\x8b":  # a partial gzip stream: decompress what we have
            head = zlib.decompressobj(wbits=31).decompress(head, 1024)
    except zlib.error as exc:
        raise DataError(url, f"corrupt gzip data ({exc})") from None
    for header_type in (nib.Nifti1Header, nib.Nifti2Header):
        try:
            header = header_type.from_fileobj(io.BytesIO(head))
        except Exception:  # nibabel raises several types for a header of the other version
            continue
        return tuple(header.get_data_shape()), tuple(float(z) for z in header.get_zooms())
    raise DataError(url, "not a NIfTI file (unreadable header)")


def load_label(
    url: str, kind: LabelKind, image_shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """A real label resized to ``image_shape`` and the 4x4 affine of the sample it conditions.

    Raises DataError naming ``url`` for an unreadable label or one of the wrong dimensionality.
    """
    from caldm.data.preprocess import resize  # imports torch: only the sampler actors load labels

    label = read_label(url, kind)
    if 0 in label.shape:
        raise DataError(url, f"{kind} label has an empty axis (shape {label.shape})")
    stored, zooms = _label_header(url)
    d, h, w = image_shape
    if kind == "layers":
        target: tuple[int, ...] = (d, h, w)
        spacing = [z * s / t for z, s, t in zip(zooms, label.shape, target)]
    else:  # stored as D x W, or as D x 1 x W
        target = (d, w)
        zw = zooms[2] if len(stored) >= 3 and stored[1] == 1 else zooms[1]
        spacing = [zooms[0] * label.shape[0] / d, 1.0, zw * label.shape[1] / w]
    return resize(label, target, order="nearest"), spacing_affine(tuple(spacing))


# --- resume --------------------------------------------------------------------------------


def _sizes(url: str) -> dict[str, int]:
    """File name -> size of the files directly under ``url`` (one listing; {} if absent)."""
    fs, path = split_url(url)
    with storage_errors(url):
        fs.invalidate_cache(path)  # writer tasks added files since any earlier listing
        if not fs.exists(path):
            return {}
        entries = fs.ls(path, detail=True)
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in entries}


def read_rows(out: str) -> dict[str, dict[str, Any]]:
    """The per-sample manifest rows under ``<out>/.manifest/`` by sample id."""
    names = [n for n in _sizes(f"{out}/{MANIFEST_DIR}") if n.endswith(".json")]
    if not names:
        return {}
    fs, _ = split_url(out)
    paths = [split_url(row_url(out, n.removesuffix(".json")))[1] for n in names]
    with storage_errors(f"{out}/{MANIFEST_DIR}"):
        blobs = fs.cat(paths)  # a dict for a list of paths; concurrent GETs on object stores
    rows = {}
    for path in paths:
        try:
            row = json.loads(blobs[path])
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # cannot happen with atomic writes; treat as not complete and redo
        rows[row["id"]] = row
    return rows


def complete_samples(out: str, kind: str, prov: Provenance) -> set[str]:
    """Ids of the samples under ``out`` that are complete (see the module docstring).

    Raises ConfigError when ``out`` holds samples made with another bundle, sampler or steps:
    mixing them would make one dataset of two models.
    """
    rows = read_rows(out)
    other = [
        r
        for r in rows.values()
        if (r["bundle"]["hash"], r["sampler"], r["steps"], r.get("ablation", "full"))
        != (prov.bundle_hash, prov.sampler, prov.steps, prov.ablation)
    ]
    if other:
        r = other[0]
        raise ConfigError(
            f"{out}: holds {len(other)} sample(s) made with bundle {r['bundle']['url']} "
            f"(hash {r['bundle']['hash'][:12]}), sampler {r['sampler']}, {r['steps']} steps, "
            f"ablation {r.get('ablation', 'full')}; this run uses hash {prov.bundle_hash[:12]}, "
            f"{prov.sampler}, {prov.steps} steps, ablation {prov.ablation}: "
            "choose another --out"
        )
    images = _sizes(f"{out}/images")
    labels = _sizes(f"{out}/labels/{kind}")
    done = set()
    for sid, row in rows.items():
        files = row.get("files", {})
        name = f"{sid}.nii.gz"
        if images.get(name) == files.get("image", {}).get("bytes") and labels.get(
            name
        ) == files.get("label", {}).get("bytes"):
            done.add(sid)
    return done


def remove_stale_temp_files(out: str, kind: str) -> int:
    """Delete temp files a killed local run left behind (S3 never has any); returns the count.

    Local writes go to ``.<name>.<hex>.tmp`` and are renamed into place; a SIGKILL between the
    two leaves the temp file, which no reader ever takes for a sample.
    """
    fs, root = split_url(out)
    if not isinstance(fs, LocalFileSystem):
        return 0
    removed = 0
    for sub in ("images", f"labels/{kind}", MANIFEST_DIR, ""):
        directory = os.path.join(root, sub)
        if not os.path.isdir(directory):
            continue
        for name in os.listdir(directory):
            if name.startswith(".") and name.endswith(".tmp"):
                os.remove(os.path.join(directory, name))
                removed += 1
    return removed


# --- workers -------------------------------------------------------------------------------


class SamplerActor:
    """Ray Data actor: loads the bundle once, then turns sample rows into volumes.

    A label that cannot be read gives a row with ``error`` set instead of raising, so one bad
    label does not stop the job. The last label (or its error) is cached: a label's samples
    usually follow each other on the same actor.
    """

    def __init__(
        self, bundle: str, kind: LabelKind, image_shape: tuple[int, int, int], prov: Provenance
    ) -> None:
        from caldm.pipeline import CALDMPipeline

        self.pipeline = CALDMPipeline.from_bundle(bundle, ablation=prov.ablation)
        self.kind = kind
        self.image_shape = tuple(image_shape)
        self.prov = prov
        self._cached: tuple[str, Any] | None = None

    def _label(self, url: str) -> tuple[np.ndarray, np.ndarray]:
        if self._cached is None or self._cached[0] != url:
            try:
                value: Any = load_label(url, self.kind, self.image_shape)
            except DataError as exc:
                value = exc
            self._cached = (url, value)
        if isinstance(self._cached[1], DataError):
            raise self._cached[1]
        return self._cached[1]

    @staticmethod
    def _error_row(row: dict[str, Any], error: DataError) -> dict[str, Any]:
        empty = np.zeros((0,), np.uint8)  # same columns as a sample row
        return {**row, "error": str(error), "volume": empty, "label": empty,
                "affine": np.eye(4), "sample_s": 0.0, "started": 0.0}  # fmt: skip

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        try:
            label, affine = self._label(row["label_url"])
            started, start = time.time(), time.perf_counter()
            volume = self.pipeline.sample(
                seed=int(row["seed"]),
                labels=label,
                sampler=self.prov.sampler,
                steps=self.prov.steps,
            )
            elapsed = time.perf_counter() - start
        except DataError as exc:
            # The sampler checks labels against the bundle (say, layer classes it was not
            # trained on): a DataError from it is about this label, and so are its other samples.
            error = DataError(row["label_url"], exc.problem)
            self._cached = (row["label_url"], error)
            return self._error_row(row, error)
        volume = np.asarray(volume, dtype=np.uint8)
        return {**row, "error": "", "volume": volume, "label": label, "affine": affine,
                "sample_s": elapsed, "started": started}  # fmt: skip


def put_verified(url: str, data: bytes) -> dict[str, Any]:
    """Write ``data`` atomically, then check what the store holds; returns {"bytes", "sha256"}.

    The size is read back from the store; on S3 a single-part upload's ETag is the MD5 of the
    content and is compared too. Raises DataError naming ``url`` on a mismatch.
    """
    write_bytes(url, data)
    fs, path = split_url(url)
    with storage_errors(url):
        fs.invalidate_cache(path)
        info = fs.info(path)
    if int(info.get("size") or 0) != len(data):
        raise DataError(url, f"verification failed: {info.get('size')} bytes, wrote {len(data)}")
    etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
    if etag and "-" not in etag and etag != hashlib.md5(data).hexdigest():
        raise DataError(url, "verification failed: stored ETag differs from the MD5 written")
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_sample(row: dict[str, Any], out: str, kind: str, prov: Provenance) -> dict[str, Any]:
    """Ray Data task: write one sample's image and label, verify them, then its manifest row.

    Returns a small summary row (no arrays) for the driver's progress and report.
    """
    summary = {
        "id": row["id"],
        "label_url": row["label_url"],
        "error": row["error"],
        "sample_s": float(row["sample_s"]),
        "write_s": 0.0,
        "started": float(row["started"]),
        "finished": 0.0,
    }
    if row["error"]:
        return summary
    start = time.perf_counter()
    sid = row["id"]
    files = {
        "image": put_verified(image_url(out, sid), encode_nifti(row["volume"], row["affine"])),
        "label": put_verified(label_url(out, kind, sid), encode_nifti(row["label"], row["affine"])),
    }
    record = {
        "id": sid,
        "label_id": row["label_id"],
        "seed": int(row["seed"]),
        "bundle": {"url": prov.bundle_url, "hash": prov.bundle_hash},
        "sampler": prov.sampler,
        "steps": prov.steps,
        "ablation": prov.ablation,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": files,
    }
    write_bytes(row_url(out, sid), json.dumps(record, sort_keys=True).encode())
    summary["write_s"] = time.perf_counter() - start
    summary["finished"] = time.time()
    return summary


# --- driver --------------------------------------------------------------------------------


def resolve_provenance(
    bundle: str, sampler: str | None, steps: int | None, ablation: str = "full"
) -> Provenance:
    """Sampler and steps (defaults from the bundle's config) and the bundle's content hash."""
    from caldm.bundle import bundle_hash, read_bundle_config

    cfg = read_bundle_config(bundle)
    sampler = sampler or cfg.sampling.sampler
    if sampler not in SAMPLERS:
        raise ConfigError(f"--sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
    steps = steps if steps is not None else cfg.sampling.steps
    if steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    from caldm.pipeline import ABLATIONS

    if ablation not in ABLATIONS:
        raise ConfigError(f"--ablation {ablation!r}: expected one of {', '.join(ABLATIONS)}")
    return Provenance(bundle.rstrip("/"), bundle_hash(bundle), sampler, int(steps), ablation)


def bundle_condition(bundle: str) -> LabelKind:
    """The label kind ``bundle`` was fine-tuned on; BundleError when it has none."""
    from caldm.bundle import read_bundle_config, read_meta

    read_bundle_config(bundle)  # a clear error when it is not a bundle at all
    condition = read_meta(bundle).get("condition")
    if condition not in ("layers", "vessels"):
        raise BundleError(
            f"{bundle}: the bundle has no label condition (fine-tune diff3d and refiner with "
            "--condition layers|vessels); label-guided generation needs one"
        )
    return condition


def consolidate_manifest(out: str) -> int:
    """Rewrite ``manifest.jsonl`` from the per-sample rows (sorted by id); returns the count."""
    rows = read_rows(out)
    DatasetLayout(out).write_manifest([rows[sid] for sid in sorted(rows)])
    return len(rows)


def _write_errors(out: str, errors: list[dict[str, str]]) -> None:
    url = f"{out}/errors.jsonl"
    if errors:
        write_bytes(url, "".join(json.dumps(e) + "\n" for e in errors).encode())
        return
    fs, path = split_url(url)
    with storage_errors(url):
        if fs.exists(path):  # a report of an earlier run; this run's labels were all readable
            fs.rm(path)


def _caldm_cause(exc: BaseException) -> CaldmError | None:
    """The first CaldmError in an exception's chain (Ray wraps worker exceptions)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, CaldmError):
            return e
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


class _Progress:
    """A tqdm bar plus a plain line every ``every`` seconds: done/total and volumes per minute."""

    def __init__(self, total: int, every: float, log: Callable[[str], None]) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="vol", desc="generate", file=sys.stderr)
        self.total, self.every, self.log = total, every, log
        self.done = self.failed = 0
        self.start = self.last = time.monotonic()

    def update(self, failed: bool) -> None:
        self.done += 1
        self.failed += failed
        self.bar.update(1)
        if time.monotonic() - self.last >= self.every:
            self.line()

    def line(self) -> None:
        self.last = time.monotonic()
        minutes = max(self.last - self.start, 1e-9) / 60
        made = self.done - self.failed
        self.log(
            f"generate: {self.done}/{self.total} done, {made / minutes:.2f} volumes/min"
            + (f", {self.failed} failed" if self.failed else "")
        )

    def close(self) -> None:
        self.bar.close()
        self.line()


def generate_dataset(
    bundle: str,
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
) -> GenerateReport:
    """Sample ``per_label`` volumes per label at ``labels`` into ``out`` (module docstring).

    Everything that can fail on bad arguments (bundle without a condition, no labels, ``out``
    made by another model) fails before any cluster work. Labels that fail are reported in
    ``report.errors`` and ``<out>/errors.jsonl``; the other samples are still made.
    """
    if per_label < 1:
        raise ConfigError(f"--per-label must be >= 1, got {per_label}")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    from caldm.bundle import read_bundle_config

    out = out.rstrip("/")
    kind = bundle_condition(bundle)
    prov = resolve_provenance(bundle, sampler, steps, ablation)
    image_shape = tuple(read_bundle_config(bundle).model.image_shape)
    plan = plan_samples(DatasetLayout(labels), kind, per_label)
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
    failed = {e["label"] for e in report.errors}
    report.total -= sum(1 for row in todo if row["label_url"] in failed)
    _write_errors(out, report.errors)
    count = consolidate_manifest(out)
    log(f"generate: manifest.jsonl has {count} rows; {len(report.errors)} label(s) failed")
    return report


def _run(
    todo: list[dict[str, Any]],
    bundle: str,
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
    cpus = float(ray.cluster_resources().get("CPU", 0))
    if workers * cpus_per_worker + 0.5 > cpus:
        # Writer tasks need CPU too; with none left the actors' output piles up unwritten.
        raise ConfigError(
            f"--workers {workers} x --cpus-per-worker {cpus_per_worker} leaves no CPU for "
            f"writer tasks on a cluster of {cpus:g} CPUs (each takes 0.5)"
        )
    # One block per sample: blocks are the unit an actor takes, so this spreads the work.
    samples = ray.data.from_items(todo, override_num_blocks=len(todo)).map(
        SamplerActor,
        fn_constructor_kwargs={
            "bundle": bundle, "kind": kind, "image_shape": image_shape, "prov": prov
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
    bar = _Progress(len(todo), progress_every, log)
    errors: dict[str, str] = {}
    first, last = float("inf"), 0.0
    try:
        for row in written.iter_rows():
            if row["error"]:
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
        cause = _caldm_cause(exc)
        if cause is None:
            raise
        raise cause from None
    finally:
        bar.close()
    report.errors = [{"label": k, "error": v} for k, v in sorted(errors.items())]
    report.span_s = max(last - first, 0.0)
