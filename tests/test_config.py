"""Presets, YAML round trips, overrides and the errors users see."""

import subprocess
import sys

import pytest

from caldm.config import load_config, preset, save_config, valid_keys
from caldm.errors import ConfigError


def test_paper_preset_matches_the_paper() -> None:
    cfg = preset("paper")
    m = cfg.model
    assert m.image_shape == (512, 512, 512)
    assert m.thumbnail_shape == (256, 256, 256)
    assert m.latent_shape == (4, 64, 64, 64)
    assert m.z_sr_shape == (4, 512, 64, 64)
    assert m.slice_latent_shape == (4, 64, 64)
    assert m.slice_factor == 8 and m.k == 5
    assert m.diff3d.channels == [128, 256, 512, 1024] and m.diff3d.num_res_blocks == 2
    assert m.diff3d.attention_levels == [False, False, True, True]  # 16^3 and 8^3
    assert m.refiner.channels == [192, 384, 768, 768]
    assert m.refiner.attention_levels == [False, True, True, True]  # 32, 16, 8
    assert cfg.diffusion.num_train_timesteps == 1000
    # the paper does not state its betas; the released code's (LDM's): chosen by measurement
    assert (cfg.diffusion.beta_start, cfg.diffusion.beta_end) == (0.0015, 0.0195)
    assert (cfg.diffusion.beta_schedule, cfg.diffusion.loss) == ("scaled_linear", "mse")
    assert cfg.sampling.steps == 200


@pytest.mark.parametrize("name,side", [("small", 128), ("tiny", 64)])
def test_smaller_presets_scale_down(name: str, side: int) -> None:
    m = preset(name).model
    assert m.image_shape[1] == side
    assert m.z_sr_shape[1] == m.image_shape[0]


def test_yaml_round_trip(tmp_path) -> None:
    cfg = load_config("tiny", overrides=["train.lr=0.003", "model.adaptor.levels=[0, 1]"])
    path = tmp_path / "c.yaml"
    save_config(cfg, str(path))
    again = load_config(None, path)
    assert again == cfg
    assert again.train.lr == 0.003 and again.model.adaptor.levels == [0, 1]


def test_unknown_key_names_it_and_suggests() -> None:
    with pytest.raises(ConfigError, match=r"'train.lrr'.*did you mean 'train.lr'"):
        load_config("tiny", overrides=["train.lrr=1"])
    with pytest.raises(ConfigError, match=r"train.checkpoint_evry.*train.checkpoint_every"):
        load_config("tiny", overrides=["train.checkpoint_evry=5"])


def test_unknown_key_in_file_names_file_and_key(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  micro_bach: 2\n")
    with pytest.raises(ConfigError) as exc:
        load_config("tiny", path)
    msg = str(exc.value)
    assert str(path) in msg and "train.micro_bach" in msg and "train.micro_batch" in msg


def test_bad_value_names_key() -> None:
    with pytest.raises(ConfigError, match="train.precision"):
        load_config("tiny", overrides=["train.precision=fp8"])
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config("huge")


def test_inconsistent_shapes_are_refused() -> None:
    with pytest.raises(ConfigError, match="f_sr"):
        load_config("tiny", overrides=["model.image_shape=[64, 64, 64]"])


def test_training_keys_exist() -> None:
    keys = set(valid_keys())
    for k in (
        "train.checkpoint_every",
        "train.micro_batch",
        "train.grad_accum",
        "train.precision",
        "train.activation_checkpointing",
    ):
        assert k in keys


def test_cli_reports_config_errors_in_one_line() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "caldm", "info", "--preset", "nope"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_adaptor_levels_must_exist_in_the_decoder() -> None:
    top = len(load_config("tiny").model.ae2d.channels) - 1
    assert load_config("tiny", overrides=[f"model.adaptor.levels=[0, {top}]"])
    with pytest.raises(ConfigError, match=rf"adaptor.levels \[{top + 1}\] do not exist"):
        load_config("tiny", overrides=[f"model.adaptor.levels=[0, {top + 1}]"])
