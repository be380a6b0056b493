"""What one trial of a sweep runs: the stage trainer with the trial's values, and the
held-out validation its workers report to Tune (:mod:`caldm.distributed.tune` drives them)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from caldm.data.io import join_url as join
from caldm.distributed.train import StageTrainer, TrainRequest, gathered
from caldm.search_space import overrides_of

if TYPE_CHECKING:  # tune imports this module
    from caldm.bundle import Bundle
    from caldm.distributed.tune import SweepRequest


@dataclass
class HeldOutValidation:
    """The trained stage's ``validate`` on its ``held_out`` batch
    (:class:`~caldm.stages.StageSpec`) on every rank of a trial, with the weights the stage
    exports: a diffusion stage's float32 EMA, else its trained modules with their ZeRO-3
    partitions gathered. The held-out batch is built once per trial."""

    data: str
    ids: tuple[str, ...]
    condition: str | None = None
    seed: int = 0
    _batch: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @torch.no_grad()
    def __call__(self, trainer: StageTrainer) -> dict[str, float]:
        spec = trainer.spec
        if not self._batch:
            self._batch = spec.held_out(self.data, self.ids, trainer.cfg, self.condition, self.seed)
        batch = {k: v.to(trainer.device) for k, v in self._batch.items()}
        if spec.diffusion:
            return spec.validate(trainer.ema_modules(), batch, trainer.ctx)
        trained = trainer.model.trainable
        with gathered(list(trained.parameters()), trainer.zero3):
            return spec.validate({**trainer.model.others, **trained}, batch, trainer.ctx)


def train_request(
    req: SweepRequest,
    data: str,
    out: str,
    bundle: str | Bundle | None,
    overrides: list[str],
    exclude: tuple[str, ...],
    **hooks: Any,
) -> TrainRequest:
    """The TrainRequest of one trial of ``req``, writing to ``out``."""
    return TrainRequest(
        stage=req.target,
        data=data,
        out=out,
        preset=req.preset,
        bundle=bundle,
        condition=req.condition,
        overrides=tuple(overrides),
        workers=req.workers_per_trial,
        gpus_per_worker=req.gpus_per_worker,
        max_steps=req.max_steps,
        exclude_ids=exclude,
        **hooks,
    )


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a sweep shares (shipped to the trial actors by Tune)."""

    req: SweepRequest
    data: str
    out: str
    bundle: str | None
    base_overrides: tuple[str, ...]
    holdout_ids: tuple[str, ...]
    evaluate: Callable[[StageTrainer], dict[str, float]]
    tracking_uri: str


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune function trainable: one stage run with the trial's values.

    The run lives in ``<out>/trials/<trial_id>`` under a fixed Ray Train name, so a resumed
    sweep restarts an unfinished trial from its newest checkpoint.
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from caldm.distributed.train import train

    context = tune.get_context()
    request = train_request(
        setup.req,
        setup.data,
        join(setup.out, "trials", context.get_trial_id()),
        setup.bundle,
        [*setup.base_overrides, *overrides_of(config)],
        setup.holdout_ids,
        evaluate=setup.evaluate,
        callbacks=(TuneReportCallback(),),
        experiment=f"caldm-sweep-{setup.req.target}",
        run_name=context.get_trial_name(),
    )
    # One MLflow database for the sweep, forwarded to the train workers with MLFLOW_*; set
    # only for this call, since the process may be reused for other work afterwards.
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = setup.tracking_uri
    try:
        train(request)
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous
