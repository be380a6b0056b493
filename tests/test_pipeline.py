"""Streaming CA-LDM sampling at the tiny preset, on random bundles (few denoising steps)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from caldm.bench.sampling import account_sampling, sampling_memory
from caldm.bundle import init_bundle
from caldm.cli import main
from caldm.config import preset
from caldm.data.io import read_volume, write_volume
from caldm.data.phantom import LAYER_NAMES, make_phantom, phantom_affine
from caldm.errors import CaldmError, DataError
from caldm.nn.factory import build
from caldm.nn.inferers import SliceDecoder
from caldm.nn.nets.dec_m import DecM
from caldm.pipeline import CALDMPipeline

REPO = Path(__file__).resolve().parents[1]
STEPS = 2
GIB = 2**30


# Tiny tensors: thread start-up dominates, and on a busy 2-core machine spinning worker threads
# make each op ~10x slower. One thread, here and in the subprocesses.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str | None, str]:
    root = tmp_path_factory.mktemp("bundles")
    cfg = preset("tiny")
    cfg.model.condition.layer_classes = len(LAYER_NAMES)  # as training sets it from the data
    out: dict[str | None, str] = {}
    for condition in (None, "layers", "vessels"):
        url = str(root / (condition or "plain"))
        init_bundle("tiny", url, condition=condition, seed=0, cfg=cfg)
        out[condition] = url
    return out


@pytest.fixture(scope="module")
def pipe(bundles: dict[str | None, str]) -> CALDMPipeline:
    return CALDMPipeline.from_bundle(bundles[None], device="cpu")


@pytest.fixture(scope="module")
def phantom() -> tuple[np.ndarray, np.ndarray]:
    _, layers, vessels = make_phantom(preset("tiny").model.image_shape, seed=3)
    return layers, vessels


def test_same_seed_same_volume_other_seed_differs(pipe: CALDMPipeline) -> None:
    a = pipe.sample(0, steps=STEPS)
    b = pipe.sample(0, steps=STEPS)
    c = pipe.sample(1, steps=STEPS)
    assert a.shape == preset("tiny").model.image_shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c).mean() > 1


def test_volume_does_not_depend_on_slice_batch(bundles: dict[str | None, str]) -> None:
    volumes = []
    for slice_batch, chunk in ((32, 8), (5, 3)):
        p = CALDMPipeline.from_bundle(bundles[None], device="cpu")
        p.cfg.sampling.slice_batch = slice_batch
        p.cfg.sampling.decode_chunk = chunk
        volumes.append(p.sample(7, steps=STEPS, decode="exact", output="float"))
    np.testing.assert_allclose(volumes[0], volumes[1], atol=1e-4)


def test_cli_writes_nifti_with_shape_and_affine(
    bundles: dict[str | None, str], tmp_path: Path
) -> None:
    out = tmp_path / "sample.nii.gz"
    cmd = [sys.executable, "-m", "caldm", "sample", "--bundle", bundles[None]]
    cmd += ["--out", str(out), "--seed", "3", "--steps", str(STEPS), "--sampler", "dpm++"]
    run = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    volume, affine = read_volume(str(out))
    shape = preset("tiny").model.image_shape
    assert volume.shape == shape and volume.dtype == np.uint8
    np.testing.assert_allclose(affine, phantom_affine(shape), rtol=1e-6)
    assert "wrote" in run.stdout


def test_cli_errors_are_one_line(
    bundles: dict[str | None, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "x.nii.gz")
    cases = [
        (["--bundle", str(tmp_path / "none"), "--out", out], "not a model bundle"),
        (["--bundle", bundles[None], "--out", str(tmp_path / "x.png")], "x.png"),
        (["--bundle", bundles[None], "--out", out, "--steps", "0"], "--steps"),
    ]
    for args, needle in cases:
        assert main(["sample", *args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], lines
    assert not Path(out).exists()


def test_exact_and_chunked_run_and_agree_without_adaptors() -> None:
    """Also with Dec2D's noise inputs acting: a slice's noise is keyed by its latent, not by
    the window or chunk it is decoded in."""
    cfg = preset("tiny")
    cfg.model.ae2d.noise = True
    torch.manual_seed(0)
    dec2d = build("dec2d", cfg)
    assert len(dec2d.noise) > 0
    for injection in dec2d.noise.values():
        torch.nn.init.normal_(injection.scale, std=0.5)
    adaptors = build("adaptors", cfg)
    for a in adaptors.adaptors.values():
        a.alpha.data.zero_()  # no adaptor influence: both modes reduce to Dec2D per slice
    decm = DecM(dec2d, adaptors).eval()
    d = 13
    z = torch.randn(d, *cfg.model.slice_latent_shape)
    outputs = {}
    for mode in ("exact", "chunked"):
        got: dict[int, torch.Tensor] = {}
        dec = SliceDecoder(decm, d, mode, cfg.model.k, 4, 2, got.__setitem__)
        with torch.inference_mode():
            for part in z.split(3):  # latents arrive in batches of another size
                dec.push(part)
            dec.close()
        outputs[mode] = torch.cat([got[s] for s in sorted(got)])
    assert outputs["exact"].shape == (d, 1, *cfg.model.image_shape[1:])
    torch.testing.assert_close(outputs["exact"], outputs["chunked"], atol=1e-5, rtol=1e-5)


def test_both_decode_modes_sample(bundles: dict[str | None, str]) -> None:
    pipe = CALDMPipeline.from_bundle(bundles[None], device="cpu")
    with torch.no_grad():  # fresh residual adaptors are the identity: make them act
        for a in pipe.modules["adaptors"].adaptors.values():
            torch.nn.init.normal_(a.conv.weight, std=0.05)
    exact = pipe.sample(0, steps=1, decode="exact", output="float")
    chunked = pipe.sample(0, steps=1, decode="chunked", output="float")
    assert exact.shape == chunked.shape and np.isfinite(exact).all()
    assert not np.array_equal(exact, chunked)  # with active adaptors the modes differ


def test_streaming_peak_is_flat_in_the_number_of_slices() -> None:
    """The refine-and-decode working set is the same for 32 and 128 slices."""
    peaks = {}
    for d in (32, 128):
        cfg = preset("tiny")
        cfg.model = cfg.model.model_copy(
            update={"image_shape": (d, 64, 64), "thumbnail_shape": (d // 2, 32, 32)}
        )
        cfg.sampling.slice_batch = 16
        peaks[d] = sampling_memory(cfg, "chunked")
    assert peaks[128]["z_sr"] == 4 * peaks[32]["z_sr"]  # the latents do grow
    assert abs(peaks[128]["slices"] - peaks[32]["slices"]) <= 0.01 * peaks[32]["slices"]


def test_paper_sampling_fits_in_8_gib() -> None:
    assert account_sampling(preset("paper")) <= 8 * GIB


def _wake(pipe: CALDMPipeline) -> None:
    """Randomise the diffusion UNets' zero-initialised layers (MONAI zero-inits each residual
    branch's last conv and the output conv), or a random bundle ignores its inputs."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in ("diff3d", "refiner"):
            for prm in pipe.modules[name].parameters():
                if prm.dim() > 1 and not prm.any():
                    prm.copy_(0.05 * torch.randn(prm.shape, generator=g))


