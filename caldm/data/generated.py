"""The on-storage layout of a generated dataset: sample ids and seeds, file URLs, the per-sample
manifest rows (the resume journal), completeness, and the consolidated manifest and errors.

Storage only, no Ray: :mod:`caldm.distributed.generate` runs the job and documents the layout.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from caldm.data.io import (
    LabelKind,
    encode_nifti,
    split_url,
    storage_errors,
    write_bytes,
    write_verified,
)
from caldm.data.layout import DatasetLayout
from caldm.errors import ConfigError, DataError, one_line

MANIFEST_DIR = ".manifest"

#: Attempts per sample (sampling, and writing) before it becomes a row of errors.jsonl.
ATTEMPTS = 3


@dataclass(frozen=True)
class Provenance:
    """What every manifest row of one run records about how its sample was made."""

    bundle_url: str
    bundle_hash: str
    sampler: str
    steps: int
    ablation: str = "full"  # caldm.pipeline.ABLATIONS: which of Table 1's rows


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


def consolidate_manifest(out: str) -> int:
    """Rewrite ``manifest.jsonl`` from the per-sample rows (sorted by id); returns the count."""
    rows = read_rows(out)
    DatasetLayout(out).write_manifest([rows[sid] for sid in sorted(rows)])
    return len(rows)


def write_errors(out: str, errors: list[dict[str, str]]) -> None:
    url = f"{out}/errors.jsonl"
    if errors:
        write_bytes(url, "".join(json.dumps(e) + "\n" for e in errors).encode())
        return
    fs, path = split_url(url)
    with storage_errors(url):
        if fs.exists(path):  # a report of an earlier run; this run's labels were all readable
            fs.rm(path)


def write_sample(row: dict[str, Any], out: str, kind: str, prov: Provenance) -> dict[str, Any]:
    """Write one sample's image and label, verify them, then its manifest row.

    Returns a small summary row (no arrays) for the driver's progress and report.
    """
    summary = {
        "id": row["id"],
        "label_url": row["label_url"],
        "error": row["error"],
        "scope": row["scope"],
        "sample_s": float(row["sample_s"]),
        "write_s": 0.0,
        "started": float(row["started"]),
        "finished": 0.0,
    }
    if row["error"]:
        return summary
    start = time.perf_counter()
    sid = row["id"]
    image = encode_nifti(row["volume"], row["affine"])
    label = encode_nifti(row["label"], row["affine"])
    for attempt in range(1, ATTEMPTS + 1):
        try:  # a transient storage error (or a failed verification) is retried
            files = {
                "image": write_verified(image_url(out, sid), image),
                "label": write_verified(label_url(out, kind, sid), label),
            }
            break
        except Exception as exc:
            if attempt == ATTEMPTS:
                summary["error"] = f"{sid}: writing failed {attempt} times ({one_line(exc)})"
                summary["scope"] = "sample"
                return summary
            time.sleep(0.5 * attempt)
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
