"""Hand-checkable specs of the stage steps (caldm/stages.py): what goes where.

Each test runs a real step function with stand-in modules whose outputs are known, so a wrong
gather, a swapped channel or a misaligned label shows up as a wrong value, not only a shape.
"""

from __future__ import annotations

import torch
from torch import nn

from caldm.config import preset
from caldm.nn.factory import NHAE_MODULES
from caldm.stages import STAGES, StepContext, _guide, nhae_step


class _Recorder(nn.Module):
    """Returns ``fn(x)`` and remembers its input."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn
        self.seen: list[torch.Tensor] = []
        self.anchor = nn.Parameter(torch.zeros(()))  # a parameter, so .parameters() is not empty

    def forward(self, x: torch.Tensor, *rest) -> torch.Tensor:
        self.seen.append(x)
        return self.fn(x, *rest)


class _PlainLoss:
    """A stand-in for HybridLoss: L1 only, no adversarial term."""

    def adversarial_active(self, step: int) -> bool:
        return False

    def __call__(self, x, x_rec, fake_logits=None, mu=None, log_var=None):
        loss = (x - x_rec).abs().mean()
        return {"l1": loss, "loss": loss}


def test_nhae_step_decodes_the_z_sr_slices_named_by_index() -> None:
    """Slice j of item b is decoded from z_sr[b, :, index[b, j]] and compared with slices[b, j]."""
    cfg = preset("tiny")
    c, depth, hl, wl = cfg.model.z_sr_shape
    b, s = 3, 2
    index = torch.tensor([[0, depth - 1], [5, 5], [depth // 2, 1]])
    # f_sr's output carries (item, slice) in its values: item * 1000 + slice
    marks = torch.arange(b)[:, None] * 1000 + torch.arange(depth)[None, :]
    z_sr = marks[:, None, :, None, None].float().expand(b, c, depth, hl, wl).contiguous()
    mods = {
        "enc3d": _Recorder(lambda x: (torch.zeros(b, 1), torch.zeros(b, 1))),
        "f_sr": _Recorder(lambda z: z_sr),
        "enc2d": _Recorder(lambda x: (torch.zeros(x.shape[0], c, hl, wl), None)),
        "dec2d": _Recorder(lambda z: z[:, :1].mean((2, 3), keepdim=True).expand(-1, 1, 4, 4)),
    }
    h, w = 4, 4
    slices = torch.randn(b, s, 1, h, w)
    batch = {"thumbnail": torch.zeros(b, 1, 2, 2, 2), "slices": slices, "index": index}
    out = nhae_step(mods, batch, StepContext(cfg, hybrid=_PlainLoss()))
    decoded_marks = mods["dec2d"].seen[0][:, 0, 0, 0]  # (B*S,) the marks of the gathered slices
    want = (torch.arange(b)[:, None] * 1000 + index).flatten().float()
    torch.testing.assert_close(decoded_marks, want)
    # the reconstruction is compared with the real slices in the same (item, slice) order
    torch.testing.assert_close(out.real, slices.flatten(0, 1))
    assert out.fake.shape == out.real.shape


def _conditioned_ctx(dropout: float, seed: int = 0) -> StepContext:
    cfg = preset("tiny")
    cfg.model.condition.dropout = dropout
    return StepContext(cfg, condition="layers", generator=torch.Generator().manual_seed(seed))


def test_guide_puts_extra_channels_first_then_condition_features() -> None:
    """The refiner's input is [x_t, z_sr (scaled), condition features]: extra first."""
    ctx = _conditioned_ctx(dropout=0.0)
    extra = torch.full((2, 4, 3, 3), 7.0)
    cond = _Recorder(lambda label: torch.full((label.shape[0], 5, 3, 3), -1.0))
    batch = {"label": torch.zeros(2, 9, 6, 6)}
    guide = _guide({"cond_refiner": cond}, "refiner", batch, ctx, extra)
    assert guide.shape == (2, 9, 3, 3)
    assert (guide[:, :4] == 7).all() and (guide[:, 4:] == -1).all()