@pytest.mark.parametrize("kind", ["layers", "vessels"])
def test_label_guided_sampling(
    kind: str, bundles: dict[str | None, str], phantom: tuple[np.ndarray, np.ndarray]
) -> None:
    layers, vessels = phantom
    label = layers if kind == "layers" else vessels
    p = CALDMPipeline.from_bundle(bundles[kind], device="cpu")
    assert p.condition == kind
    _wake(p)
    guided = p.sample(0, label, steps=STEPS, output="float")
    unguided = p.sample(0, steps=STEPS, output="float")
    assert guided.shape == preset("tiny").model.image_shape
    assert not np.allclose(guided, unguided)
    # a label of another size is resized to the preset's shape, as training data are
    big = np.repeat(label, 2, axis=0)
    assert p.sample(0, big, steps=1).shape == preset("tiny").model.image_shape


def test_label_of_wrong_kind_names_the_file(
    bundles: dict[str | None, str],
    phantom: tuple[np.ndarray, np.ndarray],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    layers, _ = phantom
    url = str(tmp_path / "layers.nii.gz")
    write_volume(url, layers)
    out = str(tmp_path / "out.nii.gz")
    args = ["sample", "--bundle", bundles["vessels"], "--out", out, "--labels", url]
    assert main([*args, "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and url in err and "vessels" in err, err
    assert not Path(out).exists()
    p = CALDMPipeline.from_bundle(bundles["layers"], device="cpu")
    with pytest.raises(DataError, match="0..8"):
        p.sample(0, layers + 20, steps=1)
    with pytest.raises(CaldmError, match="no condition encoders"):
        CALDMPipeline.from_bundle(bundles[None], device="cpu").sample(0, layers, steps=1)


def test_ablations_sample_bundles_without_refiner_or_adaptors(
    bundles: dict[str | None, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json
    import shutil

    stripped = tmp_path / "no_refiner_no_adaptors"
    shutil.copytree(bundles[None], stripped)
    meta = json.loads((stripped / "bundle.json").read_text())
    for name in ("refiner", "adaptors"):
        (stripped / f"{name}.safetensors").unlink()
        if "modules" in meta:
            meta["modules"].remove(name)
    (stripped / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(CaldmError, match="--ablation nhae_diff3d"):
        CALDMPipeline.from_bundle(str(stripped), device="cpu")

    base = CALDMPipeline.from_bundle(str(stripped), device="cpu", ablation="nhae_diff3d")
    assert "refiner" not in base.modules and base.halo == 0
    got = base.sample(2, steps=STEPS, output="float")
    # Table 1's first row by hand: Dec2D on every slice of f_sr(z)
    with torch.inference_mode():
        z_sr = base.sample_latents(2, None, "ddim", STEPS)
        want = base.modules["dec2d"](z_sr.movedim(1, 0))[:, 0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)

    full = CALDMPipeline.from_bundle(bundles[None], device="cpu")
    refined = CALDMPipeline.from_bundle(bundles[None], device="cpu", ablation="nhae_diff3d_refiner")
    for p in (full, refined):
        _wake(p)
        with torch.no_grad():  # adaptors that act (a fresh bundle's are the identity)
            for a in p.modules.get("adaptors", torch.nn.Module()).parameters():
                a.add_(0.3)
    assert "adaptors" not in refined.modules
    a = refined.sample(2, steps=STEPS, output="float")
    b = full.sample(2, steps=STEPS, output="float")
    assert np.abs(a - got).mean() > 1e-3  # the refiner changes the slices
    assert np.abs(a - b).mean() > 1e-3  # and the adaptors change them again

    out = tmp_path / "ablated.nii.gz"
    args = ["sample", "--bundle", str(stripped), "--out", str(out), "--steps", str(STEPS)]
    assert main([*args, "--ablation", "nhae_diff3d"]) == 0
    assert read_volume(str(out))[0].shape == preset("tiny").model.image_shape
    assert main([*args, "--ablation", "full"]) == 2
    assert "nhae_diff3d" in capsys.readouterr().err
