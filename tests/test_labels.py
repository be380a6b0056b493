"""Label geometry (caldm.data.labels): reading with voxel sizes, checks, the reduction the
condition encoders read, and class counts other than the phantom's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caldm.config import preset
from caldm.data.io import spacing_affine, write_volume
from caldm.data.labels import (
    check_label,
    encoder_grid,
    prepare_labels,
    read_label_map,
    reduce_label,
)
from caldm.data.phantom import make_phantom
from caldm.errors import DataError

TINY = preset("tiny")


def _nearest(label: np.ndarray, grid: tuple[int, ...]) -> np.ndarray:
    """The old rule: F.interpolate(mode="nearest") to the grid (index floor(i * n / m))."""
    x = torch.from_numpy(label)[None, None].float()
    return torch.nn.functional.interpolate(x, size=grid, mode="nearest")[0, 0].long().numpy()


def test_fractions_are_area_averages() -> None:
    rng = np.random.default_rng(0)
    label = rng.integers(0, 5, (8, 12, 16)).astype(np.uint8)
    got = reduce_label(label, "layers", (4, 3, 4), 5)
    assert got.shape == (5, 4, 3, 4) and got.dtype == np.float32
    block = label.reshape(4, 2, 3, 4, 4, 4).transpose(0, 2, 4, 1, 3, 5).reshape(4, 3, 4, -1)
    want = np.stack([(block == c).mean(-1) for c in range(5)])
    np.testing.assert_allclose(got, want, atol=1e-6)
    # tensor in, tensor out; and an axis shorter than its cells is sampled, not divided by zero
    t = reduce_label(torch.from_numpy(label), "layers", (16, 3, 4), 5)
    assert isinstance(t, torch.Tensor)
    np.testing.assert_allclose(t.sum(0).numpy(), 1.0, atol=1e-6)
    np.testing.assert_allclose((t.numpy()[:, 0::4] + t.numpy()[:, 2::4]) / 2, got, atol=1e-6)
    # slabs: a label larger than one slab gives the same fractions as a small-slab run
    import caldm.data.labels as labels_mod

    saved = labels_mod._SLAB_VOXELS
    labels_mod._SLAB_VOXELS = 100
    try:
        np.testing.assert_array_equal(reduce_label(label, "layers", (4, 3, 4), 5), got)
    finally:
        labels_mod._SLAB_VOXELS = saved
    with pytest.raises(ValueError, match="0..4"):
        reduce_label(label + 1, "layers", (4, 3, 4), 5)


def test_thin_band_and_one_voxel_boundary_move_reach_the_encoder() -> None:
    """Fails under the old nearest rule: a 1-voxel band between sampled rows vanished, and
    moving a boundary by one full-resolution voxel did not change the encoder's input."""
    d, h, w = TINY.model.image_shape
    grid = encoder_grid(TINY, "layers", "diff3d")
    per_cell = h // grid[1]  # voxels per cell along H (2 at the tiny preset)
    assert per_cell >= 2  # else no rule could lose a one-voxel band
    label = np.zeros((d, h, w), np.uint8)
    label[:, 30:] = 1
    band = label.copy()
    band[:, 33] = 2  # an RPE-like band one voxel thick, on a row nearest sampling skips
    assert 2 not in _nearest(band, grid)  # the old rule lost it entirely
    fractions = reduce_label(band, "layers", grid, 3)
    assert fractions[2].max() == pytest.approx(1 / per_cell)  # one voxel of per_cell
    assert fractions[2].sum() * (d * h * w) / np.prod(grid) == pytest.approx(d * w)
    label[:, 30:33] = 0  # the boundary at row 33 ...
    moved = np.zeros_like(label)
    moved[:, 34:] = 1  # ... and one voxel lower
    assert np.array_equal(_nearest(label, grid), _nearest(moved, grid))  # invisible before
    diff = reduce_label(moved, "layers", grid, 3) - reduce_label(label, "layers", grid, 3)
    assert diff[1].min() == pytest.approx(-1 / per_cell)
    assert diff[0].max() == pytest.approx(1 / per_cell)
    # vessels: a one-voxel-wide vessel survives the en-face reduction too
    vessels = np.zeros((d, w), np.uint8)
    vessels[:, 9] = 2
    vgrid = encoder_grid(TINY, "vessels", "diff3d")
    assert 2 not in _nearest(vessels, vgrid)
    assert reduce_label(vessels, "vessels", vgrid, 99)[2].max() == pytest.approx(vgrid[1] / w)


