"""One spec per training stage (DESIGN.md "Training order"), each stage's whole contract:
what trains, what is frozen and loaded from the bundle, which dataset feeds it (and which
encoders wrote it), its loss, an example batch, its diffusion input and its held-out
validation. One train loop serves them all (:mod:`caldm.distributed.train`); the sweeps, the
latent cache, the sampler and the meta-device memory accounting read the same specs.

A step function takes the stage's modules (a dict by bundle name, plus ``disc`` for the GAN
stages), a batch from the stage's dataset and a :class:`StepContext`, and returns a
:class:`StepOutput`: the generator-side loss parts (``"loss"`` is the one to minimise) and, for
the GAN stages, the real and reconstructed images the discriminator judges next.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import IterableDataset

from caldm.config import Config
from caldm.diffusion.objective import diffusion_loss
from caldm.diffusion.schedule import NoiseSchedule
from caldm.nn.factory import NHAE_MODULES
from caldm.nn.losses import HybridLoss, hinge_d_loss, shared_column_texture
from caldm.nn.nets.dec_m import DecM
from caldm.validation import METRIC, adaptor_held_out, refiner_held_out

Modules = dict[str, nn.Module]
Batch = dict[str, torch.Tensor]
Device = str | torch.device

#: Elements per ZeRO gradient reduce / allgather bucket: what the DeepSpeed engine is given and
#: what the memory accounting (caldm.bench.memory) charges for it.
REDUCE_BUCKET = 50_000_000


def train_dtype(cfg: Config) -> torch.dtype:
    """The dtype a stage computes in, on every device: bf16 when ``train.precision`` is bf16
    (the optimizer keeps fp32 master weights), else fp32."""
    return torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32


@dataclass
class StepContext:
    """What a step needs besides modules and batch."""

    cfg: Config
    step: int = 0
    hybrid: HybridLoss | None = None  # autoencoder stages
    schedule: NoiseSchedule | None = None  # diffusion stages
    latent_scale: float = 1.0  # diffusion stages: latents are multiplied by this
    condition: str | None = None  # label guidance kind, when fine-tuning with a condition
    generator: torch.Generator | None = None


@dataclass
class StepOutput:
    losses: dict[str, torch.Tensor]
    real: torch.Tensor | None = None  # images the discriminator sees as real
    fake: torch.Tensor | None = None  # reconstructions (not detached)
    preview: dict[str, torch.Tensor] = field(default_factory=dict)


StepFn = Callable[[Modules, Batch, StepContext], StepOutput]
#: ``example(cfg, batch_size, device, dtype, condition)``: a batch of the stage's shapes.
ExampleFn = Callable[[Config, int, Device, torch.dtype, str | None], Batch]
#: ``guide(modules, batch, ctx, dropout)``: the channels concatenated to a diffusion input.
GuideFn = Callable[[Modules, Batch, StepContext, bool], torch.Tensor | None]
#: ``validate(modules, batch, ctx)``: held-out metrics (``val_score`` is the one to minimise).
ValidateFn = Callable[[Modules, Batch, StepContext], dict[str, float]]
#: ``held_out(data, ids, cfg, condition, seed)``: the fixed batch ``validate`` is run on.
HeldOutFn = Callable[[str, tuple[str, ...], Config, str | None, int], Batch]


@dataclass(frozen=True)
class StageSpec:
    """A training stage: everything the train loop, the sweeps, the latent cache, the sampler
    and the memory accounting need to know of it.

    Attributes:
        name: the stage name used by ``jobs/train_stage.py --stage``.
        trains: bundle modules optimised (and exported) by this stage.
        frozen: bundle modules loaded from ``--bundle`` and kept fixed.
        dataset: which stage dataset feeds it (see :mod:`caldm.data.datasets`).
        step: the loss computation.
        example: a batch of the right shapes (random values), see :meth:`example_batch`.
        gan: trains a patch discriminator (``disc``) in a second engine.
        diffusion: keeps EMA weights, exports them, and can be label-conditioned.
        guide: diffusion stages: the channels concatenated to the UNet's input.
        encoders: bundle modules that wrote its data (the latent cache's NHAE).
        validate: held-out metrics of a swept stage; None for stages without them.
        held_out: the fixed held-out batch ``validate`` takes (with ``validate``).
    """

    name: str
    trains: tuple[str, ...]
    frozen: tuple[str, ...]
    dataset: str
    step: StepFn
    example: ExampleFn
    gan: bool = False
    diffusion: bool = False
    guide: GuideFn | None = None
    encoders: tuple[str, ...] = ()
    validate: ValidateFn | None = None
    held_out: HeldOutFn | None = None

    @property
    def condition_encoder(self) -> str | None:
        """The bundle module that encodes labels for this diffusion stage (``cond_<model>``)."""
        return f"cond_{self.trains[0]}" if self.diffusion else None

    def trainable(self, condition: str | None) -> tuple[str, ...]:
        """Trained modules; a conditioned diffusion stage also trains its condition encoder."""
        if self.diffusion and condition:
            return (*self.trains, self.condition_encoder)
        return self.trains

    def needs(self, condition: str | None) -> tuple[str, ...]:
        """The modules a run must load from its bundle: the frozen ones and, to fine-tune
        with a condition, the unconditional model it starts from."""
        return (*self.frozen, *(self.trains if condition else ()))

    def example_batch(
        self,
        cfg: Config,
        batch_size: int | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        condition: str | None = None,
    ) -> Batch:
        """A batch of the right shapes (random values): for tests and accounting."""
        return self.example(cfg, batch_size or cfg.train.micro_batch, device, dtype, condition)


def _sample_latent(mu: torch.Tensor, log_var: torch.Tensor, g: torch.Generator | None):
    noise = torch.randn(mu.shape, generator=g, device=mu.device, dtype=mu.dtype)
    return mu + (0.5 * log_var).exp() * noise


def _adversarial(mods: Modules, fake: torch.Tensor, ctx: StepContext) -> torch.Tensor | None:
    assert ctx.hybrid is not None
    if "disc" not in mods or not ctx.hybrid.adversarial_active(ctx.step):
        return None
    return mods["disc"](fake)[-1]


def ae2d_step(mods: Modules, batch: Batch, ctx: StepContext) -> StepOutput:
    """Enc2D/Dec2D on random B-scans: the LDM hybrid loss (+ the column texture term)."""
    x = batch["image"]
    mu, log_var = mods["enc2d"](x)
    z = _sample_latent(mu, log_var, ctx.generator)
    x_rec = mods["dec2d"](z)
    losses = ctx.hybrid(x, x_rec, _adversarial(mods, x_rec, ctx), mu, log_var)
    weight = ctx.cfg.model.loss.column_weight
    if weight > 0:  # a second decode of z with fresh noise (without noise inputs: the same)
        x_again = mods["dec2d"](z) if ctx.cfg.model.ae2d.noise else x_rec
        losses["column"] = shared_column_texture(x, x_rec, x_again)
        losses["loss"] = losses["loss"] + weight * losses["column"]
    return StepOutput(losses, real=x, fake=x_rec, preview={"real": x, "reconstructed": x_rec})


def nhae_step(mods: Modules, batch: Batch, ctx: StepContext) -> StepOutput:
    """Enc3D and f_sr: thumbnail in, a few full-resolution slices out through frozen Dec2D,
    plus an L1 pull of z_sr_i towards the slice latent Enc2D(x_i)."""
    thumb, slices, index = batch["thumbnail"], batch["slices"], batch["index"]
    mu, log_var = mods["enc3d"](thumb)
    z_sr = mods["f_sr"](_sample_latent(mu, log_var, ctx.generator))  # (B, c, D, H', W')
    b, s = index.shape
    picked = z_sr.movedim(2, 1)[torch.arange(b, device=index.device)[:, None], index]
    picked = picked.flatten(0, 1)  # (B*S, c, H', W')
    x = slices.flatten(0, 1)  # (B*S, 1, H, W)
    with torch.no_grad():
        target_latent, _ = mods["enc2d"](x)
    x_rec = mods["dec2d"](picked)
    losses = ctx.hybrid(x, x_rec, _adversarial(mods, x_rec, ctx), mu, log_var)
    losses["latent_l1"] = F.l1_loss(picked.float(), target_latent.float())
    losses["loss"] = losses["loss"] + ctx.cfg.model.loss.latent_weight * losses["latent_l1"]
    return StepOutput(losses, real=x, fake=x_rec, preview={"real": x, "reconstructed": x_rec})


def adaptor_step(mods: Modules, batch: Batch, ctx: StepContext) -> StepOutput:
    """DecM's 3D adaptors as chunked decoding uses them: a window of a decode chunk plus its
    halo (:meth:`Config.adaptor_window`) encoded by frozen Enc2D and decoded together by DecM
    (frozen Dec2D + adaptors); every output slice of the chunk is compared with the real one.

    Eq. 1's exact mode is the same computation with a chunk of one slice; training on the
    chunk covers every position an output slice can take in either mode.
    """
    window = batch["window"]  # (B, n, 1, H, W), n = decode_chunk + 2 halo
    b, n = window.shape[:2]
    halo = min(ctx.cfg.adaptor_window()[1], (n - 1) // 2)
    with torch.no_grad():
        z, _ = mods["enc2d"](window.flatten(0, 1))
    z = z.reshape(b, n, *z.shape[1:])
    x_rec = DecM(mods["dec2d"], mods["adaptors"])(z)[:, halo : n - halo].flatten(0, 1)
    x = window[:, halo : n - halo].flatten(0, 1)
    losses = ctx.hybrid(x, x_rec, _adversarial(mods, x_rec, ctx))
    return StepOutput(losses, real=x, fake=x_rec, preview={"real": x, "reconstructed": x_rec})


def guide_input(extra: torch.Tensor | None, cond: torch.Tensor | None) -> torch.Tensor | None:
    """The channels concatenated to a diffusion UNet's input, in their one order: ``extra``
    (z_sr for the refiner) then the condition features; ``None`` when there are neither."""
    parts = [p for p in (extra, cond) if p is not None]
    return torch.cat(parts, 1) if parts else None


def _guide(
    mods: Modules,
    name: str,
    batch: Batch,
    ctx: StepContext,
    extra: torch.Tensor | None,
    dropout: bool = True,
) -> torch.Tensor | None:
    """The channels concatenated to a diffusion UNet's input: ``extra`` then condition
    features, whose rows are zeroed with probability ``condition.dropout`` when ``dropout``
    (training: so the model also learns the unconditional case, for classifier-free
    guidance; validation evaluates the conditional model)."""
    feats = None
    if ctx.condition:
        feats = mods[f"cond_{name}"](batch["label"])
        p = ctx.cfg.model.condition.dropout if dropout else 0.0
        if p > 0:
            keep = torch.rand(feats.shape[0], device=feats.device, generator=ctx.generator) >= p
            feats = feats * keep.to(feats.dtype).view(-1, *[1] * (feats.dim() - 1))
    return guide_input(extra, feats)


def diff3d_guide(
    mods: Modules, batch: Batch, ctx: StepContext, dropout: bool = True
) -> torch.Tensor | None:
    """Diff3D's input channels besides x_t: the condition features alone (or none)."""
    return _guide(mods, "diff3d", batch, ctx, None, dropout)


def refiner_guide(
    mods: Modules, batch: Batch, ctx: StepContext, dropout: bool = True
) -> torch.Tensor | None:
    """Diff_slice's input channels besides x_t: z_sr_i (scaled as z_hr is), then the
    condition features."""
    return _guide(mods, "refiner", batch, ctx, batch["z_sr"] * ctx.latent_scale, dropout)


def diff3d_step(mods: Modules, batch: Batch, ctx: StepContext) -> StepOutput:
    """Diff3D on cached z (scaled to about unit variance)."""
    z = batch["z"] * ctx.latent_scale
    guide = diff3d_guide(mods, batch, ctx)
    loss = diffusion_loss(
        lambda x, t: mods["diff3d"](x, t, guide),
        ctx.schedule,
        z,
        generator=ctx.generator,
        kind=ctx.cfg.diffusion.loss,
    )
    return StepOutput({"loss": loss, ctx.cfg.diffusion.loss: loss.detach()})  # "mse" or "l1"


def refiner_step(mods: Modules, batch: Batch, ctx: StepContext) -> StepOutput:
    """Diff_slice on cached (z_sr_i, z_hr_i) pairs: generate z_hr_i guided by z_sr_i."""
    z_hr = batch["z_hr"] * ctx.latent_scale
    guide = refiner_guide(mods, batch, ctx)
    loss = diffusion_loss(
        lambda x, t: mods["refiner"](x, t, guide),
        ctx.schedule,
        z_hr,
        generator=ctx.generator,
        kind=ctx.cfg.diffusion.loss,
    )
    return StepOutput({"loss": loss, ctx.cfg.diffusion.loss: loss.detach()})  # "mse" or "l1"


def discriminator_loss(disc: nn.Module, out: StepOutput) -> torch.Tensor:
    """Hinge loss of the patch discriminator on real vs (detached) reconstructed images."""
    return hinge_d_loss(disc(out.real.detach())[-1], disc(out.fake.detach())[-1])


# ------------------------------------------------------------------------ validation


@torch.no_grad()
def validate_adaptor(mods: Modules, batch: Batch, ctx: StepContext) -> dict[str, float]:
    """DecM (Dec2D with the adaptors) on the held-out windows of
    :func:`~caldm.validation.adaptor_held_out`. ``val_rec`` is the L1 error to the real centre
    slices; ``val_consistency`` the L1 error of the slice-to-slice differences (stripes show
    as jumps between neighbours that the real volume does not have).
    ``val_score = val_rec + val_consistency``."""
    enc2d, decm = mods["enc2d"], DecM(mods["dec2d"], mods["adaptors"])
    dtype = next(enc2d.parameters()).dtype
    rec, consistency = [], []
    for volume in batch["windows"]:
        n, k = volume.shape[:2]
        real = volume[:, k // 2].float()
        out = []
        for window in volume.split(1):  # one window at a time: paper-size slices
            z, _ = enc2d(window.to(dtype).flatten(0, 1))
            out.append(decm.decode_center(z.reshape(1, k, *z.shape[1:])).float())
        fake = torch.cat(out)
        rec.append((fake - real).abs().mean())
        consistency.append(((fake[1:] - fake[:-1]) - (real[1:] - real[:-1])).abs().mean())
    val_rec, val_cons = float(torch.stack(rec).mean()), float(torch.stack(consistency).mean())
    return {"val_rec": val_rec, "val_consistency": val_cons, METRIC: val_rec + val_cons}


@torch.no_grad()
def validate_refiner(mods: Modules, batch: Batch, ctx: StepContext) -> dict[str, float]:
    """Denoising loss of ``mods["refiner"]`` on the batch of
    :func:`~caldm.validation.refiner_held_out`. ``val_loss`` is the training objective (its
    value depends on the prediction type); ``val_score`` is the MSE of the implied noise,
    comparable across prediction types. No condition dropout: the conditional model is what
    is sampled."""
    schedule, model = ctx.schedule, mods["refiner"]
    x0, t, noise = batch["z_hr"] * ctx.latent_scale, batch["t"], batch["noise"]
    guide = refiner_guide(mods, batch, ctx, dropout=False)
    loss = diffusion_loss(lambda x, tt: model(x, tt, guide), schedule, x0, t, noise)
    x_t = schedule.add_noise(x0, noise, t)
    _, eps = schedule.to_x0_eps(model(x_t, t, guide), x_t, t)
    return {"val_loss": float(loss), METRIC: float(((eps - noise) ** 2).mean())}


# ------------------------------------------------------------------------ example batches


def _rnd(device: Device, dtype: torch.dtype, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, device=device, dtype=dtype)


def ae2d_example(
    cfg: Config, b: int, device: Device, dtype: torch.dtype, condition: str | None = None
) -> Batch:
    """Random B-scans ``(B, 1, H, W)``."""
    _, h, w = cfg.model.image_shape
    return {"image": _rnd(device, dtype, b, 1, h, w)}


def nhae_example(
    cfg: Config, b: int, device: Device, dtype: torch.dtype, condition: str | None = None
) -> Batch:
    """Thumbnails, ``data.slices_per_volume`` full-resolution slices and their indices."""
    d, h, w = cfg.model.image_shape
    s = cfg.data.slices_per_volume
    return {
        "thumbnail": _rnd(device, dtype, b, 1, *cfg.model.thumbnail_shape),
        "slices": _rnd(device, dtype, b, s, 1, h, w),
        "index": torch.randint(0, d, (b, s), device=device),
    }


def adaptor_example(
    cfg: Config, b: int, device: Device, dtype: torch.dtype, condition: str | None = None
) -> Batch:
    """Windows of a decode chunk plus its halo ``(B, n, 1, H, W)``."""
    _, h, w = cfg.model.image_shape
    return {"window": _rnd(device, dtype, b, cfg.adaptor_window()[0], 1, h, w)}


def _example_label(
    cfg: Config, stage: str, b: int, device: Device, dtype: torch.dtype, condition: str | None
) -> Batch:
    """Class fractions on the encoder's grid (caldm.data.labels.reduce_label); a refiner
    item is one slice, so one row of its grid."""
    if not condition:
        return {}
    from caldm.data.labels import encoder_grid, num_label_classes

    grid = encoder_grid(cfg, condition, stage)
    grid = grid if stage == "diff3d" else grid[1:]
    classes = num_label_classes(condition, cfg.model.condition.layer_classes)
    logits = torch.randn(b, classes, *grid, device=device)
    return {"label": logits.softmax(1).to(dtype)}


def diff3d_example(
    cfg: Config, b: int, device: Device, dtype: torch.dtype, condition: str | None = None
) -> Batch:
    """Cached z ``(B, c, D', H', W')`` (and its label)."""
    batch = {"z": _rnd(device, dtype, b, *cfg.model.latent_shape)}
    return {**batch, **_example_label(cfg, "diff3d", b, device, dtype, condition)}


def refiner_example(
    cfg: Config, b: int, device: Device, dtype: torch.dtype, condition: str | None = None
) -> Batch:
    """Cached (z_sr_i, z_hr_i) slice pairs ``(B, c, H', W')`` (and the label's slice i)."""
    shape = (b, *cfg.model.slice_latent_shape)
    batch = {"z_sr": _rnd(device, dtype, *shape), "z_hr": _rnd(device, dtype, *shape)}
    return {**batch, **_example_label(cfg, "refiner", b, device, dtype, condition)}


# ------------------------------------------------------------------------ the stage table

STAGES: dict[str, StageSpec] = {
    "ae2d": StageSpec("ae2d", ("enc2d", "dec2d"), (), "bscan", ae2d_step, ae2d_example, gan=True),
    "nhae": StageSpec(
        "nhae",
        ("enc3d", "f_sr"),
        ("enc2d", "dec2d"),
        "thumbnail_slices",
        nhae_step,
        nhae_example,
        gan=True,
    ),
    "adaptor": StageSpec(
        "adaptor",
        ("adaptors",),
        ("enc2d", "dec2d"),
        "slice_window",
        adaptor_step,
        adaptor_example,
        gan=True,
        validate=validate_adaptor,
        held_out=adaptor_held_out,
    ),
    "diff3d": StageSpec(
        "diff3d",
        ("diff3d",),
        (),
        "latents",
        diff3d_step,
        diff3d_example,
        diffusion=True,
        guide=diff3d_guide,
        encoders=NHAE_MODULES,
    ),
    "refiner": StageSpec(
        "refiner",
        ("refiner",),
        (),
        "latents",
        refiner_step,
        refiner_example,
        diffusion=True,
        guide=refiner_guide,
        encoders=NHAE_MODULES,
        validate=validate_refiner,
        held_out=refiner_held_out,
    ),
}


def stage_dataset(
    stage: str,
    data: str,
    cfg: Config,
    condition: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
) -> IterableDataset:
    """The infinite stream of items that feeds ``stage``, sharded by ``(rank, world_size)``.

    ``data`` is a dataset root for the autoencoder stages and the latent cache written by
    ``jobs/encode_latents.py`` for the diffusion stages, or for any stage a corpus written by
    ``jobs/prepare_corpus.py`` (the fast path: items stored as they are fed). Constructing it
    lists the files (and, with a ``condition``, checks the labels), so missing data fails
    here, before training.
    """
    from caldm.data import corpus, datasets

    if corpus.is_corpus(data):
        corpus.check_condition(data, stage, condition)
        key = corpus.stage_key(stage, condition)
        return corpus.CorpusDataset(data, key, cfg, rank=rank, world_size=world_size, seed=seed)

    kind = STAGES[stage].dataset
    if kind == "latents":
        return datasets.LatentDataset(
            data, cfg, stage, condition, rank=rank, world_size=world_size, seed=seed
        )
    volume_streams = {
        "bscan": datasets.BScanDataset,
        "thumbnail_slices": datasets.ThumbnailSliceDataset,
        "slice_window": datasets.SliceWindowDataset,
    }
    return volume_streams[kind](data, cfg, rank=rank, world_size=world_size, seed=seed)


def example_batch(stage: str, cfg: Config, *args: Any, **kwargs: Any) -> Batch:
    """:meth:`StageSpec.example_batch` (same further arguments) of the stage named ``stage``."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    return STAGES[stage].example_batch(cfg, *args, **kwargs)
