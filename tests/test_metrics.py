"""Metrics (Fréchet distance, plane samplers, TV), the FID Inception, previews, tracking and the
evaluation job (one Ray Data run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from caldm import metrics
from caldm.data.io import write_volume
from caldm.data.phantom import make_phantom
from caldm.distributed import tracking
from caldm.distributed.evaluation import _read_batch
from caldm.errors import DataError
from caldm.metrics import volume_planes
from caldm.nn.nets.inception import FEATURE_DIM, build_fid_inception
from caldm.preview import volume_preview

REPO = Path(__file__).resolve().parents[1]
SHAPE = (32, 64, 64)


def _noise(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# --- Fréchet distance -------------------------------------------------------------------------


def test_frechet_distance_closed_form_diagonal() -> None:
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    s1, s2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    got = metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-9)
    # Rotating both Gaussians together changes nothing.
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    rotated = metrics.frechet_distance(
        q @ mu1, q @ np.diag(s1) @ q.T, q @ mu2, q @ np.diag(s2) @ q.T
    )
    assert rotated == pytest.approx(expected, rel=1e-8)
    assert metrics.frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(
        0, abs=1e-9
    )


def test_frechet_distance_matches_sqrtm_and_samples_on_singular_covariances() -> None:
    from scipy import linalg

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(10, 40)), 1.5 * rng.normal(size=(12, 40)) + 0.3  # rank < dim
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    assert np.isfinite(covmean).all()
    ref = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean.real)
    assert metrics.frechet_distance(x.mean(0), s1, y.mean(0), s2) == pytest.approx(ref, rel=1e-6)
    assert metrics.frechet_distance_of_samples(x, y) == pytest.approx(ref, rel=1e-6)
    assert metrics.frechet_distance_of_samples(x, x) == pytest.approx(0, abs=1e-9)


def test_feature_stats_match_numpy() -> None:
    x = np.random.default_rng(2).normal(size=(50, 8))
    stats = metrics.FeatureStats(8)
    for chunk in np.array_split(x, 4):
        stats.update(chunk)
    assert stats.n == 50
    np.testing.assert_allclose(stats.mean, x.mean(0), atol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False), atol=1e-10)
    # Few vectors: the exact sample path; many (here > dim): mean and covariance only.
    y = np.random.default_rng(3).normal(size=(5, 8)) + 1
    few = metrics.FeatureStats(8)
    few.update(y)
    assert few.frechet_distance(stats) == pytest.approx(
        metrics.frechet_distance(y.mean(0), np.cov(y, rowvar=False), x.mean(0), stats.cov)
    )
    merged = metrics.FeatureStats(8)
    merged.merge(stats)
    merged.merge(few)
    assert merged.n == 55 and merged.frechet_distance(merged) == pytest.approx(0, abs=1e-9)


# --- planes, TV -------------------------------------------------------------------------------


def test_plane_samplers_are_even_and_oriented() -> None:
    assert metrics.plane_indices(512, 4).tolist() == [64, 192, 320, 448]
    assert metrics.plane_indices(5, 16).tolist() == [0, 1, 2, 3, 4]
    vol = np.arange(6 * 7 * 8).reshape(6, 7, 8)
    intra, inter = metrics.intra_planes(vol, 3), metrics.inter_planes(vol, 2)
    assert intra.shape == (3, 7, 8) and inter.shape == (2, 6, 7)
    np.testing.assert_array_equal(intra[0], vol[1])  # B-scan d = 1 (of 0, 2, 4 -> 1, 3, 5)
    np.testing.assert_array_equal(inter[1], vol[:, :, 6])  # across slices at w = 6
    assert metrics.resize_planes(intra, 299).shape == (3, 299, 299)


def test_total_variation_definition_and_ordering() -> None:
    step = np.zeros((70, 10, 12), np.uint8)  # 70 slices: crosses a TV slab boundary
    step[:, 5:, :] = 255  # one unit jump per A-scan along H
    assert metrics.total_variation(step) == pytest.approx(1 / 10)
    ramp = np.broadcast_to(np.linspace(0, 1, 70, dtype=np.float32)[:, None, None], (70, 4, 4))
    assert metrics.total_variation(ramp) == pytest.approx(
        1 / 70, rel=1e-5
    )  # one unit rise per A-line
    phantom = metrics.total_variation(make_phantom(SHAPE, 0)[0])
    noise = metrics.total_variation(_noise(SHAPE, 0))
    assert 0.05 < phantom < 0.5 and noise == pytest.approx(1.0, abs=0.03)
    # Float volumes use their own range (the pipeline writes [-1, 1]); uint8 the dtype's.
    as_float = make_phantom(SHAPE, 0)[0].astype(np.float32) / 127.5 - 1
    assert metrics.total_variation(as_float) == pytest.approx(
        phantom * 255 / np.ptp(as_float * 127.5)
    )
    assert metrics.mean_std([1.0, 3.0]) == {"mean": 2.0, "std": 1.0}


def _with_strips(volume: np.ndarray, period: int, amplitude: int) -> np.ndarray:
    """Brighten every ``period``-th slice (period 2: alternating bright/dark slices)."""
    out = volume.astype(np.int16)
    out[::period] += amplitude
    return np.clip(out, 0, 255).astype(np.uint8)


def test_slice_consistency_ranks_strips_below_smooth() -> None:
    smooth = make_phantom(SHAPE, 0)[0]
    alternating = _with_strips(smooth, 2, 40)
    chunk_strip = _with_strips(smooth, 8, 20)  # a step every decode chunk of 8
    hf = metrics.SliceProfileHF(axis=0)
    ratio = metrics.InterSliceRatio()
    assert hf(alternating) > 12 * hf(smooth)
    assert hf(chunk_strip) > 4 * hf(smooth)
    assert ratio(alternating) > 2 * ratio(smooth)
    assert ratio(chunk_strip) > 1.05 * ratio(smooth)
    # Along W the strips along D do not show, and the measure is independent of the axis name.
    assert metrics.SliceProfileHF(axis=2)(alternating) == pytest.approx(
        metrics.SliceProfileHF(axis=2)(smooth), rel=0.2
    )
    assert metrics.SliceProfileHF(axis=2)(alternating.transpose(2, 1, 0)) == pytest.approx(
        hf(alternating)
    )
    # Per-slice means that drift smoothly (a ramp) are not strips.
    ramp = np.broadcast_to(np.linspace(0, 255, 32)[:, None, None], SHAPE).astype(np.uint8)
    assert hf(ramp) < 0.02 * hf(alternating)  # uint8 rounding only
    report = metrics.ratio_report([1.0, 1.0], [3.0, 5.0])
    assert report["ratio"] == pytest.approx(4.0)
    parts = metrics.slice_consistency(chunk_strip)
    assert set(parts) == set(metrics.SLICE_CONSISTENCY)


def test_column_persistence_tells_a_shared_column_texture_from_fresh_speckle() -> None:
    base = make_phantom(SHAPE, 0)[0].astype(np.float64)  # its speckle is fresh in every slice
    rng = np.random.default_rng(0)
    persistence = metrics.ColumnPersistence()
    assert abs(persistence(base)) < 0.1
    assert abs(persistence(base + rng.normal(0, 20, base.shape))) < 0.1
    # streaks of 1-column grain, the same in every slice (a decoder painting them from alike
    # latents): the stronger against the speckle, the higher
    streaks = rng.normal(0, 1, (1, 1, SHAPE[2]))
    weak, strong = persistence(base + 4 * streaks), persistence(base + 8 * streaks)
    assert 0.2 < weak < strong
    assert strong > 0.5


# --- FID with the default extractor -----------------------------------------------------------


def _stats(
    model: torch.nn.Module, volumes: list[np.ndarray], k: int
) -> dict[str, metrics.FeatureStats]:
    out = {kind: metrics.FeatureStats(FEATURE_DIM) for kind in metrics.PLANE_KINDS}
    for volume in volumes:
        planes = volume_planes(volume, k)
        for kind in metrics.PLANE_KINDS:
            with torch.inference_mode():
                out[kind].update(model.features(torch.from_numpy(planes[kind])[:, None]).numpy())
    return out


def test_fid_self_zero_and_noise_worse_than_like_data() -> None:
    model, name = build_fid_inception(None)
    assert "not comparable" in name
    like_a = _stats(model, [make_phantom(SHAPE, s)[0] for s in (0, 1)], k=2)
    like_b = _stats(model, [make_phantom(SHAPE, s)[0] for s in (10, 11)], k=2)
    noise = _stats(model, [_noise(SHAPE, s) for s in (0, 1)], k=2)
    for kind in metrics.PLANE_KINDS:
        self_fid = like_a[kind].frechet_distance(like_a[kind])
        like_fid = like_a[kind].frechet_distance(like_b[kind])
        noise_fid = like_a[kind].frechet_distance(noise[kind])
        print(f"{kind}: self {self_fid:.2e} like {like_fid:.4f} noise {noise_fid:.4f}")
        assert self_fid < 1e-6
        assert noise_fid > 5 * like_fid > 0


# --- Inception --------------------------------------------------------------------------------


def test_inception_architecture_and_strict_reload(tmp_path: Path) -> None:
    model, _ = build_fid_inception(None)
    n_params = sum(p.numel() for p in model.parameters())
    # torchvision's inception_v3 without AuxLogits has 23,834,568 parameters with a 1000-way fc;
    # the FID graph's 1008-way fc adds 8 * 2049.
    assert n_params == 23_850_960
    assert n_params - model.fc.weight.numel() - model.fc.bias.numel() == 21_785_568
    x = torch.rand(2, 1, 48, 40)
    with torch.inference_mode():
        feats = model.features(x)
    assert feats.shape == (2, FEATURE_DIM) and torch.isfinite(feats).all() and feats.std() > 0.01

    # A state dict saved from the network (as the published .pth is) reloads strictly.
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "pt_inception.pth")
    loaded, name = build_fid_inception(str(tmp_path / "pt_inception.pth"))
    assert "pt_inception.pth (sha256 " in name and "published" not in name
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, state[k])
    from safetensors.torch import save_file

    save_file(state, tmp_path / "w.safetensors")
    again, _ = build_fid_inception(str(tmp_path / "w.safetensors"))
    torch.testing.assert_close(
        again.Mixed_7c.branch_pool.conv.weight, state["Mixed_7c.branch_pool.conv.weight"]
    )

    torch.save({"fc.bias": state["fc.bias"]}, tmp_path / "partial.pth")
    with pytest.raises(DataError, match="partial.pth.*Missing key"):
        build_fid_inception(str(tmp_path / "partial.pth"))
    with pytest.raises(DataError, match="missing.pth"):
        build_fid_inception(str(tmp_path / "missing.pth"))


# --- preview, tracking ------------------------------------------------------------------------


def test_volume_preview_rows_and_columns() -> None:
    img = volume_preview([make_phantom(SHAPE, 0)[0], _noise((8, 20, 30), 1)], ["a", "b"], tile=64)
    assert img.mode == "RGB" and img.size[0] > 3 * 64 and img.size[1] > 2 * 64
    with pytest.raises(ValueError):
        volume_preview([np.zeros((4, 4))])


def test_tracking_uri_and_params(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tracking.tracking_uri(str(tmp_path / "out")) == f"sqlite:///{tmp_path}/out/mlflow.db"
    assert tracking.tracking_uri("s3://bucket/run") == f"sqlite:///{tmp_path}/home/.caldm/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking.tracking_uri("/anywhere") == "http://mlflow:5000"
    flat = tracking.flatten_params({"model": {"lr": 1e-4}, "long": "x" * 9000})
    assert flat == {"model.lr": "0.0001", "long": "x" * tracking.MAX_PARAM_VALUE}


# --- jobs/evaluate.py -------------------------------------------------------------------------


def _evaluate_main():
    sys.path.insert(0, str(REPO / "jobs"))
    try:
        import evaluate
    finally:
        sys.path.remove(str(REPO / "jobs"))
    return evaluate.main


def test_evaluate_help_without_ray() -> None:
    code = (
        "import runpy, sys; sys.argv = ['evaluate.py', '--help']\n"
        "try: runpy.run_path('jobs/evaluate.py', run_name='__main__')\n"
        "except SystemExit as e: assert e.code == 0\n"
        "assert 'ray' not in sys.modules and 'torch' not in sys.modules"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "--inception-weights" in proc.stdout


def test_evaluate_bad_input_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main = _evaluate_main()
    real = tmp_path / "real"
    write_volume(f"{real}/images/a.nii.gz", make_phantom((8, 16, 16), 0)[0])
    missing = tmp_path / "nope"
    assert (
        main(["--real", str(real), "--synthetic", str(missing), "--out", f"{tmp_path}/r.json"]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0]
    args = ["--real", str(real), "--synthetic", str(real), "--out", f"{tmp_path}/r.json"]
    assert main([*args, "--inception-weights", f"{tmp_path}/w.pth"]) == 2
    assert f"{tmp_path}/w.pth" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()

    # An unreadable volume becomes an error row naming the file (the driver stops on it).
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes((real / "images" / "a.nii.gz").read_bytes()[:200])
    batch = {"set": np.array(["synthetic"]), "id": np.array(["bad"]), "url": np.array([str(bad)])}
    rows = _read_batch(batch, max_slices=4)
    assert len(rows["error"]) == 1 and str(bad) in rows["error"][0]


def test_evaluate_job_end_to_end(
    tmp_path: Path, ray_cluster: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    real, synthetic = tmp_path / "real", tmp_path / "synthetic"
    for i in range(2):
        image, layers, _ = make_phantom(SHAPE, i)
        write_volume(f"{real}/images/r{i}.nii.gz", image)
        write_volume(f"{real}/labels/layers/r{i}.nii.gz", layers)
        write_volume(f"{synthetic}/images/s{i}.nii.gz", _noise((24, 48, 40), i))  # other shape
        # noise "guided" by a label of its own shape: label fidelity runs on other shapes too
        write_volume(f"{synthetic}/labels/layers/s{i}.nii.gz", layers[:24, :48, :40])
    out = tmp_path / "eval" / "report.json"
    argv = [
        "--real",
        str(real),
        "--synthetic",
        str(synthetic),
        "--out",
        str(out),
        "--max-slices-per-volume",
        "2",
        "--batch-size",
        "4",
        "--num-gpus",
        "0",
        "--train-real",  # label fidelity with a (barely) trained segmenter
        str(real),
        "--segmenter-steps",
        "2",
    ]
    assert _evaluate_main()(argv) == 0

    report = json.loads(out.read_text())
    assert set(report) == {
        "intra_fid",
        "inter_fid",
        "tv",
        "slice_consistency",
        "feature_extractor",
        "n_real",
        "n_synthetic",
        "slices",
        "label_fidelity",
    }
    fidelity = report["label_fidelity"]
    assert fidelity["task"] == "layers" and fidelity["num_classes"] == 9
    assert fidelity["real"]["n"] == fidelity["synthetic"]["n"] == 2
    assert set(fidelity["ratio"]) == {"dice", "mad"}
    assert set(report["tv"]) == {"real", "synthetic"}
    assert all(set(v) == {"mean", "std"} for v in report["tv"].values())
    assert report["n_real"] == report["n_synthetic"] == 2
    assert report["slices"]["real"] == report["slices"]["synthetic"] == {"intra": 4, "inter": 4}
    assert report["intra_fid"] > 0.1 and report["inter_fid"] > 0.1
    assert report["tv"]["synthetic"]["mean"] > 2 * report["tv"]["real"]["mean"]
    assert "not comparable" in report["feature_extractor"]
    consistency = report["slice_consistency"]
    assert set(consistency) == set(metrics.SLICE_CONSISTENCY)
    # per volume as the metric computes it, and the ratio of the set means
    expect = [metrics.slice_consistency(make_phantom(SHAPE, i)[0]) for i in range(2)]
    for name, part in consistency.items():
        assert part["real"]["mean"] == pytest.approx(np.mean([e[name] for e in expect]))
        assert part["ratio"] == pytest.approx(part["synthetic"]["mean"] / part["real"]["mean"])
    with Image.open(out.with_suffix(".png")) as png:
        assert png.size[1] > 4 * 100  # 2 real + 2 synthetic rows

    import mlflow

    # a client of its own: mlflow.set_tracking_uri would export the URI to os.environ and
    # send every later job of this test session into this database
    client = mlflow.MlflowClient(f"sqlite:///{out.parent}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("evaluate").experiment_id])
    assert run.data.metrics["intra_fid"] == pytest.approx(report["intra_fid"])
    assert run.data.metrics["tv.synthetic.mean"] == pytest.approx(
        report["tv"]["synthetic"]["mean"]
    )
    assert run.data.metrics["slice_consistency.profile_hf_d.ratio"] == pytest.approx(
        consistency["profile_hf_d"]["ratio"]
    )
    artifacts = client.list_artifacts(run.info.run_id)
    assert [a.path for a in artifacts] == ["label_overlay.png", "preview.png"]
    assert run.data.metrics["label_fidelity.synthetic.dice.mean"] == pytest.approx(
        fidelity["synthetic"]["dice"]["mean"]
    )
    with Image.open(out.parent / "label_overlay.png") as png:
        assert png.size[1] > 4 * 100  # 2 real + 2 synthetic rows


def test_start_run_leaves_no_tracking_uri_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow exports the URI to os.environ; a later job (and the Ray workers it forwards
    MLFLOW_* to) must still choose its own store."""
    import os

    from caldm.distributed import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with tracking.start_run(str(tmp_path / "a"), "exp", "run"):
        assert os.environ["MLFLOW_TRACKING_URI"].endswith("a/mlflow.db")
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert "MLFLOW_EXPERIMENT_ID" not in os.environ
    assert tracking.tracking_uri(str(tmp_path / "b")).endswith("b/mlflow.db")