@pytest.mark.parametrize("classes", [7, 11])
def test_prepare_labels_any_class_count(classes: int) -> None:
    d, h, w = TINY.model.image_shape
    _, layers, _ = make_phantom((d, h, w), 3, num_classes=classes)
    assert int(layers.max()) == classes - 1
    prepared = prepare_labels(layers, "layers", TINY, "phantom.nii.gz", classes)
    assert prepared.diff3d.shape == (classes, *encoder_grid(TINY, "layers", "diff3d"))
    _, h2, w2 = encoder_grid(TINY, "layers", "refiner")
    assert prepared.refiner.shape == (d, classes, h2, w2)
    np.testing.assert_allclose(prepared.diff3d.sum(0), 1.0, atol=1e-5)
    # a label of twice the size is reduced from its own resolution to the same fractions
    big = np.repeat(np.repeat(np.repeat(layers, 2, 0), 2, 1), 2, 2)
    np.testing.assert_allclose(
        prepare_labels(big, "layers", TINY, "big", classes).diff3d, prepared.diff3d, atol=1e-6
    )
    with pytest.raises(DataError, match=rf"phantom.nii.gz: .*0..{classes - 2}"):
        prepare_labels(layers, "layers", TINY, "phantom.nii.gz", classes - 1)


def test_check_and_read_name_the_file(tmp_path) -> None:
    url = str(tmp_path / "l.nii.gz")
    label = np.zeros((4, 6, 8), np.uint8)
    label[:, 3:] = 6
    write_volume(url, label, spacing_affine((0.5, 0.25, 2.0)))
    read = read_label_map(url, "layers")
    assert read.spacing == (0.5, 0.25, 2.0) and read.array.shape == (4, 6, 8)
    check_label(read.array, "layers", url, 7, image_shape=(4, 6, 8))
    for args, match in (
        ((7, (4, 6, 9)), "does not match the image"),
        ((6, None), "0..5"),
    ):
        with pytest.raises(DataError, match=match) as err:
            check_label(read.array, "layers", url, *args)
        assert url in str(err.value)
    with pytest.raises(DataError, match="D x W en-face"):
        check_label(read.array, "vessels", url, 7)
    flat = str(tmp_path / "v.nii.gz")
    write_volume(flat, np.zeros((4, 1, 8), np.uint8), spacing_affine((0.5, 1.0, 2.0)))
    assert read_label_map(flat, "vessels").spacing == (0.5, 2.0)


def test_augmentation_moves_latents_and_label_together(tmp_path) -> None:
    """Conditioned latent items are shifted along depth jointly: a latent row moved by s
    rows carries its label cells (2 per latent row) with it; flips mirror both."""
    import itertools

    from caldm.data.datasets import LatentDataset
    from caldm.data.latents import latent_url, write_latent_source, write_latents
    from caldm.data.phantom import write_phantom_dataset

    cfg = preset("tiny")
    cfg.data.augment.shift = 0.25  # up to a quarter of the latent rows
    cfg.data.augment.flip_w = True
    data = str(tmp_path / "data")
    write_phantom_dataset(data, 1, "tiny", seed=0, num_classes=7)
    cfg.model.condition.layer_classes = 7
    c, d1, h1, w1 = cfg.model.latent_shape
    # latents that encode their own row and column: z[., ., r, col] = r + 100 * col
    rows = np.arange(h1, dtype=np.float32)[:, None] + 100 * np.arange(w1)[None]
    z = np.broadcast_to(rows, (c, d1, h1, w1)).copy()
    z_sr = np.broadcast_to(rows, cfg.model.z_sr_shape).copy()
    root = str(tmp_path / "latents")
    write_latents(latent_url(root, "phantom_0000"), z, z_sr, z_sr)
    write_latent_source(root, data)
    plain = LatentDataset(root, cfg, "diff3d", "layers")
    base = plain._load("phantom_0000")["label"]
    seen = set()
    for item in itertools.islice(iter(plain), 12):
        got, label = item["z"].numpy(), item["label"].numpy()
        mid = h1 // 2
        flipped = got[0, 0, mid, 0] >= 100 * (w1 - 1)
        ref_z = z[..., ::-1] if flipped else z
        ref_label = base[..., ::-1] if flipped else base
        s = int(ref_z[0, 0, mid, 0] - got[0, 0, mid, 0])  # row mid now holds row mid - s
        seen.add((s, bool(flipped)))
        assert abs(s) <= round(0.25 * h1)
        idx = np.clip(np.arange(h1) - s, 0, h1 - 1)
        np.testing.assert_array_equal(got, ref_z[:, :, idx])
        idx2 = np.clip(np.arange(2 * h1) - 2 * s, 0, 2 * h1 - 1)
        np.testing.assert_array_equal(label, ref_label[:, :, idx2])
    assert len({s for s, _ in seen}) > 1 and len({f for _, f in seen}) == 2
    # unconditioned streams are never augmented
    item = next(iter(LatentDataset(root, cfg, "diff3d")))
    np.testing.assert_array_equal(item["z"].numpy(), z)


