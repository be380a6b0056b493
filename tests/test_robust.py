"""Nothing leaked, nothing lost (issue 15): secrets out of the cluster's view, upload integrity
on encrypted buckets, error rows in generation, guarded resume, storage helpers.

Every check here drives the real path (Ray Train, Ray Data, moto S3) at the smallest size that
still reaches the code under test.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
from pathlib import Path

import pytest

from caldm.bundle import init_bundle
from caldm.data.phantom import write_phantom_dataset

REPO = Path(__file__).resolve().parents[1]
SENTINEL = "caldm-sentinel-secret-4f1d2c"


def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def root(tmp_path_factory, ray_cluster) -> Path:
    root = tmp_path_factory.mktemp("robust")
    write_phantom_dataset(str(root / "data"), count=2, preset="tiny", seed=0)
    init_bundle("tiny", str(root / "init"))
    return root


# --------------------------------------------------------------------------- 1. secrets


def test_worker_env_forwards_settings_never_secrets() -> None:
    from caldm.distributed.cluster import worker_env

    env = {
        "AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": "t",
        "AWS_ENDPOINT_URL": "http://e", "AWS_DEFAULT_REGION": "r", "AWS_PROFILE": "p",
        "AWS_SHARED_CREDENTIALS_FILE": "/creds", "MLFLOW_TRACKING_URI": "http://m",
        "MLFLOW_TRACKING_PASSWORD": "pw", "MLFLOW_TRACKING_TOKEN": "tk", "CALDM_X": "1",
        "HOME": "/root",
    }  # fmt: skip
    assert worker_env(env) == {
        "AWS_ENDPOINT_URL": "http://e", "AWS_DEFAULT_REGION": "r", "AWS_PROFILE": "p",
        "AWS_SHARED_CREDENTIALS_FILE": "/creds", "MLFLOW_TRACKING_URI": "http://m",
        "CALDM_X": "1",
    }  # fmt: skip


def _files_holding(directory: str, needle: str) -> list[str]:
    hits = []
    for path in glob.glob(os.path.join(directory, "**"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as fh:
                if needle.encode() in fh.read():
                    hits.append(path)
    return hits


def test_training_keeps_the_secret_key_out_of_the_cluster_view(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A training run driven with a sentinel secret key and session token: neither appears in
    the runtime envs Ray records (the runtime env agent logs every one it creates), the job
    table, the actors, tasks and jobs the State API lists in detail (`ray list ... --detail`),
    or anything the run wrote."""
    import ray

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SENTINEL)
    monkeypatch.setenv("AWS_SESSION_TOKEN", SENTINEL + "-token")
    out = root / "secret"
    rc = _job("train_stage").main(["--stage", "ae2d", "--preset", "tiny", "--max-steps", "1",
                                   "--data", str(root / "data"), "--out", str(out),
                                   "--bundle", str(root / "init")])  # fmt: skip
    assert rc == 0
    session = ray._private.worker._global_node.get_session_dir_path()
    assert glob.glob(f"{session}/logs/runtime_env_agent*.log")  # where runtime envs land
    assert _files_holding(session, SENTINEL) == []
    assert SENTINEL not in repr(ray._private.state.state.job_table())
    # What `ray list actors/tasks/jobs --detail` shows (the State API of the session cluster)
    from ray.util.state import list_actors, list_jobs, list_tasks

    address = ray.get_runtime_context().gcs_address
    seen = [
        list_actors(address=address, detail=True, limit=10_000),
        list_tasks(address=address, detail=True, limit=10_000),
        list_jobs(address=address, detail=True),
    ]
    assert all(len(rows) > 0 for rows in seen[:2])  # the run's actors and tasks are listed
    assert SENTINEL not in repr(seen)
    assert _files_holding(str(out), SENTINEL) == []


# --------------------------------------------------------------------------- 2. integrity


@pytest.fixture
def kms_bucket(s3_bucket: str) -> str:
    """A moto bucket whose objects are encrypted with SSE-KMS by default."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    key = boto3.client("kms", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_key()
    rule = {"ApplyServerSideEncryptionByDefault": {
        "SSEAlgorithm": "aws:kms", "KMSMasterKeyID": key["KeyMetadata"]["KeyId"]}}  # fmt: skip
    s3.put_bucket_encryption(
        Bucket=s3_bucket.removeprefix("s3://"),
        ServerSideEncryptionConfiguration={"Rules": [rule]},
    )
    return s3_bucket


def _etag_not_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every HeadObject answer with an ETag that is not the MD5, as S3 does for SSE-KMS
    and SSE-C objects (moto keeps the MD5 there)."""
    import s3fs

    call = s3fs.S3FileSystem._call_s3

    async def patched(self, method, *args, **kwargs):
        out = await call(self, method, *args, **kwargs)
        if method == "head_object":
            out = {**out, "ETag": '"0123456789abcdef0123456789abcdef"'}
        return out

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", patched)


