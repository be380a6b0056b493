"""What a training run is, checked on the driver before anything starts (:func:`plan`).

:class:`TrainRequest` is the command line of ``jobs/train_stage.py``; :func:`plan` checks every
input (config, bundle, data, ``--out``, a previous run there) and resolves it into a
:class:`TrainPlan`, which the Ray workers of :mod:`caldm.distributed.train` receive.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caldm.bundle import Bundle, nhae_hash, open_bundle
from caldm.config import Config, load_config
from caldm.data.io import join_url as join
from caldm.data.io import list_dir, read_json
from caldm.data.latents import check_nhae, latent_stats
from caldm.errors import BundleError, CaldmError, ConfigError, DataError
from caldm.stages import (
    STAGES,
    StageSpec,
    stage_dataset,
)

if TYPE_CHECKING:
    from caldm.distributed.engine import StageTrainer

log = logging.getLogger("caldm.train")

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
    bundle: str | Bundle | None = None  # a URL, or the bundle opened already
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
    bundle: Bundle | None  # --bundle, opened: config and meta (workers load its modules)
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


def opened(bundle: str | Bundle) -> Bundle:
    """``bundle`` opened (its config and meta read once; a local path made absolute first);
    a :class:`Bundle` as it is."""
    return bundle if isinstance(bundle, Bundle) else open_bundle(absolute(bundle))


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
        keys = sorted(  # --zero-stage is named above
            k for k in {*old, *new} if old.get(k) != new.get(k) and k != "train.zero_stage"
        )
        changes += [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys]
        if not changes:  # a run.json of before the config was recorded
            changes.append("the config")
    if changes:
        raise ConfigError(
            f"{join(out, 'run.json')}: its checkpoints were made with other settings "
            f"({'; '.join(changes[:4])}); rerun with the original ones to resume, "
            "or choose another --out"
        )


def _layer_classes(latents: str, bundle: Bundle | None) -> int:
    """Layer classes of a layers-conditioned run: counted in the labels of the dataset the
    latents (a latent cache or a corpus) were made from; a bundle already conditioned on layers
    must agree with them."""
    from caldm.data import corpus
    from caldm.data.datasets import num_layer_classes
    from caldm.data.latents import read_latent_source

    if corpus.is_corpus(latents):
        source = corpus.read_manifest(latents)["data"]
    else:
        source = read_latent_source(latents)["data"]
    classes = num_layer_classes(source)
    meta = bundle.meta if bundle is not None else {}
    have = meta.get("num_classes") if meta.get("condition") == "layers" else None
    if have is not None and int(have) != classes:
        raise DataError(
            f"{source.rstrip('/')}/labels/layers",
            f"labels have {classes} layer classes, but bundle {bundle.url} was conditioned on "
            f"{have}; use labels with {have} classes or a bundle trained on these",
        )
    return classes


def _check_bundle_model(bundle: Bundle, cfg: Config, fresh: tuple[str, ...] = ()) -> Config:
    """The run's config; a ConfigError when the bundle's networks differ from the run's.

    ``fresh`` names modules the run trains from scratch (absent from the bundle): the config
    keys that shape only them may differ.
    """
    have = bundle.cfg.flat()
    free = _MODEL_KEYS_FREE + tuple(k for m in fresh for k in _MODEL_KEYS_OF.get(m, ()))
    for key, value in cfg.flat().items():
        if key.startswith("model.") and not key.startswith(free):
            if have.get(key) != value:
                raise ConfigError(
                    f"{bundle.url}: bundle was made for another model ({key} = {have.get(key)!r}, "
                    f"this run has {value!r}); use the bundle's settings (--preset "
                    f"{have.get('preset')}, --set {key}=...), or a bundle of this preset"
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
    previous = read_json(join(out, "run.json"))
    if previous is not None and (
        previous.get("stage") != req.stage or previous.get("condition") != req.condition
    ):
        raise ConfigError(
            f"{join(out, 'run.json')}: --out holds a run of stage {previous.get('stage')!r} "
            f"(condition {previous.get('condition')}); choose another --out"
        )

    bundle = opened(req.bundle) if req.bundle else None
    needed = spec.needs(req.condition)
    if needed and bundle is None:
        raise BundleError(f"stage {req.stage} needs --bundle with {', '.join(needed)}")
    if bundle is not None:
        what = f"stage {req.stage} (frozen: {', '.join(spec.frozen) or 'none'})"
        if req.condition:
            what += f" with --condition (starts from the unconditional {spec.trains[0]})"
        bundle.require(needed, what)
        meta = bundle.meta
        fresh = tuple(m for m in spec.trains if m not in meta.get("modules", []))
        _check_bundle_model(bundle, cfg, fresh)
        conditioned = spec.diffusion and spec.trains[0] in meta.get("conditioned", [])
        if req.condition and meta.get("condition") not in (None, req.condition):
            raise BundleError(
                f"{bundle.url}: bundle is conditioned on {meta['condition']}, not {req.condition}"
            )
        if conditioned and not req.condition:
            raise BundleError(
                f"{bundle.url}: its {spec.trains[0]} is label-conditioned on {meta['condition']}; "
                f"pass --condition {meta['condition']}"
            )

    exclude = tuple(req.exclude_ids)
    if req.ids is not None:  # --ids: everything else is held out
        from caldm.data.latents import parse_view
        from caldm.data.layout import select_ids

        listed = sorted({parse_view(i)[0] for i in stage_dataset(req.stage, data, cfg, None).ids})
        keep = select_ids(listed, list(req.ids), what=f"--ids (volumes of {data})")
        exclude += tuple(i for i in listed if i not in set(keep))
    num_classes = None
    latent_scale = 1.0
    if spec.diffusion:
        if req.condition == "layers":  # before the dataset: a corpus's label shape has them
            num_classes = _layer_classes(data, bundle)
            cfg.model.condition.layer_classes = num_classes
        training_dataset(req.stage, data, cfg, req.condition, exclude, 0, req.workers)
        std = latent_stats(data)["z" if req.stage == "diff3d" else "z_hr"]["std"]
        if bundle is not None and set(spec.encoders) <= set(bundle.meta.get("sha256", {})):
            check_nhae(data, nhae_hash(bundle))  # latents of this bundle's NHAE
        latent_scale = 1.0 / max(float(std), 1e-8)
    else:
        training_dataset(req.stage, data, cfg, None, exclude, 0, req.workers)

    p = TrainPlan(
        stage=req.stage,
        cfg=cfg,
        data=data,
        out=out,
        bundle=bundle,
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
    from caldm.data.latents import parse_view

    dataset = stage_dataset(stage, data, cfg, condition, rank, world, seed)
    if exclude_ids:  # a held-out volume's shifted views (latent caches) are held out with it
        held = set(exclude_ids)
        dataset.ids = [i for i in dataset.ids if parse_view(i)[0] not in held]
        if len(dataset.ids) < world:
            raise DataError(
                data,
                f"{len(dataset.ids)} volumes left for training after holding out "
                f"{len(exclude_ids)}; need at least {world}",
            )
    return dataset
