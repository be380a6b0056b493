"""Peak memory of each training stage and of sampling, counted on the meta device.

A training step is counted for one worker with the preset's default settings (precision,
activation checkpointing, micro-batch): the real stage step of :mod:`caldm.stages` runs forward
and backward (and the discriminator's step in GAN stages) under :class:`PeakMemory`, on top of a
static part that exists for the whole run:

- weights of every module the stage holds (trained, frozen, discriminator), in the run dtype;
- optimizer state for the trained ones: AdamW moments in fp32 (8 B/param), plus, in bf16 runs,
  DeepSpeed's fp32 master weights and fp32 gradient partition (8 B/param);
- DeepSpeed's gradient reduce bucket (``REDUCE_BUCKET`` elements in the run dtype) and, for
  the diffusion stages, an fp32 EMA copy of the trained weights.

Sampling runs the streaming pipeline itself on the meta device with one denoising step per
diffusion process (peak memory does not depend on the step count).
"""

from __future__ import annotations

from typing import Any

import torch

from caldm.bench.meta import PeakMemory, module_bytes
from caldm.config import STAGES as STAGE_NAMES
from caldm.config import Config, preset
from caldm.diffusion.schedule import NoiseSchedule
from caldm.nn.factory import build
from caldm.nn.losses import HybridLoss
from caldm.stages import (
    REDUCE_BUCKET,
    STAGES,
    StepContext,
    discriminator_loss,
    train_dtype,
)

GIB = 2**30


def stage_step_setup(stage: str, cfg: Config, condition: str | None = None) -> dict[str, Any]:
    """What one training step of ``stage`` runs, on the meta device: ``mods`` (in the run
    dtype, trainables requiring grad, checkpointing as configured), ``ctx``, ``batch``,
    ``trained`` and ``dtype``. Shared by the memory and FLOP accounting."""
    spec = STAGES[stage]
    dtype = train_dtype(cfg)
    trained = spec.trainable(condition)
    with torch.device("meta"):
        mods = {
            name: build(name, cfg, condition=condition if name in trained else None)
            for name in (*trained, *spec.frozen)
        }
        if spec.gan:
            mods["disc"] = build("disc", cfg)
    for name, module in mods.items():
        module.to(dtype)
        module.requires_grad_(name in trained or name == "disc")
        if cfg.train.activation_checkpointing and hasattr(module, "checkpoint_activations"):
            module.checkpoint_activations()
    ctx = StepContext(
        cfg,
        step=cfg.model.loss.adv_start_step,  # the discriminator is active: the worst case
        hybrid=HybridLoss(cfg.model.loss.model_copy(update={"perceptual_weights_path": None})),
        schedule=NoiseSchedule.from_config(cfg.diffusion),
        condition=condition,
    )
    batch = spec.example_batch(cfg, device="meta", dtype=dtype, condition=condition)
    return {"mods": mods, "ctx": ctx, "batch": batch, "trained": trained, "dtype": dtype}


def run_step(stage: str, setup: dict[str, Any]) -> None:
    """Forward and backward of one step (and the discriminator's, in GAN stages)."""
    spec = STAGES[stage]
    out = spec.step(setup["mods"], setup["batch"], setup["ctx"])
    out.losses["loss"].backward()
    if spec.gan:
        del out.losses
        discriminator_loss(setup["mods"]["disc"], out).backward()


def stage_peak_bytes(stage: str, cfg: Config, condition: str | None = None) -> dict[str, int]:
    """Peak bytes of one training step of ``stage`` on one worker, with its parts."""
    spec = STAGES[stage]
    setup = stage_step_setup(stage, cfg, condition)
    mods, trained, dtype = setup["mods"], setup["trained"], setup["dtype"]
    n_train = sum(
        p.numel() for n, m in mods.items() if n in trained or n == "disc" for p in m.parameters()
    )
    weights = module_bytes(*mods.values())
    optimizer = n_train * (16 if dtype == torch.bfloat16 else 8)
    buckets = min(REDUCE_BUCKET, n_train) * dtype.itemsize  # grads gathered for reduction
    ema = 4 * sum(p.numel() for n in trained for p in mods[n].parameters()) if spec.diffusion else 0
    static = weights + optimizer + buckets + ema
    with PeakMemory(static) as pm:
        run_step(stage, setup)
    return {
        "peak": pm.peak,
        "weights": weights,
        "optimizer": optimizer,
        "buckets": buckets,
        "ema": ema,
        "activations": pm.peak - static,
    }


def stage_step_flops(stage: str, cfg: Config, condition: str | None = None) -> int:
    """FLOPs of one training step of ``stage`` (``cfg.train.micro_batch`` items, forward,
    backward, checkpointing's recomputation and the discriminator), counted on meta."""
    from torch.utils.flop_counter import FlopCounterMode

    setup = stage_step_setup(stage, cfg, condition)
    with FlopCounterMode(display=False) as counter:
        run_step(stage, setup)
    return int(counter.get_total_flops())


def sampling_peak_bytes(cfg: Config, condition: str | None = None) -> int:
    """Peak bytes of streaming sampling (one volume), from the pipeline run on meta."""
    from caldm.bench.sampling import sampling_memory

    return sampling_memory(cfg, condition=condition)["peak"]


# The label-guided rows count this many layer classes: the most of the datasets caldm is run on.
CONDITIONED_CLASSES = 11


def memory_report(preset_name: str) -> dict[str, Any]:
    """``{"train": {stage: bytes}, "sample": bytes, "details": {...}}`` for a preset."""
    cfg = preset(preset_name)
    details = {stage: stage_peak_bytes(stage, cfg) for stage in STAGE_NAMES}
    guided = cfg.model_copy(deep=True)
    guided.model.condition.layer_classes = CONDITIONED_CLASSES
    tuned = ("diff3d", "refiner")
    return {
        "train": {stage: d["peak"] for stage, d in details.items()},
        "sample": sampling_peak_bytes(cfg),
        "conditioned": {  # label-guided (layers) fine-tunes and sampling
            "layer_classes": CONDITIONED_CLASSES,
            "train": {s: stage_peak_bytes(s, guided, "layers")["peak"] for s in tuned},
            "sample": sampling_peak_bytes(guided, "layers"),
        },
        "details": details,
        "settings": {
            "precision": cfg.train.precision,
            "activation_checkpointing": cfg.train.activation_checkpointing,
            "micro_batch": cfg.train.micro_batch,
            "slices_per_volume": cfg.data.slices_per_volume,
        },
    }


def print_memory_report(preset_name: str, report: dict[str, Any]) -> None:
    s = report["settings"]
    print(
        f"preset {preset_name}: one worker, {s['precision']}, activation checkpointing "
        f"{'on' if s['activation_checkpointing'] else 'off'}, micro-batch {s['micro_batch']}"
    )
    head = ("stage", "peak GiB", "weights", "optimizer", "buckets", "ema", "activations")
    print("  " + "".join(f"{h:>12}" for h in head))
    for stage, d in report["details"].items():
        row = [
            d[k] / GIB for k in ("peak", "weights", "optimizer", "buckets", "ema", "activations")
        ]
        print(f"  {stage:>12}" + "".join(f"{v:>12.2f}" for v in row))
    print(f"  {'sample':>12}{report['sample'] / GIB:>12.2f}")
    guided = report["conditioned"]
    print(f"  label-guided (layers, {guided['layer_classes']} classes):")
    for stage, peak in guided["train"].items():
        print(f"  {stage:>12}{peak / GIB:>12.2f}")
    print(f"  {'sample':>12}{guided['sample'] / GIB:>12.2f}")
