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
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import fsspec
import torch

from caldm.data.io import join_url as join
from caldm.data.io import write_json
from caldm.distributed.cluster import ensure_ray, spanned_nodes, worker_env
from caldm.distributed.engine import (
    StageModel,
    StageTrainer,
    build_stage_modules,
    deepspeed_config,
    export_bundle,
    gathered,
)
from caldm.distributed.plan import (
    Evaluate,
    TrainingFailed,
    TrainPlan,
    TrainRequest,
    absolute,
    check_resume,
    has_checkpoint,
    plan,
    run_record,
    training_dataset,
)
from caldm.errors import root_cause
from caldm.stages import (
    StepOutput,
)

# Re-exported: callers import the training API from this module.
__all__ = [
    "Evaluate",
    "StageModel",
    "StageTrainer",
    "TrainPlan",
    "TrainRequest",
    "TrainingFailed",
    "absolute",
    "build_stage_modules",
    "check_resume",
    "deepspeed_config",
    "export_bundle",
    "gathered",
    "has_checkpoint",
    "plan",
    "run_record",
    "train",
    "train_loop",
    "training_dataset",
]

log = logging.getLogger("caldm.train")

#: Test hook: a worker raises right after reporting the checkpoint of this step (a "kill").
FAIL_AFTER_STEP_ENV = "CALDM_FAIL_AFTER_STEP"


# ------------------------------------------------------------------------ the train loop


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


def train(req: TrainRequest) -> dict[str, Any]:
    """Check, train (or resume), export; returns the summary also written to
    ``<out>/summary.json``: stage, global_step, resumed_from_step, checkpoint, bundle, and
    the last loss and steady-state samples_per_s of this invocation."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from caldm.distributed import tracking

    p = plan(req)
    ensure_ray()
    tracking.check_store(p.out, spanned_nodes())
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
            f"{p.out}: stage {p.stage} failed ({root_cause(exc)}); rerun the same command "
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