def test_upload_verified_on_sse_kms_bucket(
    kms_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib

    from caldm.data.io import split_url, write_verified
    from caldm.errors import DataError

    _etag_not_md5(monkeypatch)
    url = f"{kms_bucket}/images/a.nii.gz"
    data = os.urandom(50_000)
    sha256 = hashlib.sha256(data).hexdigest()
    assert write_verified(url, data) == {"bytes": 50_000, "sha256": sha256}
    fs, path = split_url(url)
    bucket, key, _ = fs.split_path(path)
    head = fs.call_s3("head_object", Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    assert head["ServerSideEncryption"] == "aws:kms"
    assert head["ChecksumSHA256"]  # S3 keeps the checksum the upload carried

    # The store holding other bytes of the same size is caught (a silent corruption).
    from caldm.data import io as caldm_io

    real = caldm_io.write_bytes
    monkeypatch.setattr(caldm_io, "write_bytes", lambda u, d: real(u, bytes(reversed(d))))
    with pytest.raises(DataError, match=r"b\.nii\.gz: verification failed"):
        write_verified(f"{kms_bucket}/images/b.nii.gz", data)


# --------------------------------------------------------------------------- 3. error rows


def test_one_failing_sample_is_an_error_row_and_a_rerun_makes_it(
    ray_cluster: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """4 samples; one fails on every attempt, one fails once (retried): the job makes the other
    3, lists the one in errors.jsonl, exits 2 saying how many failed; a rerun makes it."""
    from test_generate import _small_cfg

    from caldm.data.io import read_bytes, url_exists
    from caldm.data.layout import DatasetLayout
    from caldm.distributed.generate import FAIL_SAMPLE_ENV

    write_phantom_dataset(f"{s3_bucket}/real", count=2, preset="tiny", seed=0)
    init_bundle("tiny", f"{s3_bucket}/bundle", condition="layers", seed=0, cfg=_small_cfg())
    out = f"{s3_bucket}/syn"
    args = ["--bundle", f"{s3_bucket}/bundle", "--labels", f"{s3_bucket}/real", "--out", out,
            "--per-label", "2", "--steps", "1"]  # fmt: skip
    monkeypatch.setenv(FAIL_SAMPLE_ENV, "phantom_0000_s1,phantom_0001_s0:1")
    assert _job("generate_dataset").main(args) == 2
    err = capsys.readouterr().err
    assert "1 sample(s) and 0 label(s) failed" in err
    rows = [json.loads(line) for line in read_bytes(f"{out}/errors.jsonl").splitlines()]
    assert [(r["sample"], r["label"].rsplit("/", 1)[-1]) for r in rows] == [
        ("phantom_0000_s1", "phantom_0000.nii.gz")
    ]
    assert "sampling failed 3 times" in rows[0]["error"]
    made = ["phantom_0000_s0", "phantom_0001_s0", "phantom_0001_s1"]
    assert DatasetLayout(out).ids() == made
    assert [r["id"] for r in DatasetLayout(out).read_manifest()] == made

    monkeypatch.delenv(FAIL_SAMPLE_ENV)
    assert _job("generate_dataset").main(args) == 0
    assert DatasetLayout(out).ids() == sorted([*made, "phantom_0000_s1"])
    assert not url_exists(f"{out}/errors.jsonl")  # this run's report: nothing failed


# --------------------------------------------------------------------------- 7. storage helpers


def test_concurrent_bundle_writers_never_collide(tmp_path: Path) -> None:
    """8 threads write the same bundle file at once: each write is whole (unique temp names;
    a fixed ``.tmp`` name made writers rename each other's half-written file or fail)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from caldm.bundle import load_module, save_bundle
    from caldm.config import preset
    from caldm.nn.factory import build

    cfg = preset("tiny")
    url = str(tmp_path / "bundle")
    modules = []
    for seed in range(8):
        torch.manual_seed(seed)
        modules.append(build("enc2d", cfg))
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda m: save_bundle(url, cfg, {"enc2d": m}), modules))
    loaded = load_module(url, "enc2d", cfg).state_dict()
    assert any(
        all(torch.equal(loaded[k], m.state_dict()[k]) for k in loaded) for m in modules
    )
    assert not list((tmp_path / "bundle").glob("*tmp*"))


def test_storage_helpers_have_one_home() -> None:
    """URL joins, JSON reads/writes and atomic writes live in caldm/data/io.py only."""
    import re

    pattern = re.compile(
        r"^def _?(join|_join|read_json|_read_json|write_json|_write_json|_write_bytes|_write)\(",
        re.M,
    )
    offenders = [
        str(p.relative_to(REPO))
        for p in (REPO / "caldm").rglob("*.py")
        if p.name != "io.py" and pattern.search(p.read_text())
    ]
    assert offenders == []
    assert not [
        str(p.relative_to(REPO))
        for p in (REPO / "caldm").rglob("*.py")
        if p.name != "io.py" and re.search(r"""\+ *["']\.tmp["']""", p.read_text())
    ]


# --------------------------------------------------------------------------- 5. tracking


def test_tracking_store_must_be_reachable(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from caldm.distributed.tracking import check_store
    from caldm.errors import ConfigError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match="set MLFLOW_TRACKING_URI to a tracking server"):
        check_store("s3://bucket/run")
    assert check_store(str(tmp_path)) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(ConfigError, match="but the cluster has 3 nodes; set MLFLOW_TRACKING"):
        check_store(str(tmp_path), "the cluster has 3 nodes")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert check_store("s3://bucket/run", "the cluster has 3 nodes") == "http://tracking:5000"


def test_a_cluster_spans_nodes_when_its_head_has_no_cpu(ray_cluster: str) -> None:
    """A one-node cluster whose driver node has no CPU grows (autoscaler): not one node."""
    from unittest import mock

    import ray

    from caldm.distributed.cluster import spanned_nodes

    assert spanned_nodes() is None  # the session cluster: one node with CPUs
    here = ray.get_runtime_context().get_node_id()
    head = {"NodeID": here, "Alive": True, "Resources": {"memory": 1.0}}
    with mock.patch.object(ray, "nodes", return_value=[head]):
        assert "no CPU" in spanned_nodes()
    other = {"NodeID": "x", "Alive": True, "Resources": {"CPU": 2.0}}
    with mock.patch.object(ray, "nodes", return_value=[head, other]):
        assert spanned_nodes() == "the cluster has 2 nodes"


# --------------------------------------------------------------------------- 6. EMA and export

# Run in a fresh process: it sets up a one-process torch.distributed group for DeepSpeed.
_ENGINE_CHECK = '''
import logging, sys, tempfile, torch
sys.path.insert(0, "benchmarks")
from train_throughput import _init_process_group
from deepspeed.utils import safe_get_full_fp32_param
from caldm.config import load_config
from caldm.distributed.train import StageTrainer, TrainPlan
from caldm.stages import example_batch
logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
torch.set_num_threads(1)
_init_process_group()

def trainer(stage, overrides):
    cfg = load_config("tiny", None, overrides)
    cfg.stage = stage
    t = StageTrainer(TrainPlan(stage, cfg, data="", out="", bundle=None), torch.device("cpu"))
    def batches():
        while True:
            yield example_batch(stage, cfg)
    return t, batches()

# ZeRO-3 diffusion stage: the EMA is this rank's fp32 partitions, saved and restored as such.
t, it = trainer("diff3d", ["train.zero_stage=3"])
assert t.ema is None and t.ema_shards
for _ in range(2):
    t.step(it)
sizes = [e.numel() for e in t.ema_shards]
assert sizes == [q.ds_tensor.numel() for q in t.model.trainable.parameters()]
exported = {k: m.state_dict() for k, m in t.exported().items()}
directory = tempfile.mkdtemp()
t.save(directory)
saved = [e.clone() for e in t.ema_shards]
for e in t.ema_shards:
    e.zero_()
assert t.load(directory) == 2
assert all(torch.equal(a, b) for a, b in zip(saved, t.ema_shards))
again = {k: m.state_dict() for k, m in t.exported().items()}
assert all(torch.equal(exported[k][n], again[k][n]) for k in exported for n in exported[k])
master = {n: safe_get_full_fp32_param(q) for n, q in t.model.trainable.named_parameters()}
assert any(not torch.equal(exported["diff3d"][n.split(".", 1)[1]], v)
           for n, v in master.items() if n.startswith("diff3d."))  # the EMA, not the model

# bf16 training: the export is the fp32 master, finer than bf16.
t, it = trainer("nhae", ["train.precision=bf16", "train.zero_stage=2"])
for _ in range(2):
    t.step(it)
exported = {k: m.state_dict() for k, m in t.exported().items()}
finer = False
for name, q in t.model.trainable.named_parameters():
    module, key = name.split(".", 1)
    want = safe_get_full_fp32_param(q).float().cpu()
    assert torch.equal(exported[module][key], want), name
    finer |= not torch.equal(want, want.bfloat16().float())
assert finer
print("ok")
'''


def test_zero3_ema_per_partition_and_fp32_master_export() -> None:
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", _ENGINE_CHECK], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
