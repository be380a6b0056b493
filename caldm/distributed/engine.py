"""One rank of a training run: the stage's modules, their DeepSpeed engines and EMA weights.

:class:`StageTrainer` is what every Ray Train worker of :mod:`caldm.distributed.train` steps
(and what ``benchmarks/train_throughput.py`` runs in-process); :func:`export_bundle` writes the
trained modules (EMA weights of a diffusion stage) with the inherited ones.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from caldm.bundle import save_bundle as _save_bundle
from caldm.config import Config
from caldm.data.io import join_url as join
from caldm.diffusion.schedule import NoiseSchedule
from caldm.distributed.plan import TrainPlan
from caldm.errors import BundleError
from caldm.nn.factory import build
from caldm.nn.losses import HybridLoss
from caldm.nn.nets.diffusion_unet import widen_input
from caldm.stages import (
    REDUCE_BUCKET,
    StageSpec,
    StepContext,
    StepOutput,
    discriminator_loss,
    train_dtype,
)

log = logging.getLogger("caldm.train")


# ------------------------------------------------------------------------ modules


def build_stage_modules(p: TrainPlan) -> tuple[nn.ModuleDict, dict[str, nn.Module]]:
    """(trainable, frozen) modules of a stage, in float32 on the CPU.

    Trainable modules start from ``--bundle`` when it has them (continuing or fine-tuning),
    else from a fresh initialisation seeded by ``train.seed``. With a condition, an
    unconditional diffusion UNet from the bundle gets zero-initialised extra input channels
    (:func:`widen_input`), so fine-tuning starts from exactly the unconditional model.
    """
    spec, cfg, bundle = p.spec, p.cfg, p.bundle
    have = set(bundle.names) if bundle else set()
    torch.manual_seed(cfg.train.seed)
    trainable = nn.ModuleDict()
    for name in spec.trainable(p.condition):
        if name not in have:
            trainable[name] = build(name, cfg, condition=p.condition, num_classes=p.num_classes)
            continue
        module = bundle.fresh(name, cfg)
        if p.condition and name in spec.trains and name not in bundle.meta.get("conditioned", []):
            widen_input(module, cfg.model.condition.channels)
        trainable[name] = module
    # Without a bundle (benchmarks only: plan() requires one) frozen modules are random.
    frozen = {name: bundle.fresh(name, cfg) if bundle else build(name, cfg) for name in spec.frozen}
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


def warmup_schedule(
    optimizer: torch.optim.Optimizer, steps: int
) -> torch.optim.lr_scheduler.LambdaLR | None:
    """Linear warm-up to the optimizer's lr over ``steps`` optimizer steps (None for 0).

    DeepSpeed steps it with the optimizer and keeps its state in the checkpoint, so a resumed
    run continues the ramp where it stopped.
    """
    if steps <= 0:
        return None
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / steps))


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

        if device.type == "cpu":
            # DeepSpeed compiles a shared-memory allreduce for CPU on first use: a minute on
            # a fresh machine, and a build killed midway leaves a lock that every later run
            # waits on forever. gloo does the same reductions here.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self.p, self.cfg, self.spec, self.device = p, p.cfg, p.spec, device
        self.dtype = train_dtype(self.cfg)
        self.bf16 = self.dtype == torch.bfloat16
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
            model=module,
            optimizer=optimizer,
            lr_scheduler=warmup_schedule(optimizer, self.cfg.train.warmup_steps),
            config=deepspeed_config(self.cfg, self.bf16),
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
    meta = p.bundle.meta if p.bundle else {}
    inherited = {
        name: p.bundle.fresh(name, p.cfg)
        for name in (p.bundle.names if p.bundle else [])
        if name not in trained
    }
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
