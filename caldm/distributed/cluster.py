"""Connecting to Ray, the same way for every job."""

from __future__ import annotations

import os
from typing import Any

# Settings that may travel to the workers (runtime env values are readable by anyone who can
# list the cluster's actors, tasks or jobs, and land in the session's logs): where storage and
# tracking are and how to find credentials, never the credentials themselves. Workers take
# those from the standard AWS chain: an instance profile, the shared credentials file (or the
# path in AWS_SHARED_CREDENTIALS_FILE), or, on a local cluster, the environment they inherit
# from the process that started it.
_FORWARD_AWS = (
    "AWS_ENDPOINT_URL",  # and the per-service AWS_ENDPOINT_URL_S3 ...
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_CA_BUNDLE",
    "AWS_EC2_METADATA_DISABLED",
)
_FORWARD_PREFIXES = ("MLFLOW_", "CALDM_", "TORCH_EXTENSIONS_DIR")
#: Names of variables that are never forwarded, whatever their prefix.
SECRET_MARKERS = ("SECRET", "TOKEN", "PASSWORD", "ACCESS_KEY", "SESSION", "CREDENTIALS_JSON")


def is_secret(name: str) -> bool:
    """Whether an environment variable's name says it holds a credential."""
    upper = name.upper()
    return any(marker in upper for marker in SECRET_MARKERS) and not upper.endswith("_FILE")


def worker_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment variables the driver forwards to Ray workers: storage endpoints and
    regions, where credentials are (a file path, a profile name), tracking and test hooks;
    never a secret key, session token or password (see :data:`SECRET_MARKERS`)."""
    env = os.environ if environ is None else environ
    return {
        k: v
        for k, v in env.items()
        if (k.startswith(_FORWARD_AWS) or k.startswith(_FORWARD_PREFIXES)) and not is_secret(k)
    }


def ensure_ray(**init_kwargs: Any) -> Any:
    """Return the ``ray`` module, connected.

    Under ``ray job submit`` (or with RAY_ADDRESS set) this joins that cluster; otherwise it
    starts a local Ray for this process. It never silently joins some other cluster that
    happens to run on the same machine.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", **init_kwargs)
    return ray


def spanned_nodes() -> str | None:
    """Why a job's workers may run on other nodes than the driver's, or None if they cannot.

    More than one node alive, or a driver's node with no CPU (a head that only schedules, as in
    the shipped cluster.yaml: every worker runs on a node the autoscaler adds, so a cluster of
    one node now is many by the time the workers start).
    """
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    if len(alive) > 1:
        return f"the cluster has {len(alive)} nodes"
    here = ray.get_runtime_context().get_node_id()
    if any(n["NodeID"] == here and not n["Resources"].get("CPU") for n in alive):
        return "this node has no CPU, so the job runs on nodes the autoscaler adds"
    return None
