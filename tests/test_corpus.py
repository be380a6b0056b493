"""The sharded training corpus: what jobs/prepare_corpus.py writes is what the old path feeds
(up to uint8 / bf16 rounding), a killed job resumes, and training on it follows the old path's
loss curve on the phantom."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from caldm.config import preset
from caldm.data import corpus as C
from caldm.data.io import read_volume
from caldm.data.latents import latent_url, view_id, write_latent_source, write_latents
from caldm.data.layout import DatasetLayout
from caldm.data.phantom import write_phantom_dataset
from caldm.data.preprocess import resize, to_unit_range
from caldm.errors import ConfigError, DataError
from caldm.stages import stage_dataset

REPO = Path(__file__).resolve().parents[1]


def _prepare(*args: object) -> int:
    path = REPO / "jobs" / "prepare_corpus.py"
    spec = importlib.util.spec_from_file_location("prepare_corpus_job", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in args])


ALL = (*C.IMAGE_STAGES, *C.LATENT_STAGES)
LABELLED = ("diff3d+layers", "refiner+layers")
DRAWS = {"nhae": 8, "adaptor": 8}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Phantom volumes, random latents, and their corpus of all five stages (written by the
    job's per-volume function; the Ray Data job itself runs in test_job_writes_and_resumes)."""
    from caldm.distributed.corpus import volume_shards

    root = tmp_path_factory.mktemp("corpus")
    ids = write_phantom_dataset(str(root / "data"), count=3, preset="tiny", seed=0)
    cfg = preset("tiny")
    m = cfg.model
    rng = np.random.default_rng(0)
    for i in ids:
        write_latents(
            latent_url(str(root / "latents"), i),
            z=rng.standard_normal(m.latent_shape),
            z_sr=rng.standard_normal(m.z_sr_shape),
            z_hr=rng.standard_normal(m.z_sr_shape),
        )
    view = view_id(ids[1], 2)  # a shifted view: a row of its volume's labelled shards
    write_latents(
        latent_url(str(root / "latents"), view),
        z=rng.standard_normal(m.latent_shape),
        z_sr=rng.standard_normal(m.z_sr_shape),
        z_hr=rng.standard_normal(m.z_sr_shape),
    )
    write_latent_source(str(root / "latents"), str(root / "data"))
    stats = {k: {"mean": 0.0, "std": 2.0} for k in ("z", "z_sr", "z_hr")}
    (root / "latents" / "stats.json").write_text(json.dumps({"count": 3, **stats}))
    corpus = str(root / "corpus")
    for i in ids:
        written = volume_shards(i, str(root / "data"), corpus, ALL, cfg, str(root / "latents"),
                                DRAWS, 0)  # fmt: skip
        assert written == {"ae2d": 32, "nhae": 8, "adaptor": 8, "diff3d": 1, "refiner": 32}
        views = (view,) if i == ids[1] else ()
        written = volume_shards(i, str(root / "data"), corpus, C.LATENT_STAGES, cfg,
                                str(root / "latents"), DRAWS, 0, "layers", views)  # fmt: skip
        n = 1 + len(views)  # the volume and its view
        assert written == {"diff3d": n, "refiner": 32 * n}
    C.update_manifest(corpus, cfg, ALL, ids, DRAWS)
    C.update_manifest(corpus, cfg, LABELLED, ids, DRAWS)
    (root / "corpus" / "stats.json").write_text((root / "latents" / "stats.json").read_text())
    return root


