"""Jobs on an autoscaling cluster that starts empty: generation, encoding, evaluation, a sweep
and a 2-worker training run each grow it and complete (``make test-autoscale``; marker
``autoscale``, left out of ``make test``: each test waits for nodes to come and go).

The cluster is Ray's fake multi-node autoscaler (``RAY_FAKE_CLUSTER``, provider
``fake_multinode``): the head has 0 CPUs, like the shipped cluster.yaml, and the worker node
types start at 0 nodes, one of them with (fake) GPUs. Its config is written here whole: the
wheel lacks the ``fake_multi_node/example.yaml`` that ``ray.cluster_utils.AutoscalingCluster``
reads, and that class's ``start``/``shutdown`` run ``ray stop --force``, which would stop every
other Ray on the machine. The head runs ``--block`` in its own process group and is killed by
that group (the fake worker nodes are children of its autoscaler, so in the group too).
Training and the sweep log to an MLflow tracking server (``tracking_server``), as they must on
such a cluster: they refuse a SQLite file that the added nodes cannot reach.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, kill_processes_using

from caldm.bundle import init_bundle
from caldm.config import Config
from caldm.data.phantom import write_phantom_dataset

pytestmark = pytest.mark.autoscale

REPO = Path(__file__).resolve().parents[1]
IDLE_S = 6  # idle worker nodes go after this: every test starts from an empty cluster

NODE_TYPES = {
    "ray.head.default": {"resources": {}, "node_config": {}, "max_workers": 0},
    "cpu2": {
        "resources": {"CPU": 2, "object_store_memory": 150 * 2**20},
        "node_config": {},
        "min_workers": 0,
        "max_workers": 2,
    },
    "gpu1": {  # fake GPUs: the actors see no CUDA and run on CPU, but Ray schedules by them
        "resources": {"CPU": 2, "GPU": 1, "object_store_memory": 150 * 2**20},
        "node_config": {},
        "min_workers": 0,
        "max_workers": 2,
    },
}


def _config(gcs_address: str) -> dict[str, Any]:
    """The whole fake_multinode autoscaling config (what example.yaml would give, and ours)."""
    return {
        "cluster_name": "caldm-autoscale-test",
        "max_workers": 3,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,  # not the default :6379 another Ray may hold
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": NODE_TYPES,
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 2.0,
        "idle_timeout_minutes": IDLE_S / 60,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[str]:
    """The fake autoscaling cluster; this process is connected to it (RAY_ADDRESS)."""
    import ray
    import ray._private.services

    if ray.is_initialized():
        pytest.skip("needs its own Ray: run alone (make test-autoscale)")
    log_dir = tmp_path_factory.mktemp("autoscale")
    ip = ray._private.services.get_node_ip_address()
    port, dash, dash_agent, client, metrics = (free_port() for _ in range(5))
    address = f"{ip}:{port}"
    config = log_dir / "autoscaling.json"
    config.write_text(json.dumps(_config(address)))
    temp = tempfile.mkdtemp(prefix="rayas", dir="/tmp")  # short: its sockets live there
    env = {
        **os.environ,
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "RAY_AUTH_MODE": "disabled",
        # a busy 2-core machine starts a node's agents slowly: the default 15 s kills it
        "RAY_agent_register_timeout_ms": "180000",
        "RAY_raylet_start_wait_time_s": "240",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
           "--num-cpus", "0", "--num-gpus", "0", "--port", str(port),
           "--include-dashboard", "false", "--dashboard-port", str(dash),
           "--dashboard-agent-listen-port", str(dash_agent), "--metrics-export-port", str(metrics),
           "--ray-client-server-port", str(client), "--temp-dir", temp,
           f"--autoscaling-config={config}"]  # fmt: skip
    log = open(log_dir / "head.log", "w")  # noqa: SIM115
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    saved = os.environ.get("RAY_ADDRESS")
    try:
        deadline = time.time() + 300  # a busy machine starts Ray slowly
        head_log = log_dir / "head.log"
        # `ray start` prints this once the head's own node is up (its GCS port opens earlier)
        while "Ray runtime started" not in head_log.read_text() and time.time() < deadline:
            assert head.poll() is None, head_log.read_text()
            time.sleep(1)
        os.environ["RAY_ADDRESS"] = address
        ray.init(address=address, log_to_driver=False)
        yield address
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = saved
        os.killpg(head.pid, signal.SIGKILL)  # the head's group: only what it started
        head.wait(timeout=30)
        kill_processes_using(temp)  # what left the group (dashboard, agents, nodes)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory) -> Iterator[str]:
    """An MLflow tracking server (SQLite behind it), as a cluster with a 0-CPU head needs: the
    trials and train workers run on nodes the autoscaler adds, which cannot write the head's
    SQLite file (jobs refuse it). Yields its URI."""
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts")]  # fmt: skip
    log = open(root / "server.log", "w")  # noqa: SIM115
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None, (root / "server.log").read_text()
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, (root / "server.log").read_text()
                time.sleep(1)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        log.close()


def _workers() -> dict[str, dict[str, float]]:
    """Alive worker nodes (id -> resources); the head is the node with no CPU."""
    import ray

    return {
        n["NodeID"]: n["Resources"]
        for n in ray.nodes()
        if n["Alive"] and n["Resources"].get("CPU", 0) > 0
    }


def grows(job: Callable[[], Any], needs: str = "CPU") -> tuple[Any, set[str]]:
    """Wait for an empty cluster, run ``job``; returns its result and the nodes that came.

    Asserts the cluster grew: the head has no CPU, so every task of the job ran on a node the
    autoscaler added for it, of a type with ``needs``.
    """
    import ray

    deadline = time.time() + 120
    while _workers() and time.time() < deadline:
        time.sleep(1)
    assert not _workers(), "idle worker nodes were not removed"
    before = {n["NodeID"] for n in ray.nodes()}
    result = job()
    new = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["NodeID"] not in before}
    assert new, "the job completed without the cluster growing"
    assert any(r.get(needs, 0) > 0 for r in new.values()), new
    return result, set(new)


def _job(path: str) -> Any:
    spec = importlib.util.spec_from_file_location(Path(path).stem, REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _small_cfg() -> Config:
    """tiny shrunk to 16 x 32 x 32 volumes: seconds per sample (test_generate's, one copy)."""
    from test_generate import _small_cfg as small

    return small()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    write_phantom_dataset(str(root / "data"), count=2, preset="tiny", seed=0)
    write_phantom_dataset(str(root / "other"), count=2, preset="tiny", seed=1)
    init_bundle("tiny", str(root / "init"), seed=0)
    init_bundle("tiny", str(root / "cond"), condition="layers", seed=0, cfg=_small_cfg())
    return root


def test_generation_grows_gpu_nodes(cluster: str, root: Path) -> None:
    from caldm.distributed.generate import generate_dataset

    report, new = grows(
        lambda: generate_dataset(
            str(root / "cond"), str(root / "data"), str(root / "gen"), 1, steps=1,
            workers=2, gpus_per_worker=1, log=lambda _: None,
        ),
        needs="GPU",
    )  # fmt: skip
    assert (report.total, report.generated, report.errors) == (2, 2, [])
    assert len(new) >= 2  # two one-GPU actors: two GPU nodes


def test_encoding_grows_gpu_nodes(cluster: str, root: Path) -> None:
    from caldm.distributed.encode import encode_latents

    stats, _ = grows(
        lambda: encode_latents(
            str(root / "init"), str(root / "data"), str(root / "latents"), 2, 1.0, views=0
        ),
        needs="GPU",
    )
    assert (stats["count"], stats["encoded"]) == (2, 2)
    assert sorted(p.name for p in (root / "latents").glob("*.safetensors")) == [
        "phantom_0000.safetensors",
        "phantom_0001.safetensors",
    ]


def test_evaluation_grows_the_cluster(cluster: str, root: Path, tmp_path: Path) -> None:
    from caldm.distributed.evaluation import evaluate

    report, _ = grows(
        lambda: evaluate(
            str(root / "data"), str(root / "other"), max_slices_per_volume=2, num_gpus=1
        ),
        needs="GPU",
    )
    assert (report["n_real"], report["n_synthetic"]) == (2, 2)
    assert report["slices"]["real"]["intra"] == 4  # 2 planes x 2 volumes


def test_two_worker_training_grows_the_cluster(
    cluster: str, root: Path, tracking_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server)
    out = root / "ae2d"
    rc, _ = grows(
        lambda: _job("jobs/train_stage.py")(
            ["--stage", "ae2d", "--preset", "tiny", "--max-steps", "2", "--workers", "2",
             "--data", str(root / "data"), "--out", str(out), "--bundle", str(root / "init")]
        )
    )  # fmt: skip
    assert rc == 0
    assert json.loads((out / "summary.json").read_text())["global_step"] == 2


def test_sweep_runs_trials_concurrently_on_a_grown_cluster(
    cluster: str, root: Path, tracking_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server)
    out = root / "sweep"
    rc, new = grows(
        lambda: _job("tuning/sweep.py")(
            ["--target", "adaptor", "--bundle", str(root / "init"), "--data",
             str(root / "data"), "--out", str(out), "--samples", "2", "--max-steps", "2",
             "--holdout", "1", "--concurrency", "2"]
        )
    )  # fmt: skip
    assert rc == 0
    assert len((out / "trials.csv").read_text().strip().splitlines()) == 3  # header + 2
    # two trials at once: each a driver (1 CPU) and a train worker (1 CPU), on 2-CPU nodes
    assert len(new) >= 2