# --- label fidelity metrics (Table 2) ---------------------------------------------------------


def _layered_bscan(tops: list[int], h: int = 40, w: int = 12) -> np.ndarray:
    """An H x W layer map whose class c starts at row tops[c-1] (background 0 above and below
    the last class, which ends 5 rows after its top)."""
    lab = np.zeros((h, w), np.uint8)
    for c, top in enumerate(tops, 1):
        lab[top:] = c
    lab[tops[-1] + 5 :] = 0
    return lab


def test_boundary_mad_hand_checked() -> None:
    ref = _layered_bscan([5, 10, 16, 22])  # 5 classes, 4 boundaries
    shifted = np.roll(ref, 3, axis=0)  # the whole retina 3 px deeper: every boundary moves 3
    assert metrics.BoundaryMAD(5)(shifted, ref) == pytest.approx(3.0)
    one = _layered_bscan([5, 13, 16, 22])  # only boundary 2 moved by 3 px: 3 / 4 boundaries
    assert metrics.BoundaryMAD(5)(one, ref) == pytest.approx(0.75)
    # A prediction without the last class: its boundary sits at the A-scan length (40).
    missing = ref.copy()
    missing[missing == 4] = 0
    assert metrics.BoundaryMAD(5)(missing, ref) == pytest.approx((40 - 22) / 4)
    # Volumes (D x H x W) use the same depth axis; the mean over pairs is their mean.
    mad = metrics.BoundaryMAD(5)
    mad(np.stack([shifted, ref]), np.stack([ref, ref]))
    mad(ref, ref)
    assert mad.aggregate() == pytest.approx((1.5 + 0.0) / 2)
    # A layer that thins out to nothing puts its boundary on the next one.
    thin = _layered_bscan([5, 10, 10, 22])
    assert metrics.layer_boundaries(thin, 5)[:, 0].tolist() == [5, 10, 10, 22]


