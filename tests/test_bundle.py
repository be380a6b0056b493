"""The loaded bundle value (caldm.bundle.Bundle): config and meta read once, modules on demand."""

from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path

import pytest
import torch

from caldm.bundle import init_bundle, open_bundle
from caldm.config import preset
from caldm.errors import BundleError
from caldm.pipeline import CALDMPipeline


@pytest.fixture(scope="module")
def bundle_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = str(tmp_path_factory.mktemp("bundle") / "b")
    init_bundle("tiny", url, condition="layers", seed=0)
    return url


def _weights_read(reads: Counter[str]) -> set[str]:
    return {Path(p).name.removesuffix(".safetensors") for p in reads if p.endswith(".safetensors")}


def test_open_reads_config_and_meta_once_and_no_weights(bundle_url: str, file_reads) -> None:
    bundle = open_bundle(bundle_url)
    assert file_reads[f"{bundle_url}/config.yaml"] == 1
    assert file_reads[f"{bundle_url}/bundle.json"] == 1
    assert not _weights_read(file_reads) and not bundle.modules
    assert bundle.cfg == preset("tiny") and bundle.condition == "layers"
    assert open_bundle(bundle) is bundle  # an opened bundle is passed on as it is
    assert file_reads[f"{bundle_url}/config.yaml"] == 1


def test_bundle_loads_only_the_modules_asked_for_and_keeps_them(
    bundle_url: str, file_reads
) -> None:
    bundle = open_bundle(bundle_url)
    loaded = bundle.load(["enc2d", "dec2d"])
    assert set(loaded) == set(bundle.modules) == {"enc2d", "dec2d"}
    assert _weights_read(file_reads) == {"enc2d", "dec2d"}
    assert bundle.module("enc2d") is loaded["enc2d"] and bundle["dec2d"] is loaded["dec2d"]
    assert sum(n for p, n in file_reads.items() if p.endswith(".safetensors")) == 2
    assert not loaded["enc2d"].training
    # A pickled bundle (what a Ray actor receives) carries no weights: it loads its own.
    copy = pickle.loads(pickle.dumps(bundle))
    assert copy.modules == {} and bundle.modules and copy.cfg == bundle.cfg
    fresh = bundle.fresh("enc2d")
    assert fresh is not loaded["enc2d"]
    for a, b in zip(fresh.parameters(), loaded["enc2d"].parameters(), strict=True):
        assert torch.equal(a, b)


def test_bundle_names_what_it_lacks(bundle_url: str, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="bundle lacks nope needed for loading"):
        open_bundle(bundle_url).load(["enc2d", "nope"])
    with pytest.raises(BundleError, match="not a model bundle"):
        open_bundle(str(tmp_path))


def test_pipeline_from_an_opened_bundle_loads_only_what_its_ablation_samples_with(
    bundle_url: str, file_reads
) -> None:
    bundle = open_bundle(bundle_url)
    pipe = CALDMPipeline.from_bundle(bundle, device="cpu", ablation="nhae_diff3d")
    want = {"diff3d", "cond_diff3d", "f_sr", "dec2d"}
    assert set(pipe.modules) == want and _weights_read(file_reads) == want
    assert file_reads[f"{bundle_url}/config.yaml"] == 1  # from_bundle read no config again


def test_a_bundle_written_before_a_key_existed_loads_as_it_was_trained(
    bundle_url: str, tmp_path: Path
) -> None:
    """config.yaml is resolved: a key it lacks postdates it and takes the class default (the
    old behaviour), not today's preset value; weights that do not fit say which tensors."""
    import shutil

    import yaml

    old = tmp_path / "old"
    shutil.copytree(bundle_url, old)
    tree = yaml.safe_load((old / "config.yaml").read_text())
    assert tree["model"]["ae2d"]["noise"] is True and tree["model"]["adaptor"]["in_plane"] == 1
    # the bundle as a version before Dec2D's noise inputs and the in-plane key would write it
    del tree["model"]["ae2d"]["noise"], tree["model"]["adaptor"]["in_plane"]
    (old / "config.yaml").write_text(yaml.safe_dump(tree))
    with pytest.raises(BundleError, match=r"weights do not fit dec2d.*unexpected 1 \(noise"):
        open_bundle(str(old)).module("dec2d")  # today's weights have noise scales: refused
    bundle = open_bundle(str(old))
    assert bundle.cfg.model.ae2d.noise is False and bundle.cfg.model.adaptor.in_plane == 3
    # an old bundle's weights (no noise scales) load into the old architecture
    state = {k: v for k, v in open_bundle(bundle_url).module("dec2d").state_dict().items()
             if "noise" not in k}
    from safetensors.torch import save_file

    save_file(state, str(old / "dec2d.safetensors"))
    dec = open_bundle(str(old)).module("dec2d")
    assert not any("noise" in k for k in dec.state_dict())