def test_rows_are_the_old_items_quantised(root: Path) -> None:
    cfg = preset("tiny")
    (sample_id,) = [DatasetLayout(str(root / "data")).ids()[1]]
    volume, _ = read_volume(DatasetLayout(str(root / "data")).image_url(sample_id))
    volume = resize(to_unit_range(volume), cfg.model.image_shape, order="linear")
    import pyarrow.parquet as pq

    shard = pq.read_table(C.shard_url(str(root / "corpus"), "ae2d", sample_id)).to_pydict()
    assert shard["id"] == [sample_id] * volume.shape[0]
    images = np.stack([np.frombuffer(b, np.uint8) for b in shard["image"]])
    restored = images.reshape(volume.shape).astype(np.float32) / 127.5 - 1
    assert np.abs(restored - volume).max() <= 0.5 / 127.5 + 1e-6  # half a uint8 step

    from safetensors.numpy import load_file

    cached = load_file(latent_url(str(root / "latents"), sample_id))
    rows = pq.read_table(C.shard_url(str(root / "corpus"), "refiner", sample_id)).to_pydict()
    c, _, h, w = cached["z_sr"].shape
    slices = [torch.frombuffer(bytearray(b), dtype=torch.bfloat16).float().view(c, h, w)
              for b in rows["z_sr"]]  # fmt: skip
    z_sr = torch.stack(slices, dim=1).numpy()  # (c, D, H', W') again
    np.testing.assert_allclose(z_sr, cached["z_sr"], rtol=2**-8, atol=1e-6)


def test_items_match_the_old_datasets(root: Path) -> None:
    cfg = preset("tiny")
    for stage in (*C.IMAGE_STAGES, *C.LATENT_STAGES):
        source = root / ("latents" if stage in C.LATENT_STAGES else "data")
        old = next(iter(stage_dataset(stage, str(source), cfg)))
        new = next(iter(stage_dataset(stage, str(root / "corpus"), cfg)))
        assert {k: (v.shape, v.dtype) for k, v in new.items()} == {
            k: (v.shape, v.dtype) for k, v in old.items()
        }, stage
    # every row of every shard comes out once per epoch (shuffled, not dropped or repeated)
    ds = stage_dataset("refiner", str(root / "corpus"), cfg)
    depth = cfg.model.z_sr_shape[1]
    it = iter(ds)
    seen = [next(it)["z_hr"] for _ in range(3 * depth)]
    assert len({t.numpy().tobytes() for t in seen}) == 3 * depth


def test_rank_shards_and_held_out_ids(root: Path) -> None:
    cfg = preset("tiny")
    a = C.CorpusDataset(str(root / "corpus"), "diff3d", cfg, rank=0, world_size=2)
    b = C.CorpusDataset(str(root / "corpus"), "diff3d", cfg, rank=1, world_size=2)
    assert sorted(a.shard_ids(0) + b.shard_ids(0)) == a.ids and not set(a.shard_ids(0)) & set(
        b.shard_ids(0)
    )
    held = C.CorpusDataset(str(root / "corpus"), "diff3d", cfg)
    held.ids = held.ids[:1]
    it = iter(held)
    first = [next(it)["z"] for _ in range(3)]
    assert all(torch.equal(first[0], t) for t in first)  # only the kept volume


def test_wrong_shapes_missing_stage_and_condition_fail_clearly(root: Path, tmp_path) -> None:
    with pytest.raises(DataError, match=r"corpus\.json.*other shapes.*prepare_corpus"):
        stage_dataset("ae2d", str(root / "corpus"), preset("small"))
    with pytest.raises(ConfigError, match=r"no diff3d\+vessels items.*--condition vessels"):
        stage_dataset("diff3d", str(root / "corpus"), preset("tiny"), condition="vessels")
    rc = _prepare("--data", root / "data", "--out", tmp_path / "c", "--stages", "refiner")
    assert rc == 2  # diff3d/refiner need --latents; checked before Ray starts