def test_mean_dice_and_iou_hand_checked() -> None:
    ref = np.zeros((8, 8), np.uint8)
    ref[0:4, 0:4] = 1  # 16 px
    ref[4:8, 4:8] = 2  # 16 px
    pred = np.zeros_like(ref)
    pred[0:4, 2:6] = 1  # overlaps class 1 on 8 px: Dice 2*8/32 = 0.5, IoU 8/24
    pred[4:8, 4:8] = 2  # exact: Dice 1, IoU 1
    dice = metrics.MeanDice(3)
    assert dice(pred, ref) == pytest.approx(0.75)
    assert dice(ref, ref) == pytest.approx(1.0)
    assert dice.aggregate() == pytest.approx(0.875)
    # A class absent from the reference is skipped (not counted as 0 or 1).
    assert metrics.MeanDice(4)(pred, ref) == pytest.approx(0.75)
    iou = metrics.ArteryVeinIoU()
    assert iou(pred, ref) == pytest.approx({"iou_a": 8 / 24, "iou_v": 1.0})
    no_veins = ref.copy()
    no_veins[no_veins == 2] = 0
    # A vein predicted where the reference has none is an error: IoU-V 0.
    assert iou(pred, no_veins)["iou_v"] == 0.0
    with pytest.raises(ValueError, match="class 3"):
        metrics.MeanDice(3)(pred + 1, ref)


