"""Connecting to Ray, the same way for every job."""

from __future__ import annotations

import os
from typing import Any


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