def test_job_writes_and_resumes(root: Path, tmp_path: Path, ray_cluster) -> None:
    """The Ray Data job: the shards the per-volume function writes, a manifest, stats; a
    rerun after a kill writes only what is missing."""
    out = tmp_path / "corpus"
    args = ["--data", root / "data", "--out", out, "--latents", root / "latents",
            "--stages", "ae2d,refiner", "--ids", "phantom_0000,phantom_0002"]  # fmt: skip
    assert _prepare(*args) == 0
    for stage in ("ae2d", "refiner"):
        for i in ("phantom_0000", "phantom_0002"):
            new = (out / stage / f"{i}.parquet").read_bytes()
            assert new == (root / "corpus" / stage / f"{i}.parquet").read_bytes()
    manifest = json.loads((out / "corpus.json").read_text())
    assert manifest["stages"]["ae2d"]["ids"] == ["phantom_0000", "phantom_0002"]
    assert json.loads((out / "stats.json").read_text())["z"]["std"] == 2.0
    kept = out / "ae2d" / "phantom_0000.parquet"
    before = kept.stat().st_mtime_ns
    (out / "refiner" / "phantom_0002.parquet").unlink()  # as if killed before this volume
    assert _prepare(*args) == 0
    assert (out / "refiner" / "phantom_0002.parquet").exists()
    assert kept.stat().st_mtime_ns == before
    # labelled items for a conditioned fine-tune, beside the others
    assert _prepare(*args[:-4], "--stages", "diff3d", "--condition", "layers") == 0
    manifest = json.loads((out / "corpus.json").read_text())
    assert sorted(manifest["stages"]) == ["ae2d", "diff3d+layers", "refiner"]
    shard = out / "diff3d-layers" / "phantom_0001.parquet"
    assert shard.read_bytes() == (root / "corpus" / "diff3d-layers" / shard.name).read_bytes()


