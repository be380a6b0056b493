"""jobs/generate_dataset.py against the moto S3 server: N per label, layout and manifest,
identical output on rerun, resume after a kill, bad labels in errors.jsonl (tiny preset)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from caldm.bundle import init_bundle
from caldm.config import preset
from caldm.data.io import (
    read_bytes,
    read_label,
    read_volume,
    split_url,
    write_bytes,
    write_volume,
)
from caldm.data.layout import DatasetLayout
from caldm.data.phantom import LAYER_NAMES, write_phantom_dataset
from caldm.distributed.generate import generate_dataset, sample_seed

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "generate_dataset.py"
SHAPE = tuple(preset("tiny").model.image_shape)
STEPS = ["--steps", "2"]


def _job_main() -> Any:
    spec = importlib.util.spec_from_file_location("generate_dataset_job", JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def inputs(s3_server: str) -> dict[str, str]:
    """A bucket with 3 phantom labels and a layers-conditioned tiny bundle."""
    import s3fs

    root = "s3://test-generate-inputs"
    s3fs.S3FileSystem().mkdir(root.removeprefix("s3://"))
    write_phantom_dataset(f"{root}/real", count=3, preset="tiny", seed=0)
    cfg = preset("tiny")
    cfg.model.condition.layer_classes = len(LAYER_NAMES)  # the phantom's classes, 0 included
    init_bundle("tiny", f"{root}/bundle", condition="layers", seed=0, cfg=cfg)
    return {"labels": f"{root}/real", "bundle": f"{root}/bundle"}


def _ls(url: str) -> list[str]:
    fs, path = split_url(url)
    fs.invalidate_cache()
    return sorted(p.rsplit("/", 1)[-1] for p in fs.find(path))


def test_help_needs_no_cluster() -> None:
    proc = subprocess.run([sys.executable, str(JOB), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--per-label" in proc.stdout


def test_seed_depends_on_label_and_index_only() -> None:
    assert sample_seed("a", 0) == sample_seed("a", 0)
    assert len({sample_seed(label, i) for label in "ab" for i in range(3)}) == 6
    assert 0 <= sample_seed("a", 1) < 2**63


def test_bundle_without_condition_fails_before_work(
    s3_bucket: str, inputs: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    init_bundle("tiny", f"{s3_bucket}/plain")
    args = ["--bundle", f"{s3_bucket}/plain", "--labels", inputs["labels"]]
    rc = _job_main()([*args, "--out", f"{s3_bucket}/out", "--per-label", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no label condition" in err[0]
    assert _ls(f"{s3_bucket}/out") == []


def test_per_label_layout_manifest_and_identical_rerun(
    ray_cluster: str, s3_bucket: str, inputs: dict[str, str]
) -> None:
    out = f"{s3_bucket}/syn"
    report = generate_dataset(inputs["bundle"], inputs["labels"], out, 2, steps=2)
    label_ids = DatasetLayout(inputs["labels"]).label_ids("layers")
    ids = [f"{label}_s{i}" for label in label_ids for i in range(2)]
    assert (report.total, report.generated, report.errors) == (6, 6, [])

    layout, real = DatasetLayout(out), DatasetLayout(inputs["labels"])
    assert layout.ids() == ids and layout.label_ids("layers") == ids
    rows = layout.read_manifest()
    assert [r["id"] for r in rows] == ids
    for row in rows:
        assert row["seed"] == sample_seed(row["label_id"], int(row["id"].rsplit("_s", 1)[1]))
        assert row["bundle"]["url"] == inputs["bundle"] and len(row["bundle"]["hash"]) == 64
        assert (row["sampler"], row["steps"]) == ("ddim", 2) and row["created"]
        image, _ = read_volume(layout.image_url(row["id"]))
        assert image.shape == SHAPE and image.dtype == np.uint8
        written = read_label(layout.label_url("layers", row["id"]), "layers", SHAPE)
        np.testing.assert_array_equal(
            written, read_label(real.label_url("layers", row["label_id"]), "layers")
        )
    first = read_volume(layout.image_url(ids[0]))[0]
    assert not np.array_equal(first, read_volume(layout.image_url(ids[1]))[0])

    # Rerun: everything is complete, nothing is made again, the manifest is unchanged.
    again = generate_dataset(inputs["bundle"], inputs["labels"], out, 2, steps=2)
    assert (again.skipped, again.generated) == (6, 0)
    assert layout.read_manifest() == rows

    # A fresh run elsewhere, with fewer samples per label, reproduces the same files.
    fresh = f"{s3_bucket}/fresh"
    generate_dataset(inputs["bundle"], inputs["labels"], fresh, 1, steps=2)
    for label in label_ids:
        for sub in ("images", "labels/layers"):
            name = f"{sub}/{label}_s0.nii.gz"
            assert read_bytes(f"{fresh}/{name}") == read_bytes(f"{out}/{name}")


def test_resume_after_kill(ray_cluster: str, s3_bucket: str, inputs: dict[str, str]) -> None:
    out = f"{s3_bucket}/killed"
    cmd = [sys.executable, str(JOB), "--bundle", inputs["bundle"], "--labels", inputs["labels"],
           "--out", out, "--per-label", "2", *STEPS]  # fmt: skip
    env = {
        **os.environ,
        "RAY_ADDRESS": ray_cluster,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not [n for n in _ls(out) if n.endswith(".json")]:
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "no sample was completed in time"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = _ls(out)
    assert "manifest.jsonl" not in killed  # killed before the end
    made = sum(n.endswith(".json") for n in killed)
    assert 1 <= made < 6

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    complete = re.search(r"(\d+) already complete", rerun.stdout)
    assert complete and int(complete.group(1)) >= made
    names = _ls(out)
    assert not [n for n in names if n.endswith(".tmp") or n.startswith(".")]
    layout = DatasetLayout(out)
    rows = layout.read_manifest()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 6
    assert layout.ids() == sorted(ids) == layout.label_ids("layers")
    for sample in ids:  # every file is whole
        assert read_volume(layout.image_url(sample))[0].shape == SHAPE


def test_bad_labels_are_reported_and_skipped(
    ray_cluster: str, s3_bucket: str, inputs: dict[str, str]
) -> None:
    labels = f"{s3_bucket}/labels"
    good = DatasetLayout(inputs["labels"]).label_ids("layers")[0]
    source = DatasetLayout(inputs["labels"]).label_url("layers", good)
    write_bytes(f"{labels}/labels/layers/good.nii.gz", read_bytes(source))
    write_bytes(f"{labels}/labels/layers/corrupt.nii.gz", read_bytes(source)[:200])
    flat = read_label(source, "layers")[:, 0, :]  # 2D: a vessels-like map, not a layer map
    write_volume(f"{labels}/labels/layers/flat.nii.gz", flat)
    out = f"{s3_bucket}/out"
    rc = _job_main()(["--bundle", inputs["bundle"], "--labels", labels, "--out", out,
                      "--per-label", "2", *STEPS])  # fmt: skip
    assert rc == 2
    errors = [json.loads(line) for line in read_bytes(f"{out}/errors.jsonl").splitlines()]
    assert [e["label"] for e in errors] == [
        f"{labels}/labels/layers/corrupt.nii.gz",
        f"{labels}/labels/layers/flat.nii.gz",
    ]
    assert all(e["error"].startswith(e["label"]) for e in errors)
    assert DatasetLayout(out).ids() == ["good_s0", "good_s1"]
    assert [r["id"] for r in DatasetLayout(out).read_manifest()] == ["good_s0", "good_s1"]
