"""Ray Tune sweeps of the adaptor and refiner hyperparameters (``tuning/sweep.py``).

Each trial is one run of the stage trainer of ``jobs/train_stage.py`` (:func:`train`: a
TorchTrainer with DeepSpeed engines) started from a Tune function trainable, the Ray 2.60
pattern; ``TuneReportCallback`` forwards the workers' reports to Tune. At every checkpoint the
trial's workers evaluate on held-out volumes (the last ``holdout`` ids, never trained on) with
the target stage's own ``validate`` (:class:`~caldm.stages.StageSpec`); the search space is
parsed by :mod:`caldm.search_space`.

ASHA stops poor trials; ``concurrency`` trials run at once (the caller's choice, never read
from the resources present at start: on an autoscaling cluster the pending trials grow it).
Every trial is one MLflow run (experiment ``caldm-sweep-<target>``). Layout of ``<out>``::

    sweep.json          what was swept (a rerun must match it)
    <target>/           the Tune experiment (a rerun with the same --out resumes it)
    trials/<trial_id>/  each trial's train run (checkpoints, bundle, summary.json)
    base_bundle/        the frozen modules every trial starts from (adaptor, conditioned refiner)
    best.yaml           the best trial's full config, for jobs/train_stage.py --config
    trials.csv          one row per trial: status (done, stopped by ASHA, error), last step,
                        last metrics, searched values
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from typing import Any

from caldm.bundle import Bundle
from caldm.config import load_config
from caldm.data.io import join_url as join
from caldm.data.io import read_json, write_bytes, write_json
from caldm.data.latents import cached_ids
from caldm.data.layout import DatasetLayout
from caldm.distributed.plan import opened
from caldm.distributed.train import _storage, absolute, plan
from caldm.distributed.trial import HeldOutValidation, TrialSetup, run_trial, train_request
from caldm.errors import CaldmError, ConfigError, DataError, root_cause
from caldm.search_space import Domain, decode, load_space, overrides_of
from caldm.stages import STAGES
from caldm.validation import METRIC

log = logging.getLogger("caldm.sweep")

TARGETS = tuple(name for name, spec in STAGES.items() if spec.validate)  # adaptor, refiner
SEARCHES = ("random", "optuna")


class SweepFailed(CaldmError):
    """No trial of a sweep finished with a validation metric."""

    exit_code = 1


def tune_domain(domain: Domain) -> Any:
    """The Tune domain of a searched key. Choices are encoded as JSON strings: Optuna's
    categorical distributions take scalars only, and lists (e.g. widths) are natural choices."""
    from ray import tune

    if domain.kind == "choice":
        return tune.choice([json.dumps(v) for v in domain.values])
    return getattr(tune, domain.kind)(*domain.values)


# ------------------------------------------------------------------------ the sweep


@dataclass(frozen=True)
class SweepRequest:
    """The arguments of ``tuning/sweep.py``."""

    target: str
    bundle: str
    data: str
    out: str
    samples: int
    max_steps: int
    spaces: str
    preset: str | None = "tiny"
    workers_per_trial: int = 1
    gpus_per_worker: float = 0.0
    concurrency: int = 1  # trials at once
    search: str = "random"
    condition: str | None = None
    holdout: int = 1
    eval_every: int | None = None  # default: the preset's train.checkpoint_every
    overrides: tuple[str, ...] = ()
    seed: int = 0


@dataclass
class SweepPlan:
    """A checked sweep: what the driver hands to Tune and the trials."""

    req: SweepRequest
    out: str
    data: str
    bundle: Bundle
    space: dict[str, Domain]
    base_overrides: list[str]  # the request's --set plus the evaluation cadence
    holdout_ids: tuple[str, ...]
    eval_every: int


def check(req: SweepRequest) -> SweepPlan:
    """Check every input before any trial: target and options, the search space (keys and
    values), the bundle (what the target loads), the data (volumes, or a latent cache for the
    refiner) and the held-out split, a train plan of the base config, and ``--out``."""
    if req.target not in TARGETS:
        raise ConfigError(f"--target {req.target!r}: choose one of {', '.join(TARGETS)}")
    if req.search not in SEARCHES:
        raise ConfigError(f"--search {req.search!r}: choose one of {', '.join(SEARCHES)}")
    spec = STAGES[req.target]
    if req.condition and not spec.diffusion:
        raise ConfigError(f"--condition: only the refiner is label-conditioned, not {req.target}")
    for name, value in (
        ("--samples", req.samples),
        ("--max-steps", req.max_steps),
        ("--concurrency", req.concurrency),
    ):
        if value < 1:
            raise ConfigError(f"{name} {value}: need at least 1")
    if req.holdout < 1:
        raise ConfigError(f"--holdout {req.holdout}: validation needs at least one volume")
    out, data = absolute(req.out), absolute(req.data)
    base = load_config(req.preset, None, list(req.overrides))
    eval_every = req.eval_every or base.train.checkpoint_every
    base_overrides = [*req.overrides, f"train.checkpoint_every={eval_every}"]
    space = load_space(req.spaces, req.target, req.preset, base_overrides, req.condition)

    what = f"the {req.target} sweep" + (" with --condition" if req.condition else "")
    bundle = opened(req.bundle)
    bundle.require(spec.needs(req.condition), what)
    latents = spec.dataset == "latents"
    # volumes, not their shifted views: a held-out volume holds out its views
    ids = cached_ids(data, views=False) if latents else DatasetLayout(data).ids()
    if not ids and latents:
        raise DataError(data, "no latent cache (<id>.safetensors); run jobs/encode_latents.py")
    if len(ids) <= req.holdout:
        kind = "cached latents" if latents else "volumes"
        raise DataError(data, f"{len(ids)} {kind}: need more than --holdout {req.holdout}")
    holdout_ids = tuple(ids[-req.holdout :])  # deterministic: the last ids
    # The train loop's own checks (bundle model, data, latent stats, labels), without trials.
    plan(train_request(req, data, join(out, "trials", "check"), bundle, base_overrides, ()))

    previous = read_json(join(out, "sweep.json"))
    identity = _identity(req, bundle, data)
    if previous is not None and previous.get("identity") != identity:
        raise ConfigError(
            f"{join(out, 'sweep.json')}: --out holds another sweep ({previous.get('identity')}); "
            "choose another --out"
        )
    return SweepPlan(req, out, data, bundle, space, base_overrides, holdout_ids, eval_every)


def _identity(req: SweepRequest, bundle: Bundle, data: str) -> dict[str, Any]:
    return {
        "target": req.target,
        "preset": req.preset,
        "condition": req.condition,
        "bundle": bundle.url,
        "data": data,
    }


def base_bundle(p: SweepPlan) -> str | None:
    """The bundle every trial starts from: only what the target loads (so the trained
    modules start fresh with each trial's shape and initialisation), written once to
    ``<out>/base_bundle``; None when a trial needs nothing (the unconditional refiner)."""
    from caldm.bundle import save_bundle

    needs = STAGES[p.req.target].needs(p.req.condition)
    if not needs:
        return None
    url = join(p.out, "base_bundle")
    if read_json(join(url, "bundle.json")) is None:
        meta = p.bundle.meta
        keep = ("latent_scale", "num_classes", "conditioned")
        save_bundle(
            url,
            p.bundle.cfg,
            p.bundle.load(needs),
            condition=meta.get("condition"),
            num_classes=meta.get("num_classes"),
            meta_update={k: meta[k] for k in keep if k in meta},
        )
    return url


@dataclass
class SweepResult:
    best_config: str  # <out>/best.yaml
    trials_csv: str  # <out>/trials.csv
    best_trial: str
    best_score: float
    trials: list[dict[str, Any]]


def sweep(req: SweepRequest) -> SweepResult:
    """Check, run (or resume) the sweep, write ``best.yaml`` and ``trials.csv``."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from caldm.distributed.cluster import ensure_ray, spanned_nodes
    from caldm.distributed.tracking import check_store

    p = check(req)
    ensure_ray()
    _warn_without_state_api()
    # Trials (and their workers) run on any node: a SQLite store only works on one.
    uri = check_store(p.out, spanned_nodes())
    record = {"identity": _identity(req, p.bundle, p.data), "request": req.__dict__}
    write_json(join(p.out, "sweep.json"), record)
    evaluate = HeldOutValidation(p.data, p.holdout_ids, req.condition, seed=req.seed)
    setup = TrialSetup(
        req=req,
        data=p.data,
        out=p.out,
        bundle=base_bundle(p),
        base_overrides=tuple(p.base_overrides),
        holdout_ids=p.holdout_ids,
        evaluate=evaluate,
        tracking_uri=uri,
    )
    trainable = tune.with_parameters(run_trial, setup=setup)
    storage_path, storage_fs = _storage(p.out)
    experiment = join(p.out, req.target)
    if tune.Tuner.can_restore(experiment, storage_filesystem=storage_fs):
        log.warning("resuming the sweep in %s", experiment)
        tuner = tune.Tuner.restore(
            experiment, trainable, resume_errored=True, storage_filesystem=storage_fs
        )
    else:
        concurrency = req.concurrency
        if req.search == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            search_alg: Any = OptunaSearch(seed=req.seed)
        else:
            from ray.tune.search.basic_variant import BasicVariantGenerator

            # Tune applies max_concurrent_trials to Searchers only; this one limits itself.
            search_alg = BasicVariantGenerator(random_state=req.seed, max_concurrent=concurrency)
        tuner = tune.Tuner(
            trainable,
            param_space={key: tune_domain(d) for key, d in p.space.items()},
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode="min",
                num_samples=req.samples,
                search_alg=search_alg,
                scheduler=ASHAScheduler(
                    time_attr="step",
                    # One past the last step: ASHA stops a trial that reaches max_t, which
                    # would cut off the run's bundle export and summary after its last report.
                    max_t=req.max_steps + 1,
                    grace_period=min(p.eval_every, req.max_steps),
                ),
                max_concurrent_trials=concurrency if req.search == "optuna" else None,
                trial_dirname_creator=_trial_dirname,
                # Not reused: a trial blocks in TorchTrainer.fit(), so an ASHA-stopped trial
                # kept in a reused actor would keep its train workers (and GPUs); a fresh
                # actor per trial is killed with everything it started.
                reuse_actors=False,
            ),
            run_config=tune.RunConfig(
                name=req.target,  # fixed: a rerun finds the experiment and resumes it
                storage_path=storage_path,
                storage_filesystem=storage_fs,
            ),
        )
    results = tuner.fit()
    close_trial_runs(p, results, uri)
    return _write_outputs(p, results)


