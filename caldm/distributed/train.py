"""The one train loop of every CA-LDM stage: Ray Train workers, DeepSpeed ZeRO engines.

``train(TrainRequest(...))`` is what ``jobs/train_stage.py`` runs:

1. :func:`plan` checks every input on the driver (config, bundle, data, ``--out``) and resolves
   the run; nothing starts before it passes.
2. A :class:`~ray.train.torch.TorchTrainer` runs :func:`train_loop` on ``workers`` workers. Each
   builds the stage's modules (:func:`build_stage_modules`), wraps the trainable ones in one
   DeepSpeed engine (and the discriminator of a GAN stage in a second), and steps
   (:class:`StageTrainer`). Every ``train.checkpoint_every`` steps every rank saves its ZeRO
   shard into one Ray checkpoint and reports.
3. Rank 0 exports ``<out>/bundle`` (the EMA weights of a diffusion stage; frozen and inherited
   modules copied from ``--bundle`` so the bundle is self-contained); the driver writes
   ``<out>/summary.json``.

Ray storage is ``<out>`` with the run name ``<stage>``, so rerunning the same command finds the
run's checkpoints and resumes from the newest (Ray Train V2 restores it by name and storage).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import torch
from torch import nn

from caldm.bundle import bundle_modules, load_module, read_bundle_config, read_meta, require
from caldm.bundle import save_bundle as _save_bundle
from caldm.config import Config, load_config
from caldm.data.io import join_url as join
from caldm.data.io import list_dir, read_json, write_json
from caldm.diffusion.schedule import NoiseSchedule
from caldm.distributed.cluster import ensure_ray, worker_env
from caldm.errors import BundleError, CaldmError, ConfigError, DataError
from caldm.nn.factory import build
from caldm.nn.losses import HybridLoss
from caldm.nn.nets.diffusion_unet import widen_input
from caldm.stages import (
    STAGES,
    StageSpec,
    StepContext,
    StepOutput,
    discriminator_loss,
    stage_dataset,
)

log = logging.getLogger("caldm.train")

#: Test hook: a worker raises right after reporting the checkpoint of this step (a "kill").
FAIL_AFTER_STEP_ENV = "CALDM_FAIL_AFTER_STEP"
#: Elements per ZeRO gradient reduce / allgather bucket.
REDUCE_BUCKET = 50_000_000
# Model config sections that do not change any exported module's weights.
# layer_classes shapes only the condition encoders: it comes from the data (or a conditioned
# bundle's num_classes, checked against the data in plan()), never from the preset.
_MODEL_KEYS_FREE = (
    "model.loss.",
    "model.discriminator.",
    "model.condition.dropout",
    "model.condition.layer_classes",
)
# Model config keys that shape only one module: free when the bundle lacks that module (the run
# trains it from scratch, e.g. adaptors with another kernel size on an ae2d/nhae bundle).
_MODEL_KEYS_OF = {
    "adaptors": ("model.adaptor.", "model.k"),
    "diff3d": ("model.diff3d.",),
    "refiner": ("model.refiner.",),
}


#: A validation hook: ``evaluate(trainer) -> metrics``, run on every rank of a run.
Evaluate = Callable[["StageTrainer"], dict[str, float]]

# ------------------------------------------------------------------------ request and plan


class TrainingFailed(CaldmError):
    """Training stopped with an error after its retries (``train.max_failures``)."""

    exit_code = 1


@dataclass(frozen=True)
class TrainRequest:
    """The arguments of ``jobs/train_stage.py`` (DESIGN.md command contract)."""

    stage: str
    data: str
    out: str
    preset: str | None = "tiny"
    bundle: str | None = None
    condition: str | None = None
    config_file: str | None = None
    overrides: tuple[str, ...] = ()
    workers: int = 1
    gpus_per_worker: float = 0.0
    #: every worker on this card (cluster.yaml's accelerator_type:<card>, e.g. A10G)
    accelerator_type: str | None = None
    zero_stage: int | None = None
    max_steps: int | None = None
    #: ids of volumes (or cached latents) the training stream skips: held out (--exclude).
    exclude_ids: tuple[str, ...] = ()
    #: when set, the only ids trained on (--ids, e.g. a split.json's train part).
    ids: tuple[str, ...] | None = None
    # Hooks for drivers other than jobs/train_stage.py (e.g. tuning/sweep.py):
    #: called on every rank before each checkpoint report; its metrics join the report.
    evaluate: Evaluate | None = None
    #: extra Ray Train callbacks (e.g. Tune's TuneReportCallback).
    callbacks: tuple[Any, ...] = ()
    #: MLflow experiment and run name (default: caldm-train, the stage).
    experiment: str = "caldm-train"
    run_name: str | None = None


@dataclass
class TrainPlan:
    """A checked, resolved run: what the workers receive."""

    stage: str
    cfg: Config  # resolved; cfg.stage == stage; --zero-stage and --max-steps applied
    data: str  # absolute local path or URL
    out: str
    bundle: str | None
    bundle_meta: dict[str, Any] = field(default_factory=dict)
    condition: str | None = None
    num_classes: int | None = None
    latent_scale: float = 1.0  # diffusion stages: 1 / std of the cached latents
    workers: int = 1
    gpus_per_worker: float = 0.0
    exclude_ids: tuple[str, ...] = ()
    evaluate: Evaluate | None = None
    experiment: str = "caldm-train"
    run_name: str | None = None
    #: the MLflow run this run logs to (kept in run.json: a resume continues it)
    mlflow_run_id: str | None = None

    @property
    def spec(self) -> StageSpec:
        return STAGES[self.stage]

    @property
    def bundle_out(self) -> str:
        return join(self.out, "bundle")


def absolute(url: str) -> str:
    """Local paths made absolute: workers (and ``ray job submit`` jobs) run in other dirs."""
    if "://" in url and not url.startswith("file://"):
        return url.rstrip("/")
    return str(Path(url.removeprefix("file://")).expanduser().resolve())


#: Config keys a resume may change: how long and how often, not what is trained or how.
RESUME_FREE_KEYS = (
    "train.max_steps",
    "train.checkpoint_every",
    "train.log_every",
    "train.preview_every",
    "train.max_failures",
    "data.num_workers",
)


def run_record(p: TrainPlan) -> dict[str, Any]:
    """What ``<out>/run.json`` records of a run: stage, condition, world size, ZeRO stage, the
    config (less :data:`RESUME_FREE_KEYS`) and its hash, and the MLflow run id."""
    config = {
        k: v for k, v in sorted(p.cfg.flat().items()) if not k.startswith(RESUME_FREE_KEYS)
    }
    text = json.dumps(config, sort_keys=True, default=str)
    return {
        "stage": p.stage,
        "condition": p.condition,
        "world_size": p.workers,
        "zero_stage": p.cfg.train.zero_stage,
        "config_hash": hashlib.sha256(text.encode()).hexdigest(),
        "config": json.loads(text),
        "mlflow_run_id": p.mlflow_run_id,
    }


def has_checkpoint(out: str, stage: str) -> bool:
    """Whether Ray Train has a checkpoint of this run (``<out>/<stage>/checkpoint_*``)."""
    return any(name.startswith("checkpoint_") for name in list_dir(join(out, stage)))


def check_resume(previous: dict[str, Any], record: dict[str, Any], out: str) -> None:
    """Refuse, in one line naming the changes, a rerun whose checkpoints cannot or should not
    be continued: another world size or ZeRO stage (DeepSpeed's shards are per rank and
    stage) or another config (the optimizer state belongs to the old one)."""
    if "world_size" not in previous or not has_checkpoint(out, record["stage"]):
        return
    changes = []
    if previous["world_size"] != record["world_size"]:
        changes.append(f"--workers {previous['world_size']} -> {record['world_size']}")
    if previous["zero_stage"] != record["zero_stage"]:
        changes.append(f"--zero-stage {previous['zero_stage']} -> {record['zero_stage']}")
    if previous.get("config_hash") != record["config_hash"]:
        old, new = previous.get("config", {}), record["config"]
        keys = sorted(k for k in {*old, *new} if old.get(k) != new.get(k))
        changes += [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys] or ["the config"]
    if changes:
        raise ConfigError(
            f"{join(out, 'run.json')}: its checkpoints were made with other settings "
            f"({'; '.join(changes[:4])}); rerun with the original ones to resume, "
            "or choose another --out"
        )


def latent_stats(latents: str) -> dict[str, Any]:
    """``<latents>/stats.json`` as written by ``jobs/encode_latents.py``."""
    stats = read_json(join(latents, "stats.json"))
    if stats is None:
        raise DataError(
            join(latents, "stats.json"), "missing: rerun jobs/encode_latents.py on this cache"
        )
    return stats


def _layer_classes(latents: str, bundle: str | None, meta: dict[str, Any]) -> int:
    """Layer classes of a layers-conditioned run: counted in the labels of the dataset the
    latents were encoded from; a bundle already conditioned on layers must agree with them."""
    from caldm.data.datasets import num_layer_classes, read_latent_source

    source = read_latent_source(latents)["data"]
    classes = num_layer_classes(source)
    have = meta.get("num_classes") if meta.get("condition") == "layers" else None
    if have is not None and int(have) != classes:
        raise DataError(
            f"{source.rstrip('/')}/labels/layers",
            f"labels have {classes} layer classes, but bundle {bundle} was conditioned on "
            f"{have}; use labels with {have} classes or a bundle trained on these",
        )
    return classes


def _check_bundle_model(bundle: str, cfg: Config, fresh: tuple[str, ...] = ()) -> Config:
    """The bundle's config; a ConfigError when its networks differ from the run's.

    ``fresh`` names modules the run trains from scratch (absent from the bundle): the config
    keys that shape only them may differ.
    """
    have = read_bundle_config(bundle).flat()
    free = _MODEL_KEYS_FREE + tuple(k for m in fresh for k in _MODEL_KEYS_OF.get(m, ()))
    for key, value in cfg.flat().items():
        if key.startswith("model.") and not key.startswith(free):
            if have.get(key) != value:
                raise ConfigError(
                    f"{bundle}: bundle was made for another model ({key} = {have.get(key)!r}, "
                    f"this run has {value!r}); use the bundle's preset (--preset "
                    f"{have.get('preset')})"
                )
    return cfg


def plan(req: TrainRequest) -> TrainPlan:
    """Check every input of a run before any worker starts; raise one CaldmError per problem.

    Rejects: an unknown stage, a condition on a non-diffusion stage, unknown config keys, a
    config file saved by another stage, a bundle lacking what the stage freezes (or, when
    fine-tuning with a condition, the unconditional model), a bundle of another model, missing
    data or latents, and an ``--out`` holding a run of another stage.
    """
    if req.stage not in STAGES:
        raise ConfigError(f"unknown stage {req.stage!r}; choose one of {', '.join(STAGES)}")
    spec = STAGES[req.stage]
    if req.condition is not None and not spec.diffusion:
        raise ConfigError(
            f"--condition {req.condition}: stage {req.stage} takes no label condition "
            "(only diff3d and refiner are fine-tuned with one)"
        )
    if req.condition not in (None, "layers", "vessels"):
        raise ConfigError(f"--condition {req.condition!r}: expected layers or vessels")
    if req.workers < 1:
        raise ConfigError(f"--workers {req.workers}: need at least one worker")
    if req.accelerator_type and req.gpus_per_worker <= 0:
        raise ConfigError(f"--accelerator-type {req.accelerator_type}: needs --gpus-per-worker")
    cfg = load_config(req.preset, req.config_file, list(req.overrides))
    if cfg.stage is not None and cfg.stage != req.stage:
        raise ConfigError(
            f"{req.config_file or '--set stage'}: config of stage {cfg.stage!r}, "
            f"not {req.stage!r}; pass a config written for {req.stage} or none"
        )
    cfg.stage = req.stage
    if req.zero_stage is not None:
        cfg.train.zero_stage = req.zero_stage
    if req.max_steps is not None:
        cfg.train.max_steps = req.max_steps

    out, data = absolute(req.out), absolute(req.data)
    bundle = absolute(req.bundle) if req.bundle else None
    previous = read_json(join(out, "run.json"))
    if previous is not None and (
        previous.get("stage") != req.stage or previous.get("condition") != req.condition
    ):
        raise ConfigError(
            f"{join(out, 'run.json')}: --out holds a run of stage {previous.get('stage')!r} "
            f"(condition {previous.get('condition')}); choose another --out"
        )

    meta: dict[str, Any] = {}
    needed = list(spec.frozen) + (list(spec.trains) if req.condition else [])
    if needed and bundle is None:
        raise BundleError(f"stage {req.stage} needs --bundle with {', '.join(needed)}")
    if bundle is not None:
        what = f"stage {req.stage} (frozen: {', '.join(spec.frozen) or 'none'})"
        if req.condition:
            what += f" with --condition (starts from the unconditional {spec.trains[0]})"
        require(bundle, needed, what)
        meta = read_meta(bundle)
        fresh = tuple(m for m in spec.trains if m not in meta.get("modules", []))
        _check_bundle_model(bundle, cfg, fresh)
        conditioned = spec.diffusion and spec.trains[0] in meta.get("conditioned", [])
        if req.condition and meta.get("condition") not in (None, req.condition):
            raise BundleError(
                f"{bundle}: bundle is conditioned on {meta['condition']}, not {req.condition}"
            )
        if conditioned and not req.condition:
            raise BundleError(
                f"{bundle}: its {spec.trains[0]} is label-conditioned on {meta['condition']}; "
                f"pass --condition {meta['condition']}"
            )

    exclude = tuple(req.exclude_ids)
    if req.ids is not None:  # --ids: everything else is held out
        from caldm.data.layout import select_ids

        listed = stage_dataset(req.stage, data, cfg, None).ids
        keep = select_ids(listed, list(req.ids), what=f"--ids (volumes of {data})")
        exclude += tuple(i for i in listed if i not in set(keep))
    num_classes = None
    latent_scale = 1.0
    if spec.diffusion:
        training_dataset(req.stage, data, cfg, req.condition, exclude, 0, req.workers)
        std = latent_stats(data)["z" if req.stage == "diff3d" else "z_hr"]["std"]
        from caldm.bundle import NHAE_MODULES, nhae_hash

        if bundle is not None and set(NHAE_MODULES) <= set(meta.get("sha256", {})):
            from caldm.distributed.encode import check_nhae  # latents of this bundle's NHAE

            check_nhae(data, nhae_hash(bundle))
        latent_scale = 1.0 / max(float(std), 1e-8)
        if req.condition == "layers":
            num_classes = _layer_classes(data, bundle, meta)
            cfg.model.condition.layer_classes = num_classes
    else:
        training_dataset(req.stage, data, cfg, None, exclude, 0, req.workers)

    p = TrainPlan(
        stage=req.stage,
        cfg=cfg,
        data=data,
        out=out,
        bundle=bundle,
        bundle_meta=meta,
        condition=req.condition,
        num_classes=num_classes,
        latent_scale=latent_scale,
        workers=req.workers,
        gpus_per_worker=req.gpus_per_worker,
        exclude_ids=exclude,
        evaluate=req.evaluate,
        experiment=req.experiment,
        run_name=req.run_name,
        mlflow_run_id=(previous or {}).get("mlflow_run_id"),
    )
    if previous is not None:
        check_resume(previous, run_record(p), out)
    return p


# ------------------------------------------------------------------------ modules


def build_stage_modules(p: TrainPlan) -> tuple[nn.ModuleDict, dict[str, nn.Module]]:
    """(trainable, frozen) modules of a stage, in float32 on the CPU.

    Trainable modules start from ``--bundle`` when it has them (continuing or fine-tuning),
    else from a fresh initialisation seeded by ``train.seed``. With a condition, an
    unconditional diffusion UNet from the bundle gets zero-initialised extra input channels
    (:func:`widen_input`), so fine-tuning starts from exactly the unconditional model.
    """
    spec, cfg, meta = p.spec, p.cfg, p.bundle_meta
    have = set(meta.get("modules", [])) if p.bundle else set()
    torch.manual_seed(cfg.train.seed)
    trainable = nn.ModuleDict()
    for name in spec.trainable(p.condition):
        if name not in have:
            trainable[name] = build(name, cfg, condition=p.condition, num_classes=p.num_classes)
            continue
        module = load_module(p.bundle, name, cfg, meta)
        if p.condition and name in spec.trains and name not in meta.get("conditioned", []):
            widen_input(module, cfg.model.condition.channels)
        trainable[name] = module
    # Without a bundle (benchmarks only: plan() requires one) frozen modules are random.
    frozen = {
        name: load_module(p.bundle, name, cfg, meta) if p.bundle else build(name, cfg)
        for name in spec.frozen
    }
    for module in frozen.values():
        module.requires_grad_(False).eval()
    return trainable, frozen


class StageModel(nn.Module):
    """What the generator-side engine wraps: the trainable modules as one ModuleDict.

    ``forward`` runs the stage's step with the frozen modules and the discriminator added as
    plain attributes (not submodules), so DeepSpeed partitions and optimises only what trains.
    """

    def __init__(self, spec: StageSpec, trainable: nn.ModuleDict) -> None:
        super().__init__()
        self.spec = spec
        self.trainable = trainable
        self.others: dict[str, nn.Module] = {}

    def forward(self, batch: dict[str, torch.Tensor], ctx: StepContext) -> StepOutput:
        return self.spec.step({**self.others, **self.trainable}, batch, ctx)


def deepspeed_config(cfg: Config, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config of one engine: ZeRO stage, micro batch, accumulation, clipping."""
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        # Bucket sizes as accounted for by caldm.bench.memory (REDUCE_BUCKET).
        "zero_optimization": {
            "stage": t.zero_stage,
            "reduce_bucket_size": REDUCE_BUCKET,
            "allgather_bucket_size": REDUCE_BUCKET,
        },
        "bf16": {"enabled": bf16},
        # A torch optimizer: DeepSpeed's own ones compile fused kernels first (slow on CPU).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