def test_vessel_contrast() -> None:
    rng = np.random.default_rng(0)
    volume = rng.normal(100, 5, (16, 8, 16))
    vessels = np.zeros((16, 16), np.uint8)
    vessels[:, 4:6] = 1
    assert abs(metrics.vessel_contrast(volume, vessels)) < 1.0  # no shadow: about 0
    shaded = volume.copy()
    shaded[:, 3:, 4:6] *= 0.5  # shadows below the vessel
    assert metrics.vessel_contrast(shaded, vessels) > 5.0
    assert np.isnan(metrics.vessel_contrast(volume, np.zeros((16, 16), np.uint8)))


class _PooledFeatures(torch.nn.Module):
    """A cheap stand-in for the Inception: 2048 pooled pixels (the extractor is tested above)."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, (32, 64)).flatten(1)


def test_evaluate_volumes_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    from caldm.metrics import evaluate_volumes
    from caldm.nn.nets import inception

    monkeypatch.setattr(inception, "build_fid_inception", lambda w: (_PooledFeatures(), "pooled"))

    real = [make_phantom(SHAPE, i)[0] for i in range(2)]
    same = evaluate_volumes(real, [v.copy() for v in real], max_slices_per_volume=2)
    assert same["intra_fid"] == pytest.approx(0, abs=1e-6) and same["inter_fid"] < 1e-6
    assert same["tv"]["ratio"] == pytest.approx(1.0)
    assert all(v["ratio"] == pytest.approx(1.0) for v in same["slice_consistency"].values())
    noisy = evaluate_volumes(real, [_noise(SHAPE, i) for i in range(2)], max_slices_per_volume=2)
    assert noisy["tv"]["ratio"] > 2 and noisy["intra_fid"] > 0.1