def _ae2d_curve(data: str, steps: int) -> list[float]:
    """ae2d losses of ``steps`` Adam steps on ``data`` (same init and noise every call)."""
    from caldm.nn.factory import build
    from caldm.nn.losses import HybridLoss
    from caldm.stages import STAGES, StepContext

    cfg = preset("tiny")
    torch.manual_seed(0)
    mods = {n: build(n, cfg) for n in ("enc2d", "dec2d")}
    params = [p for m in mods.values() for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)
    loss_cfg = cfg.model.loss.model_copy(update={"adv_start_step": 10**9})
    ctx = StepContext(cfg, hybrid=HybridLoss(loss_cfg), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(
        stage_dataset("ae2d", data, cfg, seed=0), batch_size=cfg.train.micro_batch
    )
    curve = []
    for _, batch in zip(range(steps), loader):
        loss = STAGES["ae2d"].step(mods, batch, ctx).losses["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(float(loss))
    return curve


def test_corpus_training_follows_the_old_loss_curve(root: Path) -> None:
    """Same seed, same steps: the corpus changes speed, not what is learnt. Windows of the two
    curves agree within noise, and both fall (so the check could fail)."""
    steps, window = 40, 10
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~0.1 s a step; more threads only contend on a busy machine
    try:
        old = np.array(_ae2d_curve(str(root / "data"), steps))
        new = np.array(_ae2d_curve(str(root / "corpus"), steps))
    finally:
        torch.set_num_threads(threads)
    print("ae2d loss, windows of", window, "steps: old", old.reshape(-1, window).mean(1),
          "corpus", new.reshape(-1, window).mean(1))  # fmt: skip
    for curve in (old, new):
        assert curve[-window:].mean() < 0.85 * curve[:window].mean()
    for lo in range(0, steps, window):
        a, b = old[lo : lo + window].mean(), new[lo : lo + window].mean()
        noise = 2 * (old[lo : lo + window].std() + new[lo : lo + window].std()) / np.sqrt(window)
        assert abs(a - b) <= max(noise, 0.1 * a), (lo, a, b)


def test_image_items_move_along_depth_on_read(root: Path) -> None:
    """data.augment.ae_shift reaches the corpus path: each image item is the stored one moved
    along depth (edges replicated) by at most the configured fraction, the nhae thumbnail and
    slices by the same fraction; with ae_shift 0 the items are the stored ones."""
    from caldm.data.labels import shift_depth

    moved_cfg, still_cfg = preset("tiny"), preset("tiny")
    still_cfg.data.augment.ae_shift = 0.0
    corpus = str(root / "corpus")
    for stage, key in (("ae2d", "image"), ("nhae", "slices"), ("adaptor", "window")):
        moved = iter(C.CorpusDataset(corpus, stage, moved_cfg, seed=3))
        still = iter(C.CorpusDataset(corpus, stage, still_cfg, seed=3))
        rows_seen = []
        for _ in range(12):
            a, b = next(moved), next(still)  # same shuffle order: the moves use their own rng
            axis = b[key].dim() - 2
            depth = b[key].shape[axis]
            most = round(moved_cfg.data.augment.ae_shift * depth)
            match = [r for r in range(-most - 1, most + 2)
                     if np.array_equal(shift_depth(b[key].numpy(), r, axis), a[key].numpy())]
            assert match, f"{stage}: not a depth move of the stored item"
            rows = min(match, key=abs)
            assert abs(rows) <= most + 1, stage
            if stage == "nhae":
                small = b["thumbnail"].shape[-2]
                coarse = round(rows * small / depth)
                want = shift_depth(b["thumbnail"].numpy(), coarse, b["thumbnail"].dim() - 2)
                assert np.array_equal(a["thumbnail"].numpy(), want)
            rows_seen.append(rows)
        assert any(rows_seen), f"{stage}: nothing moved"


def _epoch(ds, n: int) -> list[dict[str, torch.Tensor]]:
    it = iter(ds)
    return sorted((next(it) for _ in range(n)), key=lambda item: float(item["label"].sum()
                  + 1e3 * item[next(k for k in ("z", "z_hr") if k in item)].sum()))  # fmt: skip


@pytest.mark.parametrize("stage", C.LATENT_STAGES)
def test_labelled_items_are_the_latent_caches(root: Path, stage: str) -> None:
    """A conditioned fine-tune reads the same (latent, label) items from the corpus as from the
    latent cache and its dataset (views included), up to bf16 and 1/255 rounding."""
    cfg = preset("tiny")
    cfg.data.augment.shift = 0.0  # compare the stored items themselves
    old = iter(stage_dataset(stage, str(root / "latents"), cfg, condition="layers"))
    new = iter(stage_dataset(stage, str(root / "corpus"), cfg, condition="layers"))
    key = "z" if stage == "diff3d" else "z_hr"
    rows = [next(new) for _ in range(4 * (1 if stage == "diff3d" else cfg.model.z_sr_shape[1]))]
    assert len({r[key].numpy().tobytes() for r in rows}) == len(rows)  # 3 volumes + 1 view
    for _ in range(8):  # old items (the refiner's: random slices) are rows of the corpus
        a = next(old)
        b = min(rows, key=lambda r: float((r[key] - a[key]).abs().max()))
        assert a.keys() == b.keys() and "label" in a
        for k in a:
            assert a[k].shape == b[k].shape, k
            tol = 0.5 / 255 + 1e-6 if k == "label" else 0.01 * float(a[k].abs().max())
            assert float((a[k] - b[k]).abs().max()) <= tol, k


def test_labelled_items_move_with_their_latents(root: Path) -> None:
    """With depth shifts on, a corpus item's label moved exactly as its latent did."""
    from caldm.data.labels import shift_depth

    cfg = preset("tiny")
    cfg.data.augment.shift = 0.3
    plain = preset("tiny")
    plain.data.augment.shift = 0.0
    stored = _epoch(stage_dataset("diff3d", str(root / "corpus"), plain, condition="layers"), 4)
    moved = 0
    it = iter(stage_dataset("diff3d", str(root / "corpus"), cfg, condition="layers"))
    for _ in range(8):
        item = next(it)
        z, label = item["z"].numpy(), item["label"].numpy()
        found = False
        for ref in stored:
            for s in range(-z.shape[-2] + 1, z.shape[-2]):  # every shift the grid allows
                if np.array_equal(shift_depth(ref["z"].numpy(), s, axis=-2), z):
                    factor = label.shape[-2] // z.shape[-2]
                    want = shift_depth(ref["label"].numpy(), s * factor, axis=-2)
                    assert np.array_equal(want, label), s
                    found, moved = True, moved + (s != 0)
        assert found
    assert moved > 0  # the shifts happened