@contextlib.contextmanager
def gathered(params: list[nn.Parameter], zero3: bool) -> Iterator[None]:
    """Full parameters inside the block on every rank (a collective under ZeRO-3)."""
    if not zero3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


class StageTrainer:
    """The engines, EMA and optimizer step of one stage on one worker.

    ``step(batches)`` is one optimizer step: ``train.grad_accum`` micro batches, each a
    generator-side forward/backward and, for a GAN stage once the adversarial loss is on, a
    discriminator forward/backward. DeepSpeed applies the update (with clipping) at the
    accumulation boundary.
    """

    def __init__(self, p: TrainPlan, device: torch.device) -> None:
        import deepspeed

        self.p, self.cfg, self.spec, self.device = p, p.cfg, p.spec, device
        self.bf16 = device.type == "cuda" or self.cfg.train.precision == "bf16"
        self.dtype = torch.bfloat16 if self.bf16 else torch.float32
        self.zero3 = self.cfg.train.zero_stage == 3
        trainable, frozen = build_stage_modules(p)
        # EMA (diffusion stages). ZeRO 0-2: a full float32 copy, taken before checkpointing
        # wraps forward methods (the copy would share them). ZeRO-3: each rank keeps the EMA of
        # its own fp32 partition only (set up below, once the engine has partitioned).
        self.ema = None
        self.ema_shards: list[torch.Tensor] | None = None
        if self.spec.diffusion and not self.zero3:
            self.ema = copy.deepcopy(trainable).float().to(device).requires_grad_(False)
        if self.cfg.train.activation_checkpointing:
            for module in [*trainable.values(), *frozen.values()]:
                if hasattr(module, "checkpoint_activations"):
                    module.checkpoint_activations()
        self.model = StageModel(self.spec, trainable)
        self.engine = self._engine(self.model, self.cfg.train.lr, (0.9, 0.999), deepspeed)
        self.model.others = {k: m.to(device, self.dtype) for k, m in frozen.items()}
        if self.spec.diffusion and self.zero3:
            params = self.model.trainable.parameters()
            self.ema_shards = [self._local_fp32(q).clone() for q in params]
        self.disc_engine = None
        if self.spec.gan:
            torch.manual_seed(self.cfg.train.seed + 1)
            disc = build("disc", self.cfg)
            # LDM's discriminator betas; a second engine so its ZeRO state is its own.
            self.disc_engine = self._engine(disc, self.cfg.train.disc_lr, (0.5, 0.9), deepspeed)
            self.model.others["disc"] = self.disc_engine.module
        self.ctx = StepContext(
            cfg=self.cfg,
            hybrid=HybridLoss(self.cfg.model.loss).to(device) if self.spec.gan else None,
            schedule=NoiseSchedule.from_config(self.cfg.diffusion) if self.spec.diffusion else None,
            latent_scale=p.latent_scale,
            condition=p.condition,
        )
        self.global_step = 0
        self.last: StepOutput | None = None
        self.last_batch: dict[str, torch.Tensor] = {}

    def _engine(self, module: nn.Module, lr: float, betas: tuple[float, float], deepspeed: Any):
        params = [q for q in module.parameters() if q.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=lr, betas=betas, weight_decay=self.cfg.train.weight_decay
        )
        engine, *_ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=deepspeed_config(self.cfg, self.bf16)
        )
        return engine

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            k: v.to(self.device, self.dtype if v.is_floating_point() else v.dtype)
            for k, v in batch.items()
        }

    def step(self, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, float]:
        """One optimizer step over ``train.grad_accum`` micro batches; returns mean loss parts."""
        self.ctx.step = self.global_step
        gan_on = self.disc_engine is not None and self.ctx.hybrid.adversarial_active(
            self.global_step
        )
        sums: dict[str, float] = {}
        accum = self.cfg.train.grad_accum
        for _ in range(accum):
            batch = self._to_device(next(batches))
            if self.disc_engine is not None:  # no discriminator gradients from the G loss
                self.disc_engine.module.requires_grad_(False)
            out = self.engine(batch, self.ctx)
            self.engine.backward(out.losses["loss"])
            self.engine.step()
            parts = {k: v.detach().float() for k, v in out.losses.items()}
            if gan_on:
                self.disc_engine.module.requires_grad_(True)
                d_loss = discriminator_loss(self.disc_engine.module, out)
                self.disc_engine.backward(d_loss)
                self.disc_engine.step()
                parts["d_loss"] = d_loss.detach().float()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v) / accum
            self.last, self.last_batch = out, batch
        self.global_step += 1
        if self.has_ema:
            self._update_ema()
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            sums["grad_norm"] = float(grad_norm)
        sums["lr"] = float(self.engine.get_lr()[0])
        return sums

    @property
    def has_ema(self) -> bool:
        return self.ema is not None or self.ema_shards is not None

    @staticmethod
    def _local_fp32(q: nn.Parameter) -> torch.Tensor:
        """This rank's fp32 partition of a ZeRO-3 parameter (the optimizer's master copy; the
        partition of the module's own tensor for one the optimizer does not hold)."""
        from deepspeed.utils import safe_get_local_fp32_param

        local = safe_get_local_fp32_param(q) if q.requires_grad else None
        return (q.ds_tensor if local is None else local).detach().float().flatten()

    @staticmethod
    def _gather_partition(q: nn.Parameter, shard: torch.Tensor) -> torch.Tensor:
        """The full tensor of ZeRO-3 parameter ``q`` from every rank's ``shard`` (a collective):
        partitions are equal-sized, in rank order, padded at the end."""
        import torch.distributed as dist

        parts = [torch.empty_like(shard) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, shard.contiguous())
        return torch.cat(parts)[: q.ds_numel].view(q.ds_shape)

    @torch.no_grad()
    def _update_ema(self) -> None:
        # Warm-up (as in diffusers): early EMA weights follow the model closely.
        n = self.global_step
        decay = min(self.cfg.train.ema_decay, (1 + n) / (10 + n))
        params = list(self.model.trainable.parameters())
        if self.ema_shards is not None:  # ZeRO-3: no gather, the fp32 master partition
            for e, q in zip(self.ema_shards, params):
                e.lerp_(self._local_fp32(q), 1.0 - decay)
            return
        with gathered(params, self.zero3):
            for e, q in zip(self.ema.parameters(), params):
                e.lerp_(q.detach().float(), 1.0 - decay)

    def _full_modules(self, values: Callable[[str, nn.Parameter], torch.Tensor]):
        """Fresh float32 CPU copies of the trainable modules with every parameter from
        ``values(name, param)`` and the buffers of the live modules."""
        states: dict[str, dict[str, torch.Tensor]] = {n: {} for n in self.model.trainable}
        for name, q in self.model.trainable.named_parameters():
            module, key = name.split(".", 1)
            states[module][key] = values(name, q).detach().float().cpu().clone()
        for name, b in self.model.trainable.named_buffers():
            module, key = name.split(".", 1)
            states[module][key] = b.detach().cpu().clone()
        out: dict[str, nn.Module] = {}
        for name, state in states.items():
            fresh = build(name, self.cfg, self.p.condition, self.p.num_classes)
            fresh.load_state_dict(state)
            out[name] = fresh.requires_grad_(False)
        return out

    def ema_modules(self) -> dict[str, nn.Module] | nn.ModuleDict:
        """The full float32 EMA modules on every rank (a collective under ZeRO-3)."""
        if self.ema is not None:
            return self.ema
        shards = dict(zip([n for n, _ in self.model.trainable.named_parameters()],
                          self.ema_shards))  # fmt: skip
        nets = self._full_modules(lambda n, q: self._gather_partition(q, shards[n]))
        return {k: m.to(self.device) for k, m in nets.items()}

    # ------------------------------------------------------------ checkpoints and export

    def save(self, directory: str) -> None:
        """Every rank writes its shard of both engines under ``directory`` (a collective)."""
        state: dict[str, Any] = {"step": self.global_step}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.ema_shards is not None:  # ZeRO-3: each rank's own file holds its partition
            state["ema_shards"] = [e.cpu() for e in self.ema_shards]
        self.engine.save_checkpoint(join(directory, "model"), tag="state", client_state=state)
        if self.disc_engine is not None:
            self.disc_engine.save_checkpoint(join(directory, "disc"), tag="state")

    def load(self, directory: str) -> int:
        """Restore engines, optimizer shards and EMA; returns the checkpoint's step."""
        path, state = self.engine.load_checkpoint(join(directory, "model"), tag="state")
        if path is None:
            raise BundleError(f"{directory}: unreadable DeepSpeed checkpoint")
        if self.disc_engine is not None:
            self.disc_engine.load_checkpoint(join(directory, "disc"), tag="state")
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if self.ema_shards is not None:
            for e, saved in zip(self.ema_shards, state["ema_shards"], strict=True):
                e.copy_(saved)
        self.global_step = int(state["step"])
        return self.global_step

    def exported(self) -> dict[str, nn.Module]:
        """The weights to export, full and float32 on every rank (a collective): the EMA for
        diffusion stages, else the optimizer's fp32 master weights (not the bf16 copies the
        engine computes with)."""
        if self.has_ema:
            return {k: m.cpu() for k, m in self.ema_modules().items()}
        from deepspeed.utils import safe_get_full_fp32_param

        def master(name: str, q: nn.Parameter) -> torch.Tensor:
            full = safe_get_full_fp32_param(q) if q.requires_grad else None
            if full is not None:
                return full
            with gathered([q], self.zero3):  # not in the optimizer: the module's own value
                return q.detach().float().clone()

        return self._full_modules(master)


