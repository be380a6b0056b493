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
    out: str, experiment: str, run_name: str, params: Mapping[str, Any] | None = None
) -> Iterator[Any]:
    """Open an MLflow run for a job writing to ``out``; yields the ``mlflow.ActiveRun``."""
    import mlflow

    uri = tracking_uri(out)
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    previous_experiment = os.environ.get("MLFLOW_EXPERIMENT_ID")
    mlflow.set_tracking_uri(uri)
    try:
        if uri.startswith("sqlite:///") and mlflow.get_experiment_by_name(experiment) is None:
            artifacts = Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts"
            # Another job may create it first; set_experiment below then finds theirs.
            with contextlib.suppress(mlflow.exceptions.MlflowException):
                mlflow.create_experiment(experiment, artifact_location=artifacts.as_uri())
        mlflow.set_experiment(experiment)
        with mlflow.start_run(run_name=run_name) as run:
            if params:
                mlflow.log_params(flatten_params(params))
            yield run
    finally:
        # set_tracking_uri also exports MLFLOW_TRACKING_URI to os.environ (for subprocesses):
        # undo that, or every later job of this process, and the Ray workers it forwards
        # MLFLOW_* to, would log into this job's database.
        mlflow.set_tracking_uri(previous)
        if previous_experiment is None:  # set_experiment exports its id the same way
            os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        else:
            os.environ["MLFLOW_EXPERIMENT_ID"] = previous_experiment


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
