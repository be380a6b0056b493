"""jobs/generate_dataset.py against the moto S3 server: N per label, layout and manifest,
identical output on rerun, resume after a kill, bad labels in errors.jsonl.

The bundle is the tiny preset shrunk to 16 x 32 x 32 volumes (tiny's 32 x 64 x 64 takes ~10 s
per volume on a 2-core CPU, mostly DecM); the phantom labels keep tiny's 32 x 64 x 64, so every
sample also goes through the documented nearest-neighbour resize of its label.
"""

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
from caldm.config import Config, preset_dict
from caldm.data.generated import Provenance, complete_samples, sample_seed
from caldm.data.io import (
    read_bytes,
    read_label,
    read_volume,
    split_url,
    write_bytes,
    write_volume,
)
from caldm.data.labels import load_label
from caldm.data.layout import DatasetLayout
from caldm.data.phantom import LAYER_NAMES, write_phantom_dataset
from caldm.data.preprocess import resize
from caldm.distributed.generate import generate_dataset
from caldm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "generate_dataset.py"
SHAPE = (16, 32, 32)
STEPS = ["--steps", "2"]
INPUTS = "s3://test-generate-inputs"


def _small_cfg() -> Config:
    cfg = preset_dict("tiny")
    model = cfg["model"]
    model["image_shape"], model["thumbnail_shape"] = SHAPE, (8, 16, 16)
    model["f_sr"]["channels"] = [16, 8, 8]  # D' = 4 -> D = 16: two upsamplings
    model["condition"]["layer_classes"] = len(LAYER_NAMES)  # the phantom's classes, 0 included
    return Config.model_validate(cfg)


