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