def _warn_without_state_api() -> None:
    """Ray Train gives back the placement group of a trial ASHA stopped only when its cleaner
    can ask the State API (the dashboard) that the trial's controller died; without it each
    stopped trial keeps its CPUs and GPUs until the sweep ends."""
    import ray
    from ray.util.state import list_actors

    try:
        address = ray.get_runtime_context().gcs_address
        list_actors(address=address, limit=1, timeout=10, raise_on_missing_output=False)
    except Exception as exc:  # noqa: BLE001 - any failure means the same to the user
        log.warning(
            "Ray's State API is not reachable (%s): trials that ASHA stops will keep their "
            "resources until the sweep ends; start Ray with its dashboard",
            type(exc).__name__,
        )


def close_trial_runs(p: SweepPlan, results: Any, uri: str) -> None:
    """Give every trial's MLflow run its final status: a trial stopped by ASHA (or killed with
    its actor) could not close its own run, which would stay RUNNING forever."""
    from caldm.distributed.tracking import close_run

    status_of = {"done": "FINISHED", "stopped": "KILLED", "error": "FAILED"}
    for result in results:
        run = read_json(join(p.out, "trials", _trial_id(result), "run.json")) or {}
        if run.get("mlflow_run_id"):
            close_run(uri, run["mlflow_run_id"], status_of[_status(p, result)])