def test_guide_without_condition_is_the_extra_alone_or_nothing() -> None:
    ctx = StepContext(preset("tiny"))
    extra = torch.randn(2, 4, 3, 3)
    assert torch.equal(_guide({}, "refiner", {}, ctx, extra), extra)
    assert _guide({}, "diff3d", {}, ctx, None) is None


def test_condition_dropout_zeroes_whole_items_at_the_configured_rate() -> None:
    """Rows of condition features are dropped (all zeros) with probability ``dropout``; the
    extra channels (z_sr) are never dropped."""
    n = 4000
    cond = _Recorder(lambda label: torch.ones(label.shape[0], 3, 2, 2))
    batch = {"label": torch.zeros(n, 9, 4, 4)}
    extra = torch.ones(n, 4, 2, 2)
    for p in (0.0, 0.1, 0.5):
        guide = _guide({"cond_refiner": cond}, "refiner", batch, _conditioned_ctx(p), extra)
        feats = guide[:, 4:]
        per_item = feats.flatten(1)
        dropped = (per_item == 0).all(1)
        kept = (per_item == 1).all(1)
        assert bool((dropped | kept).all()), "an item was partly dropped"
        assert abs(dropped.float().mean().item() - p) < 0.03, (p, dropped.float().mean())
        assert (guide[:, :4] == 1).all()


def test_only_diffusion_stages_train_a_condition_encoder() -> None:
    for name, spec in STAGES.items():
        trained = spec.trainable("layers")
        if spec.diffusion:
            assert trained == (*spec.trains, f"cond_{name}")
        else:
            assert trained == spec.trains
        assert not set(spec.trains) & set(spec.frozen)


