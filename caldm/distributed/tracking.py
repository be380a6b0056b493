"""MLflow glue shared by every job: where runs are stored, params, metrics and images.

Runs always go to a SQLite tracking store (MLflow's file store is deprecated and refused here),
unless ``MLFLOW_TRACKING_URI`` points elsewhere (for example a tracking server of the cluster).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

# MLflow's limits (mlflow.utils.validation): longer keys or values are rejected.
MAX_PARAM_KEY = 250
MAX_PARAM_VALUE = 6000


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _store_root(out: str) -> Path:
    if _is_local(out):
        root = Path(out.removeprefix("file://")).expanduser().resolve()
    else:
        root = Path.home() / ".caldm"
    root.mkdir(parents=True, exist_ok=True)
    return root


def tracking_uri(out: str) -> str:
    """The tracking URI for a job writing to ``out``.

    ``MLFLOW_TRACKING_URI`` if set; else ``sqlite:///<out>/mlflow.db`` for a local ``out``.
    SQLite cannot live on object storage, so for a remote ``out`` (``s3://...``) runs go to the
    local ``sqlite:///~/.caldm/mlflow.db`` of the machine running the driver; set
    ``MLFLOW_TRACKING_URI`` to a tracking server to keep them with the cluster. Artifacts of
    new experiments go to ``mlartifacts/`` beside the database (MLflow's default would be
    ``./mlruns`` of whatever directory the job was started in).
    """
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{_store_root(out) / 'mlflow.db'}"


def check_store(out: str, spans: str | None = None) -> str:
    """The tracking URI for ``out``, after checking every node of the cluster can reach it.

    Refuses (one :class:`~caldm.errors.ConfigError` line saying what to set) a remote ``out``
    without ``MLFLOW_TRACKING_URI`` (runs would go to a SQLite file on whichever node logs,
    which the autoscaler may delete), and a SQLite or file store when the job's workers may run
    on other nodes (``spans`` says why, :func:`caldm.distributed.cluster.spanned_nodes`): they
    cannot write the driver node's file.
    """
    from caldm.errors import ConfigError

    uri = tracking_uri(out)
    if not os.environ.get("MLFLOW_TRACKING_URI") and not _is_local(out):
        raise ConfigError(
            f"--out {out}: set MLFLOW_TRACKING_URI to a tracking server every node reaches "
            "(e.g. http://<head>:5000); a SQLite file on a worker node is lost with the node"
        )
    if spans and (uri.startswith("sqlite:") or _is_local(uri)):
        raise ConfigError(
            f"MLFLOW_TRACKING_URI {uri}: a file on this node, but {spans}; set "
            "MLFLOW_TRACKING_URI to a tracking server every node reaches"
        )
    return uri


def _use_experiment(uri: str, experiment: str) -> str:
    """Select (creating if needed) ``experiment`` in the store at ``uri``; returns its id."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:///") and mlflow.get_experiment_by_name(experiment) is None:
        artifacts = Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts"
        # Another job may create it first; set_experiment below then finds theirs.
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            mlflow.create_experiment(experiment, artifact_location=artifacts.as_uri())
    return mlflow.set_experiment(experiment).experiment_id


@contextlib.contextmanager
def _restored_env() -> Iterator[None]:
    import mlflow

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    previous_experiment = os.environ.get("MLFLOW_EXPERIMENT_ID")
    try:
        yield
    finally:
        # set_tracking_uri also exports MLFLOW_TRACKING_URI to os.environ (for subprocesses):
        # undo that, or every later job of this process, and the Ray workers it forwards
        # MLFLOW_* to, would log into this job's database.
        mlflow.set_tracking_uri(previous)
        if previous_experiment is None:  # set_experiment exports its id the same way
            os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        else:
            os.environ["MLFLOW_EXPERIMENT_ID"] = previous_experiment


def open_run_id(out: str, experiment: str, run_name: str, run_id: str | None = None) -> str:
    """The id of the MLflow run a (resumed) job logs to: ``run_id`` when that run exists in
    the store, else a new run's. Called on the driver, which keeps it in ``run.json`` so a
    resume continues the same run."""
    import mlflow

    uri = tracking_uri(out)
    with _restored_env():
        experiment_id = _use_experiment(uri, experiment)
        client = mlflow.MlflowClient(uri)
        if run_id:
            with contextlib.suppress(mlflow.exceptions.MlflowException):
                if client.get_run(run_id).info.experiment_id == experiment_id:
                    return run_id
        return client.create_run(experiment_id, run_name=run_name).info.run_id


def close_run(uri: str, run_id: str, status: str) -> bool:
    """Set the final status (FINISHED, FAILED, KILLED) of a run of the store at ``uri`` still
    marked RUNNING, e.g. one whose process was killed (an ASHA-stopped trial) before it could
    close it; returns whether it was still RUNNING."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    if client.get_run(run_id).info.status != "RUNNING":
        return False
    client.set_terminated(run_id, status=status)
    return True


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def flatten_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Nested dicts -> ``{"a.b": "value"}`` with keys and values cut to MLflow's limits."""
    return {k[:MAX_PARAM_KEY]: str(v)[:MAX_PARAM_VALUE] for k, v in _flatten(params).items()}


@contextlib.contextmanager
def start_run(
    out: str,
    experiment: str,
    run_name: str,
    params: Mapping[str, Any] | None = None,
    run_id: str | None = None,
) -> Iterator[Any]:
    """Open an MLflow run for a job writing to ``out``; yields the ``mlflow.ActiveRun``.

    With ``run_id`` (from :func:`open_run_id`) the run is continued: params it already has
    keep their first value (MLflow refuses changes; a resume may only extend the schedule).
    """
    import mlflow

    uri = tracking_uri(out)
    with _restored_env():
        _use_experiment(uri, experiment)
        with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name) as run:
            if params:
                flat = flatten_params(params)
                if run_id:
                    have = mlflow.MlflowClient(uri).get_run(run_id).data.params
                    flat = {k: v for k, v in flat.items() if k not in have}
                if flat:
                    mlflow.log_params(flat)
            yield run


def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Log the numeric entries of ``metrics`` (nested dicts flattened as ``a.b``)."""
    import mlflow

    flat = _flatten(metrics)
    numeric = {k: float(v) for k, v in flat.items() if isinstance(v, int | float)}
    mlflow.log_metrics(numeric, step=step)


def log_image(image: Any, artifact_file: str) -> None:
    """Save a PIL image as an artifact of the active run (e.g. ``"previews/step_100.png"``)."""
    import mlflow

    mlflow.log_image(image, artifact_file=artifact_file)