def _job_main() -> Any:
    spec = importlib.util.spec_from_file_location("generate_dataset_job", JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _ls(url: str) -> list[str]:
    """Names of every object under ``url`` (recursively)."""
    fs, path = split_url(url)
    fs.invalidate_cache()
    return sorted(p.rsplit("/", 1)[-1] for p in fs.find(path))


@pytest.fixture(scope="module")
def inputs(s3_server: str) -> dict[str, str]:
    """A bucket with 3 phantom labels and a layers-conditioned bundle."""
    import s3fs

    s3fs.S3FileSystem().mkdir(INPUTS.removeprefix("s3://"))
    write_phantom_dataset(f"{INPUTS}/real", count=3, preset="tiny", seed=0)
    init_bundle("tiny", f"{INPUTS}/bundle", condition="layers", seed=0, cfg=_small_cfg())
    return {"labels": f"{INPUTS}/real", "bundle": f"{INPUTS}/bundle"}


@pytest.fixture(scope="module")
def reference(ray_cluster: str, inputs: dict[str, str]) -> str:
    """A dataset of 2 samples per label, made in one uninterrupted run."""
    out = f"{INPUTS}/reference"
    report = generate_dataset(inputs["bundle"], inputs["labels"], out, 2, steps=2)
    assert (report.total, report.generated, report.errors) == (6, 6, [])
    return out


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
    init_bundle("tiny", f"{s3_bucket}/plain", cfg=_small_cfg())
    args = ["--bundle", f"{s3_bucket}/plain", "--labels", inputs["labels"]]
    rc = _job_main()([*args, "--out", f"{s3_bucket}/out", "--per-label", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no label condition" in err[0]
    assert not [n for n in _ls(s3_bucket) if "out" in n]


def test_n_per_label_with_labels_and_manifest(reference: str, inputs: dict[str, str]) -> None:
    real = DatasetLayout(inputs["labels"])
    ids = [f"{label}_s{i}" for label in real.label_ids("layers") for i in range(2)]
    layout = DatasetLayout(reference)
    assert layout.ids() == ids and layout.label_ids("layers") == ids
    rows = layout.read_manifest()
    assert [r["id"] for r in rows] == ids
    for row in rows:
        assert row["seed"] == sample_seed(row["label_id"], int(row["id"].rsplit("_s", 1)[1]))
        assert row["bundle"]["url"] == inputs["bundle"] and len(row["bundle"]["hash"]) == 64
        assert (row["sampler"], row["steps"]) == ("ddim", 2) and row["created"]
        image, affine = read_volume(layout.image_url(row["id"]))
        assert image.shape == SHAPE and image.dtype == np.uint8
        source, source_affine = read_volume(real.label_url("layers", row["label_id"]))
        label = read_label(layout.label_url("layers", row["id"]), "layers", SHAPE)
        np.testing.assert_array_equal(label, resize(source, SHAPE, order="nearest"))
        # Half the voxels along each axis: twice the spacing, the same field of view.
        np.testing.assert_allclose(np.diag(affine)[:3], 2 * np.diag(source_affine)[:3])
    a, b = (read_volume(layout.image_url(i))[0] for i in ids[:2])
    assert not np.array_equal(a, b)


def test_rerun_skips_complete_samples(reference: str, inputs: dict[str, str]) -> None:
    rows = DatasetLayout(reference).read_manifest()
    again = generate_dataset(inputs["bundle"], inputs["labels"], reference, 2, steps=2)
    assert (again.skipped, again.generated) == (6, 0)
    assert DatasetLayout(reference).read_manifest() == rows


def test_resume_after_kill_reproduces_the_reference(
    ray_cluster: str, reference: str, s3_bucket: str, inputs: dict[str, str]
) -> None:
    out = f"{s3_bucket}/killed"
    args = ["--bundle", inputs["bundle"], "--labels", inputs["labels"], "--out", out,
            "--per-label", "2", *STEPS]  # fmt: skip
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "PYTHONPATH": path}
    proc = subprocess.Popen([sys.executable, str(JOB), *args], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 300  # a loaded machine starts the actors slowly
        while not [n for n in _ls(out) if n.endswith(".json")]:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "no sample was completed in time"
            time.sleep(0.1)
    finally:  # never leave the job running: its actors would hold the session's CPUs
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    killed = _ls(out)
    assert "manifest.jsonl" not in killed  # it died before the end
    made = sum(n.endswith(".json") for n in killed)
    assert 1 <= made < 6

    lines: list[str] = []
    report = generate_dataset(inputs["bundle"], inputs["labels"], out, 2, steps=2,
                              log=lines.append)  # fmt: skip
    complete = re.search(r"(\d+) already complete", lines[0])
    assert complete and int(complete.group(1)) >= made and report.errors == []
    assert not [n for n in _ls(out) if n.endswith(".tmp")]
    layout = DatasetLayout(out)
    rows = layout.read_manifest()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 6
    assert layout.ids() == ids == layout.label_ids("layers")
    # Whole and deterministic: byte-identical to the uninterrupted run.
    for sample in ids:
        for sub in ("images", "labels/layers"):
            name = f"{sub}/{sample}.nii.gz"
            assert read_bytes(f"{out}/{name}") == read_bytes(f"{reference}/{name}"), name


def test_bad_labels_are_reported_and_skipped(
    ray_cluster: str, s3_bucket: str, inputs: dict[str, str]
) -> None:
    labels = f"{s3_bucket}/labels/labels/layers"
    source = DatasetLayout(inputs["labels"]).label_url("layers", "phantom_0000")
    write_bytes(f"{labels}/good.nii.gz", read_bytes(source))
    write_bytes(f"{labels}/corrupt.nii.gz", read_bytes(source)[:300])  # truncated
    write_volume(
        f"{labels}/flat.nii.gz", read_label(source, "layers")[:, 0, :]
    )  # 2D, not D x H x W
    out = f"{s3_bucket}/out"
    rc = _job_main()(["--bundle", inputs["bundle"], "--labels", f"{s3_bucket}/labels",
                      "--out", out, "--per-label", "2", *STEPS])  # fmt: skip
    assert rc == 2
    errors = [json.loads(line) for line in read_bytes(f"{out}/errors.jsonl").splitlines()]
    assert [e["label"] for e in errors] == [f"{labels}/corrupt.nii.gz", f"{labels}/flat.nii.gz"]
    assert all(e["error"].startswith(e["label"] + ": ") for e in errors)
    assert DatasetLayout(out).ids() == ["good_s0", "good_s1"]
    assert [r["id"] for r in DatasetLayout(out).read_manifest()] == ["good_s0", "good_s1"]


@pytest.mark.parametrize("stored", [(20, 48), (20, 1, 48)])
def test_vessels_label_resized_with_its_spacing(s3_bucket: str, stored: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    url = f"{s3_bucket}/v.nii.gz"
    vessels = rng.integers(0, 3, stored, dtype=np.uint8)
    spacing = (0.3, 0.01, 0.125) if len(stored) == 3 else (0.3, 0.125, 1.0)
    write_volume(url, vessels, np.diag([*spacing, 1.0]))
    label, affine = load_label(url, "vessels", SHAPE)
    flat = vessels.reshape(stored[0], stored[-1])
    np.testing.assert_array_equal(label, resize(flat, (SHAPE[0], SHAPE[2]), order="nearest"))
    np.testing.assert_allclose(np.diag(affine)[:3], [0.3 * 20 / 16, 1.0, 0.125 * 48 / 32])


def test_complete_means_row_and_both_files(reference: str, s3_bucket: str) -> None:
    fs, path = split_url(reference)
    copy = f"{s3_bucket}/copy"
    fs.copy(path, split_url(copy)[1], recursive=True)
    row = DatasetLayout(reference).read_manifest()[0]
    prov = Provenance(row["bundle"]["url"], row["bundle"]["hash"], row["sampler"], row["steps"])
    assert len(complete_samples(copy, "layers", prov)) == 6
    fs.rm(split_url(f"{copy}/images/{row['id']}.nii.gz")[1])  # lost after its row was written
    fs.rm(split_url(f"{copy}/.manifest/phantom_0002_s1.json")[1])  # killed before its row
    assert complete_samples(copy, "layers", prov) == {
        "phantom_0000_s1", "phantom_0001_s0", "phantom_0001_s1", "phantom_0002_s0"
    }  # fmt: skip
    with pytest.raises(ConfigError, match="choose another --out"):
        complete_samples(copy, "layers", Provenance("b", "0" * 64, "ddim", 2))
    ablated = Provenance(prov.bundle_url, prov.bundle_hash, prov.sampler, prov.steps, "nhae_diff3d")
    with pytest.raises(ConfigError, match="ablation full; this run .* ablation nhae_diff3d"):
        complete_samples(copy, "layers", ablated)  # one dataset, one of Table 1's rows


def test_one_run_reads_the_bundle_config_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, file_reads
) -> None:
    """The driver opens the bundle once (its checks, provenance hash and image shape all come
    from that), and hands the opened bundle to the sampler actors, which read no config."""
    import pickle

    import caldm.distributed.generate as generate

    bundle, labels = str(tmp_path / "bundle"), str(tmp_path / "real")
    init_bundle("tiny", bundle, condition="layers", seed=0, cfg=_small_cfg())
    write_phantom_dataset(labels, count=2, preset="tiny", seed=0)
    handed: dict[str, Any] = {}

    def no_cluster(todo, opened, kind, image_shape, prov, *args: Any) -> None:
        handed.update(todo=todo, bundle=opened, kind=kind, shape=image_shape, prov=prov)

    monkeypatch.setattr(generate, "_run", no_cluster)
    config = f"{bundle}/config.yaml"
    file_reads.clear()
    report = generate_dataset(bundle, labels, str(tmp_path / "out"), 2, steps=2, log=lambda _: None)
    assert report.total == 4 and len(handed["todo"]) == 4
    assert file_reads[config] == 1, f"the driver read {config} {file_reads[config]} times"
    # What a Ray actor receives: the opened bundle, pickled (without weights).
    actor = generate.SamplerActor(
        pickle.loads(pickle.dumps(handed["bundle"])), handed["kind"], handed["shape"],
        handed["prov"],
    )  # fmt: skip
    assert {"diff3d", "refiner", "cond_refiner"} <= set(actor.pipeline.modules)
    assert file_reads[config] == 1, "the sampler actor read the bundle's config again"
