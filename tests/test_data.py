"""The data layer: NIfTI over fsspec (local and a real S3 API), layout, preprocessing,
the phantom dataset, OCTA-500 import and the stage datasets."""

from __future__ import annotations

import gzip
import itertools
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from caldm.config import preset
from caldm.data.datasets import (
    BScanDataset,
    LatentDataset,
    SliceWindowDataset,
    ThumbnailSliceDataset,
    num_layer_classes,
)
from caldm.data.io import (
    read_label,
    read_volume,
    spacing_affine,
    url_exists,
    write_volume,
)
from caldm.data.latents import latent_url, write_latent_source, write_latents
from caldm.data.layout import DatasetLayout
from caldm.data.octa500 import import_octa500
from caldm.data.phantom import make_phantom, volume_seed, write_phantom_dataset
from caldm.data.preprocess import from_unit_range, resize, thumbnail, to_unit_range
from caldm.errors import DataError

# ---------------------------------------------------------------------------------- I/O


def _volume(shape=(4, 6, 5), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_round_trip_local(tmp_path, suffix):
    vol = _volume()
    affine = spacing_affine((0.015, 0.003125, 0.02))
    url = str(tmp_path / "sub" / f"v{suffix}")
    write_volume(url, vol, affine)
    back, aff = read_volume(url)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, vol)
    np.testing.assert_allclose(np.diag(aff)[:3], [0.015, 0.003125, 0.02], rtol=1e-6)
    assert nib.load(url).get_data_dtype() == np.uint8  # uint8 on disk, not just after reading
    assert os.listdir(tmp_path / "sub") == [f"v{suffix}"]  # no temp files left behind


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_round_trip_s3(s3_bucket, suffix):
    vol = np.random.default_rng(1).normal(size=(3, 4, 5)).astype(np.float32)
    url = f"{s3_bucket}/data/images/a{suffix}"
    assert not url_exists(url)
    write_volume(url, vol, spacing_affine((1.0, 2.0, 3.0)))
    assert url_exists(url)
    back, aff = read_volume(url)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, vol)
    np.testing.assert_allclose(np.diag(aff), [1.0, 2.0, 3.0, 1.0])


def test_float64_is_stored_as_float32(tmp_path):
    url = str(tmp_path / "f.nii.gz")
    write_volume(url, np.ones((2, 3, 4)))
    assert read_volume(url)[0].dtype == np.float32


def test_trailing_singleton_dimension_is_dropped(tmp_path):
    url = str(tmp_path / "v.nii")
    nib.save(nib.Nifti1Image(_volume()[..., None], np.eye(4)), url)
    assert read_volume(url)[0].shape == (4, 6, 5)


def _raises_naming(url: str, match: str, fn, *args, **kwargs) -> DataError:
    with pytest.raises(DataError, match=match) as info:
        fn(*args, **kwargs)
    assert str(info.value).startswith(f"{url}: ")
    assert "\n" not in str(info.value)
    return info.value


def test_truncated_gzip_names_the_file(tmp_path):
    url = str(tmp_path / "t.nii.gz")
    write_volume(url, _volume((8, 16, 16)))
    raw = open(url, "rb").read()
    open(url, "wb").write(raw[: len(raw) // 2])
    _raises_naming(url, "truncated", read_volume, url)


def test_truncated_voxel_data_names_the_file(tmp_path):
    url = str(tmp_path / "t.nii")
    write_volume(url, _volume((8, 16, 16)))
    raw = open(url, "rb").read()
    open(url, "wb").write(raw[: len(raw) - 100])
    _raises_naming(url, "truncated", read_volume, url)


def test_garbage_header_names_the_file(tmp_path):
    url = str(tmp_path / "g.nii.gz")
    open(url, "wb").write(gzip.compress(b"not a nifti header" * 30))
    _raises_naming(url, "not a NIfTI", read_volume, url)


def test_wrong_ndim_names_the_file(tmp_path):
    url = str(tmp_path / "w.nii.gz")
    write_volume(url, np.zeros((4, 5), np.uint8))
    _raises_naming(url, "expected a 3D volume", read_volume, url)
    write_volume(url, np.zeros((2, 3, 4, 2), np.uint8))
    _raises_naming(url, r"shape \(2, 3, 4, 2\)", read_volume, url)


def test_nan_and_inf_name_the_file(tmp_path):
    for bad in (np.nan, np.inf):
        vol = np.zeros((2, 3, 4), np.float32)
        vol[1, 1, 1] = bad
        url = str(tmp_path / "n.nii.gz")
        write_volume(url, vol)
        _raises_naming(url, "NaN or Inf", read_volume, url)


def test_missing_file_and_unknown_scheme(tmp_path):
    url = str(tmp_path / "missing.nii.gz")
    _raises_naming(url, "file not found", read_volume, url)
    _raises_naming("foo://x", "unknown URL scheme 'foo'", read_volume, "foo://x")


def test_missing_s3_credentials_is_one_line(s3_bucket, monkeypatch):
    import s3fs

    url = f"{s3_bucket}/v.nii.gz"
    write_volume(url, _volume())
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    s3fs.S3FileSystem.clear_instance_cache()
    _raises_naming(url, "no S3 credentials", read_volume, url)
    s3fs.S3FileSystem.clear_instance_cache()


def test_labels_shapes_and_mismatch(tmp_path):
    image_shape = (4, 6, 5)
    layers = str(tmp_path / "layers.nii.gz")
    vessels = str(tmp_path / "vessels.nii.gz")
    write_volume(layers, np.ones(image_shape, np.uint8))
    write_volume(vessels, np.full((4, 5), 2, np.uint8))
    assert read_label(layers, "layers", image_shape).shape == image_shape
    got = read_label(vessels, "vessels", image_shape)
    assert got.shape == (4, 5) and got.dtype == np.uint8 and got.max() == 2
    write_volume(vessels, np.full((4, 1, 5), 1, np.uint8))  # D x 1 x W is accepted too
    assert read_label(vessels, "vessels", image_shape).shape == (4, 5)
    _raises_naming(layers, "does not match the image", read_label, layers, "layers", (4, 6, 6))
    _raises_naming(vessels, "does not match the image", read_label, vessels, "vessels", (5, 6, 5))


# ------------------------------------------------------------------------------- layout


def test_layout_lists_ids_on_s3(s3_bucket):
    root = f"{s3_bucket}/ds"
    for sample_id, suffix in (("b", ".nii"), ("a", ".nii.gz")):
        write_volume(f"{root}/images/{sample_id}{suffix}", _volume())
    write_volume(f"{root}/labels/vessels/a.nii.gz", np.zeros((4, 5), np.uint8))
    layout = DatasetLayout(root + "/")
    assert layout.ids() == ["a", "b"]
    assert layout.image_url("b") == f"{root}/images/b.nii"
    assert layout.label_ids("vessels") == ["a"] and layout.label_ids("layers") == []
    assert layout.label_url("layers", "a") == f"{root}/labels/layers/a.nii.gz"
    assert layout.read_manifest() == []
    layout.write_manifest([{"id": "a"}, {"id": "b", "n": 1}])
    assert DatasetLayout(root).read_manifest() == [{"id": "a"}, {"id": "b", "n": 1}]


def test_empty_dataset_names_the_root(tmp_path, s3_bucket):
    for root in (str(tmp_path / "nothing"), f"{s3_bucket}/empty"):
        _raises_naming(root, "empty dataset", DatasetLayout(root).ids)


def test_bad_manifest_line(tmp_path):
    layout = DatasetLayout(str(tmp_path))
    (tmp_path / "manifest.jsonl").write_text('{"id": "a"}\n{oops\n')
    _raises_naming(layout.manifest_url, "line 2: not JSON", layout.read_manifest)


# -------------------------------------------------------------------------- preprocessing


def test_unit_range_round_trip():
    vol = np.arange(256, dtype=np.uint8).reshape(4, 8, 8)
    x = to_unit_range(vol)
    assert x.dtype == np.float32 and x.min() == -1.0 and x.max() == 1.0
    np.testing.assert_array_equal(from_unit_range(x), vol)
    assert from_unit_range(np.array([-3.0, 3.0])).tolist() == [0, 255]
    f = to_unit_range(np.array([2.0, 4.0, 6.0]))
    np.testing.assert_allclose(f, [-1.0, 0.0, 1.0])


def test_resize_and_thumbnail():
    vol = np.random.default_rng(0).integers(0, 256, (10, 16, 10), dtype=np.uint8)
    up = resize(vol, (12, 12, 12))
    assert up.shape == (12, 12, 12) and up.dtype == np.uint8
    labels = np.random.default_rng(0).integers(0, 9, (10, 16, 10), dtype=np.uint8)
    nearest = resize(labels, (16, 8, 20), order="nearest")
    assert nearest.dtype == np.uint8 and set(np.unique(nearest)) <= set(np.unique(labels))
    # Halving with nearest picks every other voxel (centre-aligned), no new values.
    thumb = thumbnail(vol, (5, 8, 5))
    np.testing.assert_array_equal(thumb, vol[1::2, 1::2, 1::2])
    np.testing.assert_array_equal(resize(np.eye(4), (8, 8), "nearest")[::2, ::2], np.eye(4))
    const = np.full((3, 4, 5), 7, np.uint8)
    np.testing.assert_array_equal(resize(const, (6, 8, 10)), 7)


# ------------------------------------------------------------------------------- phantom

TINY = (32, 64, 64)


def test_phantom_is_deterministic_and_seeded():
    a = make_phantom(TINY, seed=7)
    b = make_phantom(TINY, seed=7)
    c = make_phantom(TINY, seed=8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])
    image, layers, vessels = a
    assert image.shape == layers.shape == TINY and vessels.shape == (32, 64)
    assert image.dtype == layers.dtype == vessels.dtype == np.uint8


def test_phantom_anatomy():
    image, layers, vessels = make_phantom(TINY, seed=3)
    classes = np.unique(layers)
    assert len(classes) >= 7 and classes[0] == 0  # background + at least six layers
    # Background both above the retina (top row) and below the choroid (bottom row).
    assert (layers[:, 0, :] == 0).all() and (layers[:, -1, :] == 0).all()
    # Layers are ordered along depth: classes only increase, except choroid -> background.
    steps = np.diff(layers.astype(int), axis=1)
    assert ((steps >= 0) | (steps == -8)).all()
    # Distinct reflectivity: class means differ pairwise by a clear margin.
    no_vessel = ~vessels.astype(bool)[:, None, :]
    means = np.array([image[(layers == c) & no_vessel].mean() for c in classes], dtype=np.float64)
    gaps = np.abs(means[:, None] - means[None, :])[~np.eye(len(means), dtype=bool)]
    assert gaps.min() > 8, means
    # Foveal pit: the retina (ILM to BM) is thinnest near the centre of the en-face plane.
    thickness = ((layers >= 1) & (layers <= 7)).sum(axis=1).astype(float)
    d, w = thickness.shape
    centre = thickness[d // 3 : 2 * d // 3, w // 3 : 2 * w // 3].min()
    assert centre < 0.7 * np.median(thickness)
    # Arteries and veins are present; below a vessel the outer layers are darker.
    assert set(np.unique(vessels)) == {0, 1, 2}
    for cls in (5, 7):  # ONL and RPE lie below the vessels
        shadowed = image[(layers == cls) & ~no_vessel].mean()
        clear = image[(layers == cls) & no_vessel].mean()
        assert shadowed < 0.6 * clear, (cls, shadowed, clear)
    # Speckle: a layer is not flat.
    assert image[(layers == 5) & no_vessel].std() > 5


def test_phantom_dataset_read_by_nibabel_and_simpleitk(tmp_path):
    import SimpleITK as sitk

    root = str(tmp_path / "ds")
    ids = write_phantom_dataset(root, count=2, preset="tiny", seed=1)
    assert ids == ["phantom_0000", "phantom_0001"]
    layout = DatasetLayout(root)
    assert layout.ids() == ids and layout.label_ids("layers") == ids
    assert [r["id"] for r in layout.read_manifest()] == ids
    image, layers, vessels = make_phantom(TINY, volume_seed(1, 1))
    url = layout.image_url("phantom_0001")
    np.testing.assert_array_equal(read_volume(url)[0], image)
    nib_img = nib.load(url)
    np.testing.assert_array_equal(np.asanyarray(nib_img.dataobj), image)
    assert nib_img.get_data_dtype() == np.uint8
    # ITK arrays are in C order of (x, y, z) = (i, j, k) reversed: W x H x D.
    itk = sitk.ReadImage(url)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(itk).transpose(2, 1, 0), image)
    np.testing.assert_allclose(itk.GetSpacing(), [6 / 32, 2 / 64, 6 / 64], rtol=1e-6)
    lab = sitk.ReadImage(layout.label_url("layers", "phantom_0001"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(lab).transpose(2, 1, 0), layers)
    ves = sitk.ReadImage(layout.label_url("vessels", "phantom_0001"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ves).T, vessels)
    assert read_label(layout.label_url("vessels", "phantom_0001"), "vessels", TINY).shape == (
        32,
        64,
    )
    assert num_layer_classes(root) == 9


def test_phantom_cli_on_s3(s3_bucket):
    from caldm.cli import main

    root = f"{s3_bucket}/phantom"
    assert main(["phantom", "--out", root, "--count", "2", "--seed", "4"]) == 0
    layout = DatasetLayout(root)
    assert layout.ids() == ["phantom_0000", "phantom_0001"]
    image, _ = read_volume(layout.image_url("phantom_0000"))
    np.testing.assert_array_equal(image, make_phantom(TINY, volume_seed(4, 0))[0])


# ------------------------------------------------------------------------------ OCTA-500


def _bmp_folder(folder, volume: np.ndarray) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    for n, bscan in enumerate(volume, 1):  # 1.bmp .. 12.bmp: natural, not lexical, order
        Image.fromarray(bscan).save(folder / f"{n}.bmp")


def test_octa500_import_voxel_exact_with_a_corrupt_volume(tmp_path, capsys):
    from PIL import Image
    from scipy.io import savemat

    src = tmp_path / "OCTA_3mm"
    rng = np.random.default_rng(0)
    volumes = {i: rng.integers(0, 256, (12, 10, 8), dtype=np.uint8) for i in ("10001", "10002")}
    for sample_id, volume in volumes.items():
        _bmp_folder(src / "OCT" / sample_id, volume)
    _bmp_folder(src / "OCT" / "10003", volumes["10001"])
    (src / "OCT" / "10003" / "5.bmp").write_bytes(b"BM not really a bitmap")
    # Labels of 10001: surfaces (3, D, W) and artery/vein en-face maps (D x W).
    surfaces = np.stack([np.full((12, 8), r) for r in (2, 5, 7)]).astype(float)
    (src / "GroundTruth" / "GT_Layers").mkdir(parents=True)
    savemat(src / "GroundTruth" / "GT_Layers" / "10001.mat", {"Layer": surfaces})
    artery = np.zeros((12, 8), np.uint8)
    artery[3] = 255
    vein = np.zeros((12, 8), np.uint8)
    vein[:, 2] = 255
    for folder, mask in (("GT_Artery", artery), ("GT_Vein", vein)):
        (src / folder).mkdir()
        Image.fromarray(mask).save(src / folder / "10001.bmp")

    dst = str(tmp_path / "out")
    failures = import_octa500(str(src), dst, workers=2)
    assert [f[0] for f in failures] == ["10003"]
    assert "5.bmp" in failures[0][1]
    assert "failed: 10003:" in capsys.readouterr().err
    layout = DatasetLayout(dst)
    assert layout.ids() == ["10001", "10002"]
    for sample_id, volume in volumes.items():
        back, affine = read_volume(layout.image_url(sample_id))
        assert back.dtype == np.uint8
        np.testing.assert_array_equal(back, volume)
        np.testing.assert_allclose(np.diag(affine)[:3], [3 / 12, 2 / 10, 3 / 8])
    layers = read_label(layout.label_url("layers", "10001"), "layers", (12, 10, 8))
    np.testing.assert_array_equal(layers[0, :, 0], [0, 0, 1, 1, 1, 2, 2, 3, 3, 3])
    vessels = read_label(layout.label_url("vessels", "10001"), "vessels", (12, 10, 8))
    assert vessels[3, 0] == 1 and vessels[0, 2] == 2 and vessels[3, 2] == 2 and vessels[0, 0] == 0
    assert layout.label_ids("layers") == ["10001"]
    assert [r["id"] for r in layout.read_manifest()] == ["10001", "10002"]


def test_import_octa500_cli_exit_status(tmp_path):
    from caldm.cli import main

    src = tmp_path / "OCTA_6mm"
    _bmp_folder(src / "OCT" / "1", np.zeros((3, 4, 5), np.uint8))
    assert main(["import-octa500", str(src), str(tmp_path / "a")]) == 0
    (src / "OCT" / "2").mkdir()  # a volume folder without B-scans
    assert main(["import-octa500", str(src), str(tmp_path / "b")]) == 1
    assert DatasetLayout(str(tmp_path / "b")).ids() == ["1"]
    assert main(["import-octa500", str(tmp_path / "none"), str(tmp_path / "c")]) == 2


# ------------------------------------------------------------------------------ datasets


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("phantom"))
    write_phantom_dataset(root, count=4, preset="tiny", seed=0)
    return root


def _take(dataset, n: int) -> list[dict]:
    return list(itertools.islice(iter(dataset), n))


@pytest.fixture
def cfg():
    return preset("tiny")


def test_volume_datasets_yield_documented_shapes(phantom_root, cfg):
    cfg.data.augment.ae_shift = 0.0  # the depth moves have a test of their own
    d, h, w = cfg.model.image_shape
    s, k = cfg.data.slices_per_volume, cfg.model.k
    items = _take(BScanDataset(phantom_root, cfg), 3)
    assert all(set(i) == {"image"} and i["image"].shape == (1, h, w) for i in items)
    assert all(i["image"].dtype == torch.float32 for i in items)
    assert -1.0 <= float(items[0]["image"].min()) < float(items[0]["image"].max()) <= 1.0
    item = _take(ThumbnailSliceDataset(phantom_root, cfg), 1)[0]
    assert item["thumbnail"].shape == (1, *cfg.model.thumbnail_shape)
    assert item["slices"].shape == (s, 1, h, w) and item["index"].shape == (s,)
    assert item["index"].dtype == torch.long
    # The slices are the normalised volume's slices at the given indices.
    layout = DatasetLayout(phantom_root)
    volumes = [to_unit_range(read_volume(layout.image_url(i))[0]) for i in layout.ids()]
    slice0 = item["slices"][0, 0].numpy()
    assert any(np.array_equal(v[int(item["index"][0])], slice0) for v in volumes)
    window = _take(SliceWindowDataset(phantom_root, cfg), 1)[0]["window"]
    n = cfg.sampling.decode_chunk + 2 * (k // 2)  # a decode chunk and its halo
    assert window.shape == (n, 1, h, w)
    match = [v for v in volumes if any(np.array_equal(v[j], window[n // 2, 0]) for j in range(d))]
    assert match, "the window centre is a slice of some volume"


def test_window_edges_are_replicated(tmp_path, cfg):
    root = str(tmp_path / "one")
    d, h, w = cfg.model.image_shape
    vol = np.repeat(np.arange(d, dtype=np.uint8)[:, None, None] * 8, h, 1).repeat(w, 2)
    write_volume(f"{root}/images/ramp.nii.gz", vol)
    cfg.data.slices_per_volume = 64
    centres_seen = set()
    for item in _take(SliceWindowDataset(root, cfg), 64):
        levels = np.rint((item["window"][:, 0, 0, 0].numpy() + 1) * 127.5 / 8).astype(int)
        n = len(levels)
        centre = levels[n // 2]
        expected = np.clip(centre + np.arange(n) - n // 2, 0, d - 1)
        np.testing.assert_array_equal(levels, expected)
        centres_seen.add(int(centre))
    assert 0 in centres_seen or d - 1 in centres_seen


def test_resized_to_the_preset_shape(tmp_path, cfg):
    root = str(tmp_path / "odd")
    write_volume(f"{root}/images/x.nii", _volume((20, 40, 30)))
    item = _take(BScanDataset(root, cfg), 1)[0]
    assert item["image"].shape == (1, *cfg.model.image_shape[1:])


def test_shards_are_disjoint_and_reshuffled(phantom_root, cfg):
    ranks = [BScanDataset(phantom_root, cfg, rank=r, world_size=2, seed=5) for r in (0, 1)]
    for epoch in range(3):
        a, b = ranks[0].shard_ids(epoch), ranks[1].shard_ids(epoch)
        assert len(a) == len(b) == 2 and not set(a) & set(b)
        assert sorted(a + b) == DatasetLayout(phantom_root).ids()
    orders = {tuple(ranks[0].shard_ids(e) + ranks[1].shard_ids(e)) for e in range(6)}
    assert len(orders) > 1  # reshuffled across epochs
    # What each rank actually yields in epoch 0 comes from its own volumes only.
    cfg.data.slices_per_volume = 1
    cfg.data.augment.ae_shift = 0.0  # slices as stored, to find their volume
    layout = DatasetLayout(phantom_root)
    volumes = {i: to_unit_range(read_volume(layout.image_url(i))[0]) for i in layout.ids()}
    for rank in ranks:
        for item in _take(rank, 2):
            image = item["image"][0].numpy()
            owner = [i for i, v in volumes.items() if any(np.array_equal(s, image) for s in v)]
            assert owner and owner[0] in rank.shard_ids(0)
    with pytest.raises(DataError, match="cannot be sharded over 5 ranks"):
        BScanDataset(phantom_root, cfg, rank=0, world_size=5)


def test_dataloader_workers_split_a_rank(phantom_root, cfg):
    cfg.data.slices_per_volume = 1
    ds = ThumbnailSliceDataset(phantom_root, cfg, seed=1)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    batch = next(iter(loader))
    assert batch["thumbnail"].shape == (2, 1, *cfg.model.thumbnail_shape)
    assert not torch.equal(batch["thumbnail"][0], batch["thumbnail"][1])


def _dataset_with_bad_volume(tmp_path) -> str:
    root = str(tmp_path / "bad")
    write_volume(f"{root}/images/good.nii.gz", _volume((32, 64, 64)))
    nan = np.zeros((32, 64, 64), np.float32)
    nan[0, 0, 0] = np.nan
    write_volume(f"{root}/images/nan.nii.gz", nan)
    return root


def test_bad_volume_is_skipped_or_raises(tmp_path, cfg, caplog):
    root = _dataset_with_bad_volume(tmp_path)
    items = _take(BScanDataset(root, cfg), 6)  # three epochs of the one good volume
    assert len(items) == 6
    assert "nan.nii.gz: contains NaN or Inf values" in caplog.text
    cfg.data.skip_bad_volumes = False
    with pytest.raises(DataError, match="nan.nii.gz: contains NaN"):
        _take(BScanDataset(root, cfg), 6)  # epoch 0 reaches the bad volume


def test_every_volume_bad_raises_instead_of_hanging(tmp_path, cfg):
    root = str(tmp_path / "allbad")
    write_volume(f"{root}/images/flat.nii.gz", np.zeros((4, 5), np.uint8))
    with pytest.raises(DataError, match="every volume of this shard is bad"):
        _take(BScanDataset(root, cfg), 1)


@pytest.fixture
def latent_root(tmp_path, phantom_root, cfg) -> str:
    root = str(tmp_path / "latents")
    rng = np.random.default_rng(0)
    for sample_id in DatasetLayout(phantom_root).ids():
        z = rng.normal(size=cfg.model.latent_shape).astype(np.float32)
        z_sr = rng.normal(size=cfg.model.z_sr_shape).astype(np.float32)
        write_latents(latent_url(root, sample_id), torch.from_numpy(z), z_sr, z_sr + 1)
    write_latent_source(root, phantom_root, bundle="b")
    return root


def test_latent_datasets(latent_root, phantom_root, cfg):
    c, d1, h1, w1 = cfg.model.latent_shape
    _, d, hs, ws = cfg.model.z_sr_shape
    _, h, w = cfg.model.image_shape
    item = _take(LatentDataset(latent_root, cfg, "diff3d"), 1)[0]
    assert set(item) == {"z"} and item["z"].shape == (c, d1, h1, w1)
    item = _take(LatentDataset(latent_root, cfg, "refiner"), 1)[0]
    assert item["z_sr"].shape == item["z_hr"].shape == (c, hs, ws)
    torch.testing.assert_close(item["z_hr"], item["z_sr"] + 1)
    # labels arrive as class fractions on the encoders' grids (caldm.data.labels)
    item = _take(LatentDataset(latent_root, cfg, "diff3d", condition="layers"), 1)[0]
    assert item["label"].shape == (9, 2 * d1, 2 * h1, 2 * w1)
    assert item["label"].dtype == torch.float32 and item["label"][8].max() > 0
    torch.testing.assert_close(item["label"].sum(0), torch.ones(2 * d1, 2 * h1, 2 * w1))
    item = _take(LatentDataset(latent_root, cfg, "refiner", condition="vessels"), 1)[0]
    assert item["label"].shape == (3, 2 * ws)
    item = _take(
        LatentDataset(latent_root, cfg, "diff3d", condition="vessels", data_root=phantom_root), 1
    )[0]
    assert item["label"].shape == (3, 2 * d1, 2 * w1)
    ranks = [LatentDataset(latent_root, cfg, "diff3d", rank=r, world_size=2) for r in (0, 1)]
    assert not set(ranks[0].shard_ids(0)) & set(ranks[1].shard_ids(0))


def test_latent_dataset_errors(tmp_path, latent_root, phantom_root, cfg):
    missing = str(tmp_path / "nolatents")
    _raises_naming(missing, "no latent cache", LatentDataset, missing, cfg, "diff3d")
    label = f"{phantom_root}/labels/vessels/phantom_0002.nii.gz"
    os.rename(label, label + ".away")
    try:
        _raises_naming(
            label, "missing vessels label", LatentDataset, latent_root, cfg, "refiner", "vessels"
        )
    finally:
        os.rename(label + ".away", label)
    write_latents(latent_url(latent_root, "phantom_0000"), np.zeros((1, 2, 3, 4)), 0, 0)
    cfg.data.skip_bad_volumes = False
    with pytest.raises(DataError, match=r"phantom_0000.safetensors: z has shape \(1, 2, 3, 4\)"):
        _take(LatentDataset(latent_root, cfg, "diff3d"), 4)


def test_autoencoder_streams_move_the_volume_along_depth(tmp_path) -> None:
    """data.augment.ae_shift: the autoencoder stages see the retina at other depths (the
    whole volume moved, edges replicated), so their latents can express a moved retina."""
    import itertools

    from caldm.data.datasets import ThumbnailSliceDataset
    from caldm.data.labels import shift_depth
    from caldm.data.phantom import write_phantom_dataset

    cfg = preset("tiny")
    cfg.data.slices_per_volume = 2
    cfg.data.augment.ae_shift = 0.25  # up to 16 of 64 rows
    root = str(tmp_path / "data")
    write_phantom_dataset(root, 1, "tiny", seed=0)
    dataset = ThumbnailSliceDataset(root, cfg)
    volume = dataset._load("phantom_0000")
    seen = set()
    for item in itertools.islice(iter(dataset), 12):
        slices, index = item["slices"][:, 0].numpy(), item["index"].numpy()
        moves = [s for s in range(-16, 17)
                 if np.array_equal(slices, shift_depth(volume, s)[index])]  # fmt: skip
        assert moves, "a slice that is not the volume's slice moved along depth"
        seen.add(moves[0])
    assert len(seen) > 3
    cfg.data.augment.ae_shift = 0.0
    item = next(iter(ThumbnailSliceDataset(root, cfg)))
    np.testing.assert_array_equal(item["slices"][:, 0].numpy(), volume[item["index"].numpy()])
