"""The data layer: NIfTI over fsspec (local and a real S3 API), layout, preprocessing,
the phantom dataset, OCTA-500 import and the stage datasets."""

from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from caldm.data.io import (
    read_label,
    read_volume,
    spacing_affine,
    url_exists,
    write_volume,
)
from caldm.data.layout import DatasetLayout
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
