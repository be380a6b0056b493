"""The OCTA-500 train/test split: `caldm import-octa500 --split`, labels under the dataset
root's GroundTruth/, and the --ids / --exclude forms the jobs take."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from caldm.data.layout import DatasetLayout, parse_ids, select_ids
from caldm.errors import DataError


def _bmp_folder(folder, volume: np.ndarray) -> None:
    folder.mkdir(parents=True)
    for n, bscan in enumerate(volume, 1):
        Image.fromarray(bscan).save(folder / f"{n}.bmp")


def test_import_split_and_root_ground_truth(tmp_path) -> None:
    from caldm.cli import main

    root = tmp_path / "OCTA-500"
    src = root / "OCTA_6mm"
    ids = [str(10001 + i) for i in range(6)]
    for i in ids:
        _bmp_folder(src / "OCT" / i, np.zeros((3, 4, 5), np.uint8))
    # the layer label of one volume only under the dataset root's GroundTruth/<subset>/
    (root / "GroundTruth" / "OCTA_6mm" / "GT_Layers").mkdir(parents=True)
    surfaces = np.stack([np.full((3, 5), r) for r in (1, 2)]).astype(float)
    savemat(root / "GroundTruth" / "OCTA_6mm" / "GT_Layers" / "10002.mat", {"Layer": surfaces})
    dst = tmp_path / "data"
    assert main(["import-octa500", str(src), str(dst), "--split", "--split-seed", "3"]) == 0
    split = json.loads((dst / "split.json").read_text())
    assert len(split["test"]) == 2 and len(split["train"]) == 4  # 1/3 : 2/3
    assert sorted(split["train"] + split["test"]) == ids
    assert DatasetLayout(str(dst)).label_ids("layers") == ["10002"]
    # seeded: the same split again, another seed another one
    again = DatasetLayout(str(tmp_path / "x")).write_split(ids, seed=3)
    assert again["test"] == split["test"]
    others = {tuple(DatasetLayout(str(tmp_path / "x")).write_split(ids, seed=s)["test"])
              for s in range(6)}  # fmt: skip
    assert len(others) > 1

    assert parse_ids(f"{dst}/split.json:train") == split["train"]
    assert parse_ids(f"{dst}/split.json:test") == split["test"]
    assert parse_ids("a, b,c") == ["a", "b", "c"]
    assert select_ids(ids, split["train"], split["train"][:1]) == split["train"][1:]
    with pytest.raises(DataError, match="nope is not among the 6 volumes"):
        select_ids(ids, ["nope"])
    (tmp_path / "bad.json").write_text('{"train": "10001"}')
    with pytest.raises(DataError, match=r"bad\.json.*list of ids under 'train'"):
        parse_ids(f"{tmp_path / 'bad.json'}:train")


def test_encode_latents_takes_the_split(tmp_path, capsys) -> None:
    """--ids names volumes that do not exist: one line naming them, before any other check."""
    import importlib.util
    from pathlib import Path

    from caldm.data.phantom import write_phantom_dataset

    write_phantom_dataset(str(tmp_path / "data"), count=2, preset="tiny")
    path = Path(__file__).resolve().parents[1] / "jobs" / "encode_latents.py"
    spec = importlib.util.spec_from_file_location("encode_job_split", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rc = module.main(
        ["--bundle", str(tmp_path / "b"), "--data", str(tmp_path / "data"),
         "--out", str(tmp_path / "l"), "--ids", "phantom_0000,phantom_0009"]
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "phantom_0009 is not among the 2 volumes" in err
    assert not (tmp_path / "l").exists()


def test_training_takes_ids_and_an_accelerator_type(tmp_path) -> None:
    from caldm.data.phantom import write_phantom_dataset
    from caldm.distributed.train import TrainRequest, plan
    from caldm.errors import ConfigError

    data = str(tmp_path / "data")
    write_phantom_dataset(data, count=3, preset="tiny")
    req = dict(stage="ae2d", data=data, out=str(tmp_path / "run"))
    p = plan(TrainRequest(**req, ids=("phantom_0000", "phantom_0002")))
    assert p.exclude_ids == ("phantom_0001",)  # everything not in --ids is held out
    keep, drop = ("phantom_0000", "phantom_0002"), ("phantom_0000",)
    p = plan(TrainRequest(**req, ids=keep, exclude_ids=drop))
    assert set(p.exclude_ids) == {"phantom_0000", "phantom_0001"}
    with pytest.raises(DataError, match="phantom_0009 is not among the 3 volumes"):
        plan(TrainRequest(**req, ids=("phantom_0009",)))
    with pytest.raises(ConfigError, match="--accelerator-type A10G: needs --gpus-per-worker"):
        plan(TrainRequest(**req, accelerator_type="A10G"))