def _write_outputs(p: SweepPlan, results: Any) -> SweepResult:
    from caldm.config import save_config

    rows: list[dict[str, Any]] = []
    for result in results:
        metrics = result.metrics or {}
        row = {
            "trial_id": _trial_id(result),
            "status": _status(p, result),
            "step": _last_step(p, result),
            METRIC: metrics.get(METRIC),
        }
        row.update(
            {k: metrics[k] for k in ("val_rec", "val_consistency", "val_loss") if k in metrics}
        )
        # Searched values as YAML text (epsilon, null, [0, 1]), as --set takes them.
        row.update({k: _cell(decode(v)) for k, v in sorted((result.config or {}).items())})
        row["error"] = root_cause(result.error) if result.error else ""
        rows.append(row)
    rows.sort(key=lambda r: r["trial_id"])  # Tune's order changes on restore
    scored = [r for r in rows if r[METRIC] is not None]
    if not scored:
        first = next((r["error"] for r in rows if r["error"]), "no trial reported a metric")
        raise SweepFailed(f"{p.out}: no trial of the {p.req.target} sweep finished ({first})")
    best = results.get_best_result(metric=METRIC, mode="min", scope="last")
    # The full config: preset, the request's --set and the best values (not the sweep's
    # short max_steps or evaluation cadence: best.yaml is for the real run).
    cfg = load_config(p.req.preset, None, [*p.req.overrides, *overrides_of(best.config)])
    cfg.stage = p.req.target
    best_yaml, trials_csv = join(p.out, "best.yaml"), join(p.out, "trials.csv")
    save_config(cfg, best_yaml)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns)
    writer.writeheader()
    writer.writerows(rows)
    write_bytes(trials_csv, buffer.getvalue().encode())
    best_id = _trial_id(best)
    return SweepResult(best_yaml, trials_csv, best_id, best.metrics[METRIC], rows)


def _cell(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _last_step(p: SweepPlan, result: Any) -> int | None:
    """The trial's last step: its run's summary.json when it got there, else Tune's last
    result. ASHA's stop reaches a trial asynchronously: one stopped after step s may still
    finish (its run then closes itself FINISHED), and Tune's last result says s."""
    summary = read_json(join(p.out, "trials", _trial_id(result), "summary.json")) or {}
    steps = [s for s in ((result.metrics or {}).get("step"), summary.get("global_step")) if s]
    return max(steps) if steps else None


def _status(p: SweepPlan, result: Any) -> str:
    """error, stopped (by ASHA, before max_steps) or done (the run reached max_steps)."""
    if result.error:
        return "error"
    return "done" if (_last_step(p, result) or 0) >= p.req.max_steps else "stopped"


def _trial_id(result: Any) -> str:
    return result.path.rstrip("/").rsplit("/", 1)[-1]  # trial dirs are named by trial id


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id
