"""Shared pytest fixtures.

S3 tests talk to a real S3 API: a moto server on 127.0.0.1 reached through AWS_ENDPOINT_URL,
exactly as production code reaches any S3-compatible store.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest

_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never wait on the instance metadata service
}


def _clear_s3fs_cache() -> None:
    # s3fs caches filesystem instances (and their endpoint/credentials) across calls.
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1; yields its endpoint URL, set as AWS_ENDPOINT_URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in [*_AWS_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(_AWS_ENV, AWS_ENDPOINT_URL=endpoint)
    _clear_s3fs_cache()
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _clear_s3fs_cache()


@pytest.fixture
def s3_bucket(s3_server: str) -> Iterator[str]:
    """A fresh, empty bucket on the moto server; yields ``s3://<name>``."""
    import s3fs

    _clear_s3fs_cache()
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(name)
    yield f"s3://{name}"
    _clear_s3fs_cache()


# --- Ray -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ray_cluster(s3_server: str) -> Iterator[str]:
    """One local Ray cluster for the session (4 CPUs); yields its address for subprocess jobs.

    It starts after the S3 server on purpose: Ray workers inherit the environment of the
    process that starts the cluster, AWS_ENDPOINT_URL included. ``address="local"`` starts a
    fresh cluster even when another one runs on this machine (which plain ray.init would join).
    """
    import ray

    for attempt in range(3):  # a loaded machine can miss Ray's fixed 30 s raylet start wait
        try:
            # 4 logical CPUs on 2 cores: a 2-worker training still fits if an earlier job left
            # a task leased (ray_resources_returned below names the test in CALDM_LEAK_LOG).
            # With the dashboard, as a real cluster has it: Ray Train's placement-group cleaner
            # asks the State API whether a trial's controller died (ASHA stopped it), and
            # without one the trial's placement group is never given back.
            ray.init(
                address="local", num_cpus=4, log_to_driver=False, dashboard_port=free_port()
            )
            break
        except Exception as exc:
            ray.shutdown()
            if attempt == 2 or "timed out during startup" not in str(exc):
                raise
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


_HELD_BEFORE = [0.0]  # CPUs still held after the tests named so far


@pytest.fixture(autouse=True)
def ray_resources_returned(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test gives back the session cluster's CPUs: a leaked placement group or actor
    would starve a later job that needs all of them (a 2-worker training waits forever)."""
    yield
    import ray

    if not ray.is_initialized():
        return
    import time

    # CPUs an earlier test was already named for are not waited for again
    expected = ray.cluster_resources().get("CPU", 0) - _HELD_BEFORE[0]
    deadline = time.monotonic() + 30  # actors and placement groups are released asynchronously
    while ray.available_resources().get("CPU", 0) < expected and time.monotonic() < deadline:
        time.sleep(0.5)
    held = expected - ray.available_resources().get("CPU", 0)
    if held > 0:
        _HELD_BEFORE[0] += held
        import warnings

        message = f"{request.node.nodeid}: {held} CPU of the session cluster still held"
        warnings.warn(message, stacklevel=1)  # in the run's warnings summary
        with open(os.environ.get("CALDM_LEAK_LOG", os.devnull), "a") as log:
            log.write(message + "\n" + _holders())


def _holders() -> str:
    """What holds the cluster's CPUs: live actors and placement groups, a line each (read
    from the GCS tables, which answer even when the dashboard does not)."""
    import ray
    from ray._private.state import actors

    lines = [
        f"  actor {a['ActorClassName']} {actor_id[:8]} {a['State']}"
        for actor_id, a in actors().items()
        if a["State"] not in ("DEAD",)
    ]
    for pg_id, pg in ray.util.placement_group_table().items():
        if pg.get("state") != "REMOVED":
            lines.append(f"  placement group {pg_id[:8]} {pg.get('state')} {pg.get('bundles')}")
    return "".join(line + "\n" for line in lines)


def free_port() -> int:
    """A TCP port free on this machine now (for a Ray head's ports)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_processes_using(path: str) -> None:
    """SIGKILL every process whose command line names ``path`` (a Ray head's --temp-dir).

    Killing the head's process group is not enough: Ray's dashboard, agents and the fake
    autoscaler's nodes start in sessions of their own and would outlive the test, holding
    memory and ports on the machine.
    """
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(path in part for part in proc.info["cmdline"] or ()):
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


@pytest.fixture
def file_reads(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts the local files opened for reading while the test runs, by path (fsspec's
    local filesystem: what every caldm read of a local URL goes through)."""
    from fsspec.implementations.local import LocalFileSystem

    reads: Counter[str] = Counter()
    original = LocalFileSystem._open

    def counting_open(self, path, mode="rb", *args, **kwargs):
        if "r" in mode:
            reads[str(path)] += 1
        return original(self, path, mode, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "_open", counting_open)
    return reads