def test_refiner_items_pair_slice_i_latents_with_slice_i_label(tmp_path) -> None:
    """A refiner item holds z_sr/z_hr of slice i and the label reduced from B-scan i."""
    import numpy as np

    from caldm.data.datasets import LatentDataset
    from caldm.data.io import write_volume
    from caldm.data.labels import encoder_grid, reduce_label
    from caldm.data.latents import write_latent_source, write_latents

    cfg = preset("tiny")
    cfg.data.augment.shift = 0.0  # alignment alone: no joint shift
    cfg.data.slices_per_volume = 6
    c, d, hl, wl = cfg.model.z_sr_shape
    _, h, w = cfg.model.image_shape
    classes = cfg.model.condition.layer_classes
    # slice i's layer boundaries sit at a depth that grows with i: each B-scan differs
    depth = np.arange(h)[None, :, None]
    edges = 4 + 2 * np.arange(d)[:, None, None]
    label = np.clip((depth - edges) // 3 + 1, 0, classes - 1).astype(np.uint8)
    label = np.broadcast_to(label, (d, h, w)).copy()
    data = tmp_path / "data"
    write_volume(str(data / "labels/layers/v0.nii.gz"), label)
    latents = str(tmp_path / "latents")
    z_sr = np.broadcast_to(np.arange(d, dtype=np.float32)[None, :, None, None], (c, d, hl, wl))
    write_latents(f"{latents}/v0.safetensors", np.zeros(cfg.model.latent_shape), z_sr, -z_sr)
    write_latent_source(latents, str(data))
    reduced = reduce_label(label, "layers", encoder_grid(cfg, "layers", "refiner"), classes)
    items = iter(LatentDataset(latents, cfg, "refiner", condition="layers"))
    for _ in range(6):
        item = next(items)
        i = int(item["z_sr"][0, 0, 0])
        assert torch.equal(item["z_hr"], -item["z_sr"])
        torch.testing.assert_close(item["label"], torch.as_tensor(reduced[:, i]).float())


def test_train_dtype_is_the_configured_precision_on_every_device() -> None:
    """One rule for the engine and the memory accounting; fp32 stays fp32 on a GPU too (it
    used to become bf16 on CUDA whatever train.precision said)."""
    import caldm.bench.memory as memory
    import caldm.distributed.engine as engine
    from caldm.stages import train_dtype

    cfg = preset("tiny")
    cfg.train.precision = "fp32"
    assert train_dtype(cfg) is torch.float32
    cfg.train.precision = "bf16"
    assert train_dtype(cfg) is torch.bfloat16
    assert memory.train_dtype is engine.train_dtype is train_dtype


def test_each_spec_carries_its_whole_contract() -> None:
    """Every reader of a stage (train, sweep, encode, sampler, accounting) finds it in the spec:
    a guide for the diffusion stages, validation for the swept ones, the latent encoders for
    the stages fed by the latent cache, the modules a run loads, and an example batch."""
    cfg = preset("tiny")
    assert {n for n, s in STAGES.items() if s.validate} == {"adaptor", "refiner"}
    for name, spec in STAGES.items():
        assert spec.name == name
        assert (spec.guide is not None) == spec.diffusion
        assert (spec.validate is None) == (spec.held_out is None)
        assert spec.encoders == (NHAE_MODULES if spec.dataset == "latents" else ())
        assert spec.needs(None) == spec.frozen
        if spec.diffusion:  # a guided fine-tune starts from the unconditional model
            assert spec.needs("layers") == (*spec.frozen, *spec.trains)
        condition = "layers" if spec.diffusion else None
        batch = spec.example_batch(cfg, 3, condition=condition)
        assert all(v.shape[0] == 3 for v in batch.values())
        assert ("label" in batch) == spec.diffusion


def test_spec_guides_scale_z_sr_and_put_it_before_the_condition() -> None:
    """The refiner's guide is [z_sr * latent_scale, condition features]; Diff3D's is the
    condition features alone."""
    ctx = _conditioned_ctx(dropout=0.0)
    ctx.latent_scale = 2.0
    cond = {
        f"cond_{n}": _Recorder(lambda lab: torch.full((lab.shape[0], 5, 3, 3), -1.0))
        for n in ("diff3d", "refiner")
    }
    batch = {"z_sr": torch.full((2, 4, 3, 3), 3.0), "label": torch.zeros(2, 9, 6, 6)}
    guide = STAGES["refiner"].guide(cond, batch, ctx, True)
    assert (guide[:, :4] == 6).all() and (guide[:, 4:] == -1).all()
    assert torch.equal(
        STAGES["diff3d"].guide(cond, batch, ctx, True), torch.full((2, 5, 3, 3), -1.0)
    )


def test_adaptor_validation_windows_are_the_middle_slices_in_order(tmp_path) -> None:
    """The adaptor's held-out batch: for each of the 8 middle slices its k-window (edges
    replicated), read and resized as training reads; its validate scores DecM on them."""
    from caldm.data.io import read_volume
    from caldm.data.phantom import write_phantom_dataset
    from caldm.data.preprocess import resize, to_unit_range
    from caldm.nn.factory import build

    cfg = preset("tiny")
    write_phantom_dataset(str(tmp_path), count=1, preset="tiny", seed=0)
    spec = STAGES["adaptor"]
    windows = spec.held_out(str(tmp_path), ("phantom_0000",), cfg, None, 0)["windows"]
    (d, h, w), k = cfg.model.image_shape, cfg.model.k
    assert windows.shape == (1, 8, k, 1, h, w)
    volume, _ = read_volume(str(tmp_path / "images" / "phantom_0000.nii.gz"))
    volume = torch.from_numpy(resize(to_unit_range(volume), (d, h, w), order="linear"))
    for j, centre in enumerate(range(d // 2 - 4, d // 2 + 4)):
        for i in range(k):  # position i of window j: slice centre + i - k // 2
            assert torch.equal(windows[0, j, i, 0], volume[min(max(centre + i - k // 2, 0), d - 1)])
    torch.manual_seed(0)
    mods = {n: build(n, cfg).eval() for n in ("enc2d", "dec2d", "adaptors")}
    metrics = spec.validate(mods, {"windows": windows}, StepContext(cfg))
    assert metrics["val_score"] == metrics["val_rec"] + metrics["val_consistency"]
    assert metrics["val_rec"] > 0 and metrics["val_consistency"] > 0
