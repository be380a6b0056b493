"""The test that fails if the condition is ignored: a label moved down by 10% of the depth
moves the synthetic retina with it (>= 80% of the distance) and the retina's boundaries stay
within 2 px of the moved label, at the tiny preset.

Cheapest honest setup: one module fixture trains, in-process with the stages' own step
functions and data streams (no Ray: the train loop is tested elsewhere), the tiny slice
autoencoder, Enc3D and f_sr on phantom volumes (with the autoencoders' depth moves,
``data.augment.ae_shift``), caches their latents with the shifted views the encode job writes,
and fine-tunes a layers-conditioned Diff3D on them through the stage dataset (so with the
joint latent + label augmentation). Diff3D decides
where the retina lies; the sampled volume is read as Dec2D(f_sr(z)), the nhae stage's own
reconstruction path (the refiner and DecM only sharpen slices and follow z_sr). The retina is
found in the image by :mod:`caldm.anatomy`, never from the condition.

It trains four networks, minutes of CPU, so it is its own pytest run: ``make
test-label-follow`` (which sets ``CALDM_LABEL_FOLLOW=1``), run by ``.ci/run`` after ``make
test``. Measured before the autoencoders' depth moves (views on): ratios 0.17 and 0.33, the
NHAE decoding a volume moved by 2, 4 and 6 rows as moved by 1, 1 and 2.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch

from caldm.anatomy import depth_shift, edge_mad, shift_label
from caldm.config import preset
from caldm.data.datasets import BScanDataset, LatentDataset, ThumbnailSliceDataset
from caldm.data.io import read_label, read_volume
from caldm.data.labels import prepare_labels, shift_depth
from caldm.data.latents import latent_url, view_id, view_shifts, write_latent_source, write_latents
from caldm.data.layout import DatasetLayout
from caldm.data.phantom import write_phantom_dataset
from caldm.data.preprocess import from_unit_range, to_unit_range
from caldm.diffusion.schedule import NoiseSchedule
from caldm.distributed.encode import encode_volume
from caldm.nn.factory import build
from caldm.nn.losses import HybridLoss
from caldm.pipeline import CALDMPipeline
from caldm.stages import STAGES, StepContext

# Step counts (env overrides for measuring longer budgets by hand)
AE_STEPS = int(os.environ.get("CALDM_FOLLOW_AE_STEPS", 250))
NHAE_STEPS = int(os.environ.get("CALDM_FOLLOW_NHAE_STEPS", 250))
DIFF_STEPS = int(os.environ.get("CALDM_FOLLOW_DIFF_STEPS", 600))
BELOW = 8  # the phantom's choroid: the class under the bright band

pytestmark = pytest.mark.skipif(
    not os.environ.get("CALDM_LABEL_FOLLOW"), reason="its own run: make test-label-follow"
)


def _fit(spec_name, mods, ctx, batches, steps, lr):
    spec = STAGES[spec_name]
    params = [p for n in spec.trainable(ctx.condition) for p in mods[n].parameters()]
    opt = torch.optim.Adam(params, lr)
    for step in range(steps):
        ctx.step = step
        out = spec.step(mods, next(batches), ctx)
        opt.zero_grad()
        out.losses["loss"].backward()
        opt.step()
    return out.losses["loss"].item()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    g = torch.Generator().manual_seed(0)
    cfg = preset("tiny")
    cfg.model.loss.adv_weight = 0.0
    # The texture-only column term is off too: with it, this cut-down autoencoder (no GAN, 250
    # steps) put the boundaries 2.25 px from the moved label (1.78 without; the RNG stream held
    # equal; both with the 8x slice latent before stop 25, 1.52 without since), while the main
    # job's bundle, trained with both terms, stays at 1.36 px (benchmarks/label_follow.py).
    # This test is about the condition.
    cfg.model.loss.column_weight = 0.0
    root = tmp_path_factory.mktemp("follow")
    data, heldout = str(root / "data"), str(root / "heldout")
    write_phantom_dataset(data, 6, "tiny", seed=0)
    write_phantom_dataset(heldout, 1, "tiny", seed=10_000)
    layout = DatasetLayout(data)
    vols = [to_unit_range(read_volume(layout.image_url(i))[0]) for i in layout.ids()]
    vols = [torch.from_numpy(np.ascontiguousarray(v)) for v in vols]
    ctx = StepContext(cfg, hybrid=HybridLoss(cfg.model.loss), generator=g)
    mods = {k: build(k, cfg) for k in ("enc2d", "dec2d", "enc3d", "f_sr")}

    def batches(dataset, size):  # the stages' own streams: their depth augmentation too
        stream = iter(dataset)
        while True:
            items = [next(stream) for _ in range(size)]
            yield {k: torch.stack([i[k] for i in items]) for k in items[0]}

    cfg.data.slices_per_volume = 4
    _fit("ae2d", mods, ctx, batches(BScanDataset(data, cfg), 16), AE_STEPS, 2e-3)
    _fit("nhae", mods, ctx, batches(ThumbnailSliceDataset(data, cfg), 2), NHAE_STEPS, 2e-3)
    latents = str(root / "latents")  # as jobs/encode_latents.py writes it: shifted views too
    for sample_id, vol in zip(layout.ids(), vols):
        for rows in view_shifts(cfg):
            moved = shift_depth(vol.numpy(), rows, axis=1)
            write_latents(latent_url(latents, view_id(sample_id, rows)),
                          **encode_volume(mods, moved, cfg))  # fmt: skip
    write_latent_source(latents, data)

    cfg.model.condition.layer_classes = 9
    stream = iter(LatentDataset(latents, cfg, "diff3d", "layers", seed=0))
    items = list(itertools.islice(stream, 96))  # 4 augmented draws of each view
    scale = 1.0 / float(torch.stack([i["z"] for i in items]).std())
    diff = {k: build(k, cfg, condition="layers") for k in ("diff3d", "cond_diff3d")}

    def latent_batches():
        while True:
            pick = torch.randint(0, len(items), (8,), generator=g)
            yield {k: torch.stack([items[i][k] for i in pick]) for k in ("z", "label")}

    dctx = StepContext(
        cfg,
        schedule=NoiseSchedule.from_config(cfg.diffusion),
        latent_scale=scale,
        condition="layers",
        generator=g,
    )
    _fit("diff3d", diff, dctx, latent_batches(), DIFF_STEPS, 1e-3)
    modules = {
        **mods,
        **diff,
        "refiner": build("refiner", cfg),  # unused: slices are read as Dec2D(z_sr)
        "adaptors": build("adaptors", cfg),
    }
    pipe = CALDMPipeline(
        cfg, modules, "layers", latent_scale={"diff3d": scale}, device="cpu", offload=False
    )
    held = DatasetLayout(heldout)
    label = read_label(held.label_url("layers", held.ids()[0]), "layers")
    return pipe, label


def _sample(pipe: CALDMPipeline, label: np.ndarray, seed: int) -> np.ndarray:
    labels = prepare_labels(label, "layers", pipe.cfg, "label")
    with torch.no_grad():
        z_sr = pipe.sample_latents(seed, labels, "ddim", 20)
        x = pipe.modules["dec2d"](z_sr.movedim(1, 0))[:, 0]
    return from_unit_range(x)


def test_moved_label_moves_the_retina(trained) -> None:
    pipe, label = trained
    rows = int(round(0.1 * label.shape[1]))
    moved = shift_label(label, rows)
    ratios, mads = [], []
    for seed in range(2):
        a, b = _sample(pipe, label, seed), _sample(pipe, moved, seed)
        ratios.append(depth_shift(a, b) / rows)
        mads.append(edge_mad(b, moved, BELOW))
    print(f"shift ratio {ratios}, boundary MAD to the moved label {mads} px")
    assert min(ratios) >= 0.8, ratios
    assert max(mads) <= 2.0, mads