def export_bundle(p: TrainPlan, trained: dict[str, nn.Module]) -> None:
    """Write ``<out>/bundle``: the trained modules plus every other module of ``--bundle``
    (frozen ones included), its latent scales and condition, so the next stage or the
    sampler can use it alone."""
    meta, inherited = p.bundle_meta, {}
    if p.bundle:
        for name in bundle_modules(p.bundle):
            if name not in trained:
                inherited[name] = load_module(p.bundle, name, p.cfg, meta)
    conditioned = [p.stage] if p.condition else []
    meta_update: dict[str, Any] = {
        k: meta[k] for k in ("latent_scale", "conditioned", "condition", "num_classes") if k in meta
    }
    if p.spec.diffusion:
        meta_update["latent_scale"] = {**meta.get("latent_scale", {}), p.stage: p.latent_scale}
    _save_bundle(
        p.bundle_out,
        p.cfg,
        {**inherited, **trained},
        condition=p.condition or meta.get("condition"),
        num_classes=p.num_classes if p.condition else meta.get("num_classes"),
        conditioned=conditioned,
        meta_update=meta_update,
    )


# ------------------------------------------------------------------------ the train loop


def training_dataset(
    stage: str,
    data: str,
    cfg: Config,
    condition: str | None,
    exclude_ids: tuple[str, ...] = (),
    rank: int = 0,
    world: int = 1,
    seed: int = 0,
):
    """The stage's stream without the held-out ``exclude_ids``; a DataError naming ``data``
    when too few ids remain to give every rank one."""
    dataset = stage_dataset(stage, data, cfg, condition, rank, world, seed)
    if exclude_ids:
        dataset.ids = [i for i in dataset.ids if i not in set(exclude_ids)]
        if len(dataset.ids) < world:
            raise DataError(
                data,
                f"{len(dataset.ids)} volumes left for training after holding out "
                f"{len(exclude_ids)}; need at least {world}",
            )
    return dataset


