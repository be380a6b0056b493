"""The segmenter, the Table 2 job (one small Ray Train run) and its bad-input checks."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from caldm import metrics
from caldm.data.io import read_bytes, write_volume
from caldm.data.layout import DatasetLayout
from caldm.data.phantom import make_phantom
from caldm.nn.nets.segmenter import (
    SegmenterConfig,
    image_planes,
    label_planes,
    segment_volume,
    segmenter_bytes,
    segmenter_from_bytes,
    train_segmenter,
)

SHAPE = (8, 32, 32)
REPO = Path(__file__).resolve().parents[1]


def _job_main():
    """``main`` of jobs/downstream.py (a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("downstream_job", REPO / "jobs/downstream.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _pair(seed: int, classes: int = 9) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A phantom volume with a layer label of ``classes`` classes: fewer than the phantom's 9
    merge the deepest ones, more split the choroid (class 8) into equal parts by depth."""
    image, layers, vessels = make_phantom(SHAPE, seed)
    if classes < 9:
        layers = np.minimum(layers, classes - 1)
    elif classes > 9:
        choroid = layers == 8
        k = np.cumsum(choroid, axis=1)  # rank of each choroid pixel along its A-scan
        n = np.maximum(k[:, -1:, :], 1)
        part = (classes - 8) * (k - 1) // n
        layers = np.where(choroid, 8 + part, layers).astype(np.uint8)
    return image, layers, vessels


def _dataset(root: str, seeds: list[int], ids: list[str] | None = None, classes: int = 9,
             label_ids: list[str] | None = None, labels: bool = True) -> list[str]:
    layout = DatasetLayout(root)
    ids = ids or [f"v{s}" for s in seeds]
    records = []
    for i, (sid, seed) in enumerate(zip(ids, seeds)):
        image, layers, vessels = _pair(seed, classes)
        write_volume(layout.image_url(sid), image)
        if labels:
            write_volume(layout.label_url("layers", sid), layers)
            write_volume(layout.label_url("vessels", sid), vessels)
        record = {"id": sid, "layer_classes": classes}
        if label_ids:
            record["label_id"] = label_ids[i]
        records.append(record)
    layout.write_manifest(records)
    return ids


def test_segmenter_learns_any_class_count() -> None:
    classes = 11  # the downstream job's test uses 7
    cfg = SegmenterConfig("layers", classes, (32, 32), channels=(8, 16, 32))
    train = [_pair(s, classes) for s in (1, 2)]
    images = np.concatenate([image_planes(v, "layers") for v, _, _ in train])
    labels = np.concatenate([label_planes(lab, "layers") for _, lab, _ in train])
    model = train_segmenter(images, labels, cfg, steps=60, seed=0, lr=1e-2)
    volume, ref, _ = _pair(3, classes)
    pred = segment_volume(model, cfg, volume)
    assert pred.shape == ref.shape and pred.max() < classes
    dice = metrics.MeanDice(classes)(pred, ref)
    untrained = metrics.MeanDice(classes)(np.zeros_like(ref), ref)
    assert dice > 0.5 > untrained, dice  # it learned the layers, not just the background
    # Saved and loaded, it predicts the same; the config (class count) travels with it.
    again, cfg2 = segmenter_from_bytes(segmenter_bytes(model, cfg))
    assert cfg2 == cfg
    np.testing.assert_array_equal(segment_volume(again, cfg2, volume), pred)
    with pytest.raises(ValueError, match="not a caldm segmenter"):
        segmenter_from_bytes(b"garbage", "x.safetensors")
    with pytest.raises(ValueError, match=f">= the segmenter's {classes - 1}"):
        small = SegmenterConfig("layers", classes - 1, (32, 32), channels=(8, 16, 32))
        train_segmenter(images, labels, small, steps=1)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("downstream")
    real, test = str(root / "real"), str(root / "test")
    _dataset(real, [1, 2, 3], classes=7)
    _dataset(test, [20, 21], classes=7)
    # A synthetic stand-in: 2 samples per label of the real set (other phantom seeds).
    syn_ids = [f"v{s}_s{k}" for s in (1, 2, 3) for k in (0, 1)]
    _dataset(str(root / "syn"), list(range(40, 46)), syn_ids, classes=7,
             label_ids=[i.rsplit("_s", 1)[0] for i in syn_ids])
    return {"real": real, "test": test, "syn": str(root / "syn"), "root": str(root)}


def test_downstream_job(
    ray_cluster: str,
    inputs: dict[str, str],
    s3_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from caldm.distributed.downstream import SEGMENTER_FILE
    from caldm.segmentation import iter_pairs, score_segmenter

    db = f"sqlite:///{tmp_path}/mlflow.db"  # S3 outputs: runs would go to ~/.caldm otherwise
    monkeypatch.setenv("MLFLOW_TRACKING_URI", db)
    main = _job_main()

    # The synthetic set and the outputs on S3 (moto), the real sets local.
    syn = f"{s3_bucket}/syn"
    src = DatasetLayout(inputs["syn"])
    for sub in ("images", "labels/layers", "labels/vessels"):
        for p in sorted(Path(inputs["syn"], sub).iterdir()):
            from caldm.data.io import write_bytes

            write_bytes(f"{syn}/{sub}/{p.name}", p.read_bytes())
    DatasetLayout(syn).write_manifest(src.read_manifest())
    out = f"{s3_bucket}/table2"
    argv = ["--real", inputs["real"], "--test", inputs["test"], "--synthetic", syn,
            "--task", "layers", "--out", out, "--seeds", "1", "--max-steps", "5"]
    assert main(argv) == 0
    report = json.loads(read_bytes(f"{out}/report.json"))
    assert report["task"] == "layers" and report["n_test"] == 2
    rows = [(r["train"], r["syn_per_label"], r["n_volumes"]) for r in report["rows"]]
    assert rows == [("real", 0, 3), ("synthetic", 2, 6), ("real+synthetic", 1, 6),
                    ("real+synthetic", 2, 9)]
    for r in report["rows"]:
        assert set(r) >= {"dice", "mad"} and r["dice"]["std"] == 0.0  # one seed
    # The real row is exactly the saved real-trained segmenter scored on the test set.
    model, cfg = segmenter_from_bytes(read_bytes(f"{out}/{SEGMENTER_FILE}"))
    assert cfg.num_classes == 7  # from the data
    score = score_segmenter(model, cfg, iter_pairs(inputs["test"], "layers", 7))
    assert report["rows"][0]["dice"]["mean"] == pytest.approx(score["dice"]["mean"], abs=1e-6)
    assert report["rows"][0]["mad"]["mean"] == pytest.approx(score["mad"]["mean"], abs=1e-6)
    table = read_bytes(f"{out}/report.md").decode()
    assert "| Real+200% Syn | 9 |" in table
    assert read_bytes(f"{out}/report.png")[:4] == b"\x89PNG"
    import mlflow

    client = mlflow.MlflowClient(db)
    runs = client.search_runs([client.get_experiment_by_name("downstream").experiment_id])
    names = sorted(r.info.run_name for r in runs)
    assert names == sorted(f"layers: {n}" for n in
                           ("Real", "200% Syn", "Real+100% Syn", "Real+200% Syn", "table2"))
    real_run = next(r for r in runs if r.info.run_name == "layers: Real")
    assert real_run.data.metrics["dice.mean"] == pytest.approx(report["rows"][0]["dice"]["mean"])


def _bad(tmp_path: Path, inputs: dict[str, str], capsys, **change: str) -> str:
    main = _job_main()

    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "report.json").write_text("earlier")
    args = {"real": inputs["real"], "test": inputs["test"], "synthetic": inputs["syn"], **change}
    argv = [x for k, v in args.items() for x in (f"--{k}", v)]
    assert main([*argv, "--task", "layers", "--out", str(out)]) == 2
    assert (out / "report.json").read_text() == "earlier"  # nothing written is lost
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    return err


def test_downstream_bad_input(tmp_path: Path, inputs: dict[str, str], capsys) -> None:
    unlabelled = str(tmp_path / "unlabelled")
    _dataset(unlabelled, [50], labels=False)
    assert f"{unlabelled}/labels/layers: no layers labels" in _bad(
        tmp_path, inputs, capsys, synthetic=unlabelled
    )
    other_classes = str(tmp_path / "classes")
    _dataset(other_classes, [51], ["w_s0"], classes=11)
    err = _bad(tmp_path, inputs, capsys, synthetic=other_classes)
    assert f"{other_classes}/labels/layers/w_s0.nii.gz" in err and "7 classes" in err
    shape = str(tmp_path / "shape")
    _dataset(shape, [52], ["u_s0"])
    write_volume(DatasetLayout(shape).label_url("layers", "u_s0"), np.zeros((8, 16, 32), np.uint8))
    err = _bad(tmp_path, inputs, capsys, synthetic=shape)
    assert f"{shape}/labels/layers/u_s0.nii.gz" in err and "does not match" in err
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    assert f"{empty}: empty dataset" in _bad(tmp_path, inputs, capsys, test=str(empty))


def test_downstream_help_without_a_cluster() -> None:
    job = REPO / "jobs/downstream.py"
    proc = subprocess.run([sys.executable, str(job), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--synthetic" in proc.stdout and "layers" in proc.stdout


# --- label fidelity (jobs/evaluate.py) ------------------------------------------------------


@pytest.fixture(scope="module")
def segmenter_file(inputs: dict[str, str]) -> str:
    from caldm.segmentation import iter_pairs, planes_of

    cfg = SegmenterConfig("layers", 7, (32, 32), channels=(8, 16, 32))
    planes = planes_of(iter_pairs(inputs["real"], "layers", 7), cfg)
    model = train_segmenter(planes.images.astype(np.float32), planes.labels, cfg, 60, lr=1e-2)
    path = Path(inputs["root"]) / "segmenter.safetensors"
    path.write_bytes(segmenter_bytes(model, cfg))
    return str(path)


def test_label_fidelity(tmp_path: Path, inputs: dict[str, str], segmenter_file: str) -> None:
    from caldm.errors import CaldmError
    from caldm.segmentation import label_fidelity

    # "Synthetic" volumes that are the held-out ones with their own labels: identical numbers.
    same = str(tmp_path / "same")
    _dataset(same, [20, 21], ["a_s0", "b_s0"], classes=7)
    report = label_fidelity(inputs["test"], same, segmenter=segmenter_file)
    assert report["task"] == "layers" and report["num_classes"] == 7
    assert report["real"]["dice"] == report["synthetic"]["dice"]
    assert report["ratio"]["dice"] == pytest.approx(1.0) and report["real"]["dice"]["mean"] > 0.5
    # Images that ignore their labels (each volume guided by the other's label): worse.
    swapped = str(tmp_path / "swapped")
    _dataset(swapped, [20, 21], ["a_s0", "b_s0"], classes=7)
    layout = DatasetLayout(swapped)
    a, b = (layout.label_url("layers", i) for i in ("a_s0", "b_s0"))
    label_a = read_bytes(a)
    from caldm.data.io import write_bytes

    write_bytes(a, read_bytes(b))
    write_bytes(b, label_a)
    worse = label_fidelity(inputs["test"], swapped, segmenter=segmenter_file)
    assert worse["synthetic"]["dice"]["mean"] < report["synthetic"]["dice"]["mean"]
    assert worse["synthetic"]["mad"]["mean"] > report["synthetic"]["mad"]["mean"]
    # Bad input: no labels beside the images; a class the segmenter does not know.
    unlabelled = str(tmp_path / "unlabelled")
    _dataset(unlabelled, [50], labels=False)
    with pytest.raises(CaldmError, match=f"{unlabelled}/labels: no layers or vessels labels"):
        label_fidelity(inputs["test"], unlabelled, segmenter=segmenter_file)
    eleven = str(tmp_path / "eleven")
    _dataset(eleven, [51], ["c_s0"], classes=11)
    with pytest.raises(CaldmError, match=f"{eleven}/labels/layers/c_s0.nii.gz: .* 7 classes"):
        label_fidelity(inputs["test"], eleven, segmenter=segmenter_file)
    with pytest.raises(CaldmError, match="not a caldm segmenter"):
        label_fidelity(inputs["test"], same, segmenter=str(Path(inputs["real"]) / "manifest.jsonl"))


def test_label_overlay_draws_the_boundaries_where_the_label_has_them() -> None:
    from caldm.preview import BOUNDARY_COLOURS, label_overlay

    volume = np.full((4, 32, 16), 100, np.uint8)
    volume[:, 16:] = 200
    label = np.zeros((4, 32, 16), np.uint8)
    label[:, 16:] = 1  # one boundary, at depth 16 of 32: row 32 of a 64-px tile
    sheet = label_overlay([volume], [label], ["x"], tile=64)
    from caldm.preview import HEADER_H, LABEL_W, PAD

    x0, y0 = LABEL_W + 64 + PAD, HEADER_H
    assert sheet.getpixel((x0 + 30, y0 + 32)) == BOUNDARY_COLOURS[0]
    assert sheet.getpixel((x0 + 30, y0 + 20)) != BOUNDARY_COLOURS[0]
    assert sheet.getpixel((LABEL_W + 30, y0 + 32)) != BOUNDARY_COLOURS[0]  # the plain tile