def test_train_plan_takes_the_class_count_from_data_and_bundle(tmp_path) -> None:
    """The README path with 11 classes: refiner --condition layers on a diff3d-layers bundle
    (was: "bundle was made for another model (layer_classes = 11, this run has 9)"); 7-class
    labels on that bundle fail with one line naming the labels."""
    import json

    from caldm.bundle import init_bundle
    from caldm.data.latents import latent_url, write_latent_source, write_latents
    from caldm.data.phantom import write_phantom_dataset
    from caldm.distributed.train import TrainRequest, plan

    cfg = preset("tiny")
    cfg.model.condition.layer_classes = 11
    bundle = str(tmp_path / "diff3d-layers")
    init_bundle("tiny", bundle, condition="layers", cfg=cfg)
    for classes in (11, 7):
        data, latents = str(tmp_path / f"data{classes}"), str(tmp_path / f"lat{classes}")
        ids = write_phantom_dataset(data, 1, "tiny", seed=0, num_classes=classes)
        z = np.zeros(cfg.model.latent_shape, np.float32)
        z_sr = np.zeros(cfg.model.z_sr_shape, np.float32)
        write_latents(latent_url(latents, ids[0]), z, z_sr, z_sr)
        write_latent_source(latents, data)
        stats = {k: {"mean": 0.0, "std": 1.0} for k in ("z", "z_sr", "z_hr")}
        (tmp_path / f"lat{classes}" / "stats.json").write_text(json.dumps(stats))
    req = dict(stage="refiner", out=str(tmp_path / "out"), preset="tiny", condition="layers")
    p = plan(TrainRequest(data=str(tmp_path / "lat11"), bundle=bundle, **req))
    assert p.num_classes == 11 and p.cfg.model.condition.layer_classes == 11
    with pytest.raises(DataError, match="labels have 7 layer classes.*conditioned on 11") as err:
        plan(TrainRequest(data=str(tmp_path / "lat7"), bundle=bundle, **req))
    assert str(tmp_path / "data7") in str(err.value)
    # an unconditional bundle takes the data's count (7), whatever the preset says (9)
    plain = str(tmp_path / "plain")
    init_bundle("tiny", plain)
    p = plan(TrainRequest(data=str(tmp_path / "lat7"), bundle=plain, **{**req, "stage": "diff3d"}))
    assert p.num_classes == 7


def test_shifted_views_carry_their_moved_label(tmp_path) -> None:
    """A cache view ``<id>~dy<r>`` is the volume moved down r image rows before encoding; its
    label is the volume's label moved by as much (at the label's own resolution), and a
    held-out volume's views are held out with it."""
    from caldm.data.datasets import LatentDataset
    from caldm.data.io import read_label
    from caldm.data.labels import encoder_grid, reduce_label, shift_depth
    from caldm.data.latents import (
        latent_url,
        parse_view,
        view_id,
        view_shifts,
        write_latent_source,
        write_latents,
    )
    from caldm.data.phantom import write_phantom_dataset
    from caldm.distributed.plan import training_dataset

    cfg = preset("tiny")
    rows = cfg.model.image_shape[1] // cfg.model.latent_shape[2]  # image rows per latent pixel
    assert rows >= 4 and view_shifts(cfg) == [0, rows // 4, rows // 2, 3 * rows // 4]  # quarters
    cfg.data.augment.views = 1
    assert view_shifts(cfg) == [0, rows // 2]
    cfg.data.augment.views = 0
    assert view_shifts(cfg) == [0]
    assert parse_view(view_id("a~b", 6)) == ("a~b", 6) and parse_view("a") == ("a", 0)

    data = str(tmp_path / "data")
    write_phantom_dataset(data, 2, "tiny", seed=0)
    root = str(tmp_path / "latents")
    zeros = {k: np.zeros(s, np.float32) for k, s in
             (("z", cfg.model.latent_shape), ("z_sr", cfg.model.z_sr_shape),
              ("z_hr", cfg.model.z_sr_shape))}  # fmt: skip
    for sample_id in ("phantom_0000", "phantom_0001"):
        for rows in (0, 4):
            write_latents(latent_url(root, view_id(sample_id, rows)), **zeros)
    write_latent_source(root, data)
    dataset = LatentDataset(root, cfg, "diff3d", "layers")
    label = read_label(f"{data}/labels/layers/phantom_0000.nii.gz", "layers")
    grid = encoder_grid(cfg, "layers", "diff3d")
    classes = cfg.model.condition.layer_classes
    got = dataset._load(view_id("phantom_0000", 4))["label"]
    np.testing.assert_array_equal(got, reduce_label(shift_depth(label, 4), "layers", grid, classes))
    assert not np.array_equal(got, dataset._load("phantom_0000")["label"])
    kept = training_dataset("diff3d", root, cfg, "layers", exclude_ids=("phantom_0001",))
    assert kept.ids == ["phantom_0000", "phantom_0000~dy4"]