def _batches(p: TrainPlan, rank: int, world: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    from torch.utils.data import DataLoader

    dataset = training_dataset(
        p.stage, p.data, p.cfg, p.condition, p.exclude_ids, rank, world, seed
    )
    workers = p.cfg.data.num_workers
    loader = DataLoader(
        dataset,
        batch_size=p.cfg.train.micro_batch,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
    yield from loader


def _preview(out: StepOutput, batch: dict[str, torch.Tensor]):
    """A PIL image: real (top) vs reconstructed (bottom) slices; for the diffusion stages the
    channels of the (middle) latent slice being learnt."""
    import numpy as np
    from PIL import Image

    def tiles(x: torch.Tensor) -> np.ndarray:  # (N, H, W) in [-1, 1] -> a row of tiles
        x = x.detach().float().cpu().clamp(-1, 1)
        return np.concatenate(list(((x + 1) * 127.5).round().byte().numpy()), axis=1)

    if out.preview:
        rows = [tiles(v[:4, 0]) for v in out.preview.values()]
    else:  # diffusion: the channels of one (middle) latent slice, scaled to unit variance
        z = batch["z"][0] if "z" in batch else batch["z_hr"][0]
        z = z[:, z.shape[1] // 2] if z.dim() == 4 else z
        rows = [tiles(torch.tanh(z / (z.std() + 1e-6) / 2))]
    return Image.fromarray(np.concatenate(rows, axis=0), mode="L")


def train_loop(p: TrainPlan) -> None:
    """Runs on every Ray Train worker: resume, train to ``train.max_steps``, checkpoint, export."""
    import ray.train
    import ray.train.torch

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    cfg = p.cfg
    trainer = StageTrainer(p, device)

    resumed_from = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            resumed_from = trainer.load(directory)
        if rank == 0:
            log.warning("%s: resumed from step %d (%s)", p.stage, resumed_from, checkpoint.path)
    # A different data order after a resume: the stream restarts with a step-dependent seed.
    torch.manual_seed(cfg.train.seed + 1000 * rank + resumed_from)
    batches = iter(_batches(p, rank, world, cfg.train.seed + resumed_from))
    fail_after = int(os.environ.get(FAIL_AFTER_STEP_ENV, "-1"))
    samples_per_step = cfg.train.micro_batch * cfg.train.grad_accum * world

    def report(metrics: dict[str, float]) -> None:
        if p.evaluate is not None:  # every rank: evaluation may gather ZeRO-3 partitions
            evaluated = p.evaluate(trainer)
            metrics = {**metrics, **evaluated}
            if rank == 0:
                tracking.log_metrics(evaluated, step=trainer.global_step)
        directory = tempfile.mkdtemp(prefix="caldm-ckpt-")
        try:
            trainer.save(directory)
            ray.train.report(
                {**metrics, "step": trainer.global_step, "resumed_from_step": resumed_from},
                checkpoint=ray.train.Checkpoint.from_directory(directory),
            )
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    with contextlib.ExitStack() as stack:
        if rank == 0:
            from caldm.distributed import tracking

            params = cfg.flat()
            if trainer.ctx.hybrid is not None:  # which perceptual term, "auto" resolved
                params["perceptual_in_use"] = trainer.ctx.hybrid.perceptual_kind
                print(f"{p.stage}: perceptual term {params['perceptual_in_use']}")
            stack.enter_context(
                tracking.start_run(
                    p.out, p.experiment, p.run_name or p.stage, params, p.mlflow_run_id
                )
            )
        metrics: dict[str, float] = {}
        speed: list[float] = []
        while trainer.global_step < cfg.train.max_steps:
            start = time.perf_counter()
            metrics = trainer.step(batches)
            elapsed = time.perf_counter() - start
            speed.append(samples_per_step / elapsed)
            metrics["samples_per_s"] = speed[-1]
            step = trainer.global_step
            if rank == 0:
                tracking.log_metrics(metrics, step=step)
                if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                    parts = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                    log.warning("%s step %d/%d %s", p.stage, step, cfg.train.max_steps, parts)
                if step % cfg.train.preview_every == 0 or step == 1:
                    image = _preview(trainer.last, trainer.last_batch)
                    tracking.log_image(image, f"previews/step_{step:07d}.png")
            if step % cfg.train.checkpoint_every == 0 or step == cfg.train.max_steps:
                # Steady-state speed: the first steps include warm-up (allocations, compiles).
                metrics["mean_samples_per_s"] = sum(speed[1:] or speed) / len(speed[1:] or speed)
                report(metrics)
                if step == fail_after:
                    raise RuntimeError(f"{FAIL_AFTER_STEP_ENV}={fail_after}: simulated failure")
        if not metrics:  # resumed at max_steps already: report once so the run has a result
            report({})
        trained = trainer.exported()
        if rank == 0:
            export_bundle(p, trained)


def _worker(config: dict[str, Any]) -> None:
    train_loop(config["plan"])


# ------------------------------------------------------------------------ the driver


def _storage(out: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray: a local path, or a pyarrow view of the
    fsspec filesystem of a URL (s3fs reads AWS_ENDPOINT_URL; pyarrow's own S3 would not)."""
    if "://" not in out:
        return out, None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = fsspec.core.url_to_fs(out)
    return path, PyFileSystem(FSSpecHandler(fs))


def _root_cause(exc: BaseException) -> str:
    """The last ``SomeError: message`` line of a (Ray-wrapped) worker traceback."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception|Failed)\b.*:", line):
            return line
    return lines[-1] if lines else type(exc).__name__


def train(req: TrainRequest) -> dict[str, Any]:
    """Check, train (or resume), export; returns the summary also written to
    ``<out>/summary.json``: stage, global_step, resumed_from_step, checkpoint, bundle, and
    the last loss and steady-state samples_per_s of this invocation."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from caldm.distributed import tracking

    p = plan(req)
    ray = ensure_ray()
    tracking.check_store(p.out, nodes=sum(1 for n in ray.nodes() if n.get("Alive")))
    # One MLflow run per run directory: created here (the driver), continued on every resume.
    p.mlflow_run_id = tracking.open_run_id(
        p.out, p.experiment, p.run_name or p.stage, p.mlflow_run_id
    )
    write_json(join(p.out, "run.json"), run_record(p))
    storage_path, storage_fs = _storage(p.out)
    use_gpu = p.gpus_per_worker > 0
    resources = {"CPU": 1, **({"GPU": p.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"plan": p},
        scaling_config=ScalingConfig(
            num_workers=p.workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            accelerator_type=req.accelerator_type,
        ),
        run_config=RunConfig(
            name=p.stage,  # fixed: a rerun finds this run's checkpoints and resumes
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=p.cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # Endpoints and settings only: no credential is ever a runtime-env value.
            worker_runtime_env={"env_vars": worker_env()},
            callbacks=list(req.callbacks) or None,
        ),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps the workers' exceptions: name the root cause
        raise TrainingFailed(
            f"{p.out}: stage {p.stage} failed ({_root_cause(exc)}); rerun the same command "
            "to resume from the newest checkpoint"
        ) from exc
    ckpt = result.checkpoint.path
    summary = {
        "stage": p.stage,
        "global_step": int(result.metrics["step"]),
        "resumed_from_step": int(result.metrics["resumed_from_step"]),
        "checkpoint": ckpt if storage_fs is None else f"{p.out.split('://')[0]}://{ckpt}",
        "bundle": p.bundle_out,
        "loss": result.metrics.get("loss"),
        "samples_per_s": result.metrics.get("mean_samples_per_s"),
    }
    write_json(join(p.out, "summary.json"), summary)
    return summary
