"""The main job's own pieces (the whole path runs in `make demo`, not in the suite)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from caldm.data.io import write_volume
from caldm.distributed.end_to_end import PATH, depth_profile, mean_depth_profile
from caldm.errors import DataError
from caldm.stages import STAGES

REPO = Path(__file__).resolve().parents[1]


def test_depth_profile_is_the_mean_per_depth_row() -> None:
    volume = np.zeros((4, 6, 5), np.uint8)
    volume[:, 2, :] = 255  # one bright row at depth 2
    profile = depth_profile(volume)
    assert profile.shape == (6,)
    assert profile[2] == pytest.approx(1.0) and profile[0] == pytest.approx(-1.0)


def test_mean_depth_profile_over_a_dataset(tmp_path: Path) -> None:
    for i, row in enumerate((10, 20)):
        v = np.zeros((2, 32, 4), np.uint8)
        v[:, row, :] = 255
        write_volume(str(tmp_path / "images" / f"v{i}.nii.gz"), v)
    p = mean_depth_profile(str(tmp_path))
    assert p.shape == (256,)
    peaks = np.sort(np.argsort(p)[-2:])
    assert abs(peaks[0] - 10 * 256 / 32) < 10 and abs(peaks[1] - 20 * 256 / 32) < 10
    with pytest.raises(DataError):
        mean_depth_profile(str(tmp_path / "nothing"))


def test_path_covers_every_stage_in_training_order() -> None:
    assert [s.stage for s in PATH if not s.condition] == list(STAGES)
    assert {s.stage for s in PATH if s.condition} == {"diff3d", "refiner"}


def test_pipeline_help_needs_no_cluster() -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "pipeline.py"), "--help"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and "--out" in out.stdout and "--data" in out.stdout


def test_pipeline_set_with_a_typo_names_the_key_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "job"
    run = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "pipeline.py"), "--out", str(out),
         "--set", "model.latent_chanels=8"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert "model.latent_chanels" in run.stderr and "model.latent_channels" in run.stderr
    assert not out.exists()


def test_pipeline_set_reaches_the_first_stage_after_the_jobs_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import caldm.distributed.train as train_module
    from caldm.distributed.end_to_end import run_pipeline

    seen = []

    class Stop(Exception):
        pass

    def fake_train(request):  # noqa: ANN001, ANN202
        seen.append(request)
        raise Stop

    monkeypatch.setattr(train_module, "train", fake_train)
    with pytest.raises(Stop):
        run_pipeline(str(tmp_path / "job"), count=2, overrides=("train.log_every=3",),
                     log=lambda _: None)
    (request,) = seen
    assert request.stage == "ae2d"
    assert request.overrides[-1] == "train.log_every=3"
    assert "train.log_every=10" in request.overrides  # the job's own, overridden by the user's


def test_pipeline_rerun_with_other_settings_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A main job resumes only with the preset, condition and --set values it ran with: its
    finished stages were trained with them."""
    import caldm.distributed.train as train_module
    from caldm.distributed.end_to_end import JOB_FILE, run_pipeline
    from caldm.errors import ConfigError

    class Stop(Exception):
        pass

    def fake_train(request):  # noqa: ANN001, ANN202
        raise Stop

    monkeypatch.setattr(train_module, "train", fake_train)
    out = str(tmp_path / "job")
    first = {"count": 2, "overrides": ("diffusion.prediction_type=epsilon",), "log": print}
    with pytest.raises(Stop):
        run_pipeline(out, **first)
    with pytest.raises(Stop):  # the same settings resume
        run_pipeline(out, **first)
    with pytest.raises(ConfigError, match=rf"{JOB_FILE}: .*overrides"):
        run_pipeline(out, **{**first, "overrides": ()})
    with pytest.raises(ConfigError, match=rf"{JOB_FILE}: .*condition 'layers'"):
        run_pipeline(out, **{**first, "condition": "vessels"})
    with pytest.raises(ConfigError, match="--steps-scale"):
        run_pipeline(str(tmp_path / "other"), overrides=("train.max_steps=5",))
    assert not (tmp_path / "other").exists()
