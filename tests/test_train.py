"""Training every stage with Ray Train + DeepSpeed (tiny preset, CPU, phantom data).

Each ``fit()`` costs ~20 s, so one chain of module-scoped runs serves every check, each run
exercising different engine settings:

| run     | workers | ZeRO | precision | extras                                              |
|---------|---------|------|-----------|-----------------------------------------------------|
| ae2d    | 1       | 1    | fp32      | GAN on from step 0, grad_accum 2                    |
| nhae    | 1       | 2    | bf16      | activation checkpointing                            |
| adaptor | 1       | 3    | fp32      | GAN on from step 0                                  |
| diff3d  | 2       | 2    | fp32      | one optimizer shard per rank                        |
| refiner | 1       | 2    | fp32      | --condition layers; killed after step 2, then rerun |

plus the latent cache job between adaptor and diff3d, and one ``ray job submit`` against its own
``ray start --head`` writing to S3 (moto).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, kill_processes_using
from safetensors.numpy import load_file

from caldm.bundle import init_bundle, load_bundle, read_meta, save_bundle
from caldm.config import preset, save_config
from caldm.data.phantom import write_phantom_dataset
from caldm.nn.factory import build

REPO = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--max-steps", "2"]


def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_stage(*args: str) -> int:
    return _job("train_stage").main([str(a) for a in args])


def weights(bundle: Path, name: str) -> dict[str, np.ndarray]:
    return load_file(str(bundle / f"{name}.safetensors"))


def changed(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    assert a.keys() == b.keys()
    return any(not np.array_equal(a[k], b[k]) for k in a)


def assert_trained(run: Path, before: Path, trains: list[str], frozen: list[str]) -> dict:
    """A finished run: 2 steps, finite loss, trainables moved, frozen modules bit-identical."""
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 2 and summary["resumed_from_step"] == 0
    assert math.isfinite(summary["loss"])
    assert Path(summary["checkpoint"]).is_dir()
    assert summary["bundle"] == str(run / "bundle")
    for name in trains:
        assert changed(weights(before, name), weights(run / "bundle", name)), name
    for name in frozen:
        assert not changed(weights(before, name), weights(run / "bundle", name)), name
    return summary


def optimizer_shards(summary: dict) -> list[str]:
    pattern = os.path.join(summary["checkpoint"], "model", "state", "*optim_states.pt")
    return sorted(os.path.basename(p) for p in glob.glob(pattern))


# --------------------------------------------------------------------------- the chain


@pytest.fixture(scope="module")
def root(tmp_path_factory, ray_cluster) -> Path:
    root = tmp_path_factory.mktemp("train")
    write_phantom_dataset(str(root / "data"), count=4, preset="tiny", seed=0)
    init_bundle("tiny", str(root / "init"))
    return root


@pytest.fixture(scope="module")
def ae2d_run(root: Path) -> Path:
    out = root / "ae2d"
    rc = train_stage(
        "--stage", "ae2d", *TINY, "--data", root / "data", "--out", out,
        "--bundle", root / "init", "--zero-stage", "1",
        "--set", "model.loss.adv_start_step=0", "--set", "train.grad_accum=2",
    )  # fmt: skip
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def nhae_run(root: Path, ae2d_run: Path) -> Path:
    out = root / "nhae"
    rc = train_stage(
        "--stage", "nhae", *TINY, "--data", root / "data", "--out", out,
        "--bundle", ae2d_run / "bundle",
        "--set", "train.precision=bf16", "--set", "train.activation_checkpointing=true",
    )  # fmt: skip
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def adaptor_run(root: Path, nhae_run: Path) -> Path:
    out = root / "adaptor"
    rc = train_stage(
        "--stage", "adaptor", *TINY, "--data", root / "data", "--out", out,
        "--bundle", nhae_run / "bundle", "--zero-stage", "3",
        "--set", "model.loss.adv_start_step=0",
    )  # fmt: skip
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def latents(root: Path, adaptor_run: Path) -> Path:
    out = root / "latents"
    job = _job("encode_latents")
    assert job.main(["--bundle", str(adaptor_run / "bundle"), "--data", str(root / "data"),
                     "--out", str(out), "--views", "1"]) == 0  # fmt: skip
    return out


@pytest.fixture(scope="module")
def diff3d_run(root: Path, latents: Path, adaptor_run: Path) -> Path:
    out = root / "diff3d"
    rc = train_stage(
        "--stage", "diff3d", *TINY, "--data", latents, "--out", out,
        "--bundle", adaptor_run / "bundle", "--workers", "2", "--zero-stage", "2",
    )  # fmt: skip
    assert rc == 0
    return out


# --------------------------------------------------------------------------- tests


def test_ae2d_trains_with_gan_and_tracks_in_mlflow(ae2d_run: Path, root: Path) -> None:
    summary = assert_trained(
        ae2d_run, root / "init", ["enc2d", "dec2d"], ["enc3d", "f_sr", "adaptors", "diff3d"]
    )
    assert optimizer_shards(summary) == ["zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert (Path(summary["checkpoint"]) / "disc" / "state").is_dir()  # discriminator engine
    assert json.loads((ae2d_run / "run.json").read_text())["stage"] == "ae2d"

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{ae2d_run / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("caldm-train").experiment_id])
    assert run.data.params["train.grad_accum"] == "2"
    assert run.data.params["perceptual_in_use"] == "spectral"  # the default: no download
    for key in ("loss", "l1", "perceptual", "column", "d_loss", "lr", "samples_per_s", "grad_norm"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 2, key
    assert glob.glob(str(ae2d_run / "mlartifacts" / "**" / "previews" / "*.png"), recursive=True)


def test_nhae_trains_enc3d_and_f_sr_only(nhae_run: Path, ae2d_run: Path) -> None:
    assert_trained(nhae_run, ae2d_run / "bundle", ["enc3d", "f_sr"], ["enc2d", "dec2d"])


def test_export_is_the_fp32_master_weights(nhae_run: Path) -> None:
    """bf16 training: the bundle holds the optimizer's fp32 master weights (as DeepSpeed's
    zero_to_fp32 reads them from the checkpoint), not the bf16 copies rounded up."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    summary = json.loads((nhae_run / "summary.json").read_text())
    master = get_fp32_state_dict_from_zero_checkpoint(
        str(Path(summary["checkpoint"]) / "model"), tag="state"
    )
    compared, finer_than_bf16 = 0, False
    for name in ("enc3d", "f_sr"):
        for key, value in weights(nhae_run / "bundle", name).items():
            if f"trainable.{name}.{key}" in master:
                want = master[f"trainable.{name}.{key}"].detach().float()
                np.testing.assert_array_equal(value, want.numpy(), err_msg=f"{name}.{key}")
                compared += 1
                finer_than_bf16 |= not torch.equal(want, want.bfloat16().float())
    assert compared > 10 and finer_than_bf16


def test_adaptor_zero3_trains_adaptors_only(adaptor_run: Path, nhae_run: Path) -> None:
    bundle = adaptor_run / "bundle"
    assert_trained(adaptor_run, nhae_run / "bundle", ["adaptors"], ["enc2d", "dec2d", "enc3d"])
    load_bundle(str(bundle))  # every module loads strictly


def test_encode_latents_cache_stats_and_rerun(
    latents: Path, root: Path, adaptor_run, capsys
) -> None:
    from caldm.data.latents import view_id

    ids = sorted(p.stem.split(".")[0] for p in (root / "data" / "images").glob("*.nii.gz"))
    cfg = preset("tiny")
    half = cfg.model.image_shape[1] // cfg.model.latent_shape[2] // 2  # --views 1: half a pixel
    views = sorted(view_id(i, r) for i in ids for r in (0, half))
    cached = sorted(p.name.removesuffix(".safetensors") for p in latents.glob("*.safetensors"))
    assert cached == views
    z = load_file(str(latents / "phantom_0000.safetensors"))
    assert z["z"].shape == cfg.model.latent_shape
    assert z["z_sr"].shape == z["z_hr"].shape == cfg.model.z_sr_shape
    stats = json.loads((latents / "stats.json").read_text())
    assert stats["count"] == 8 and stats["z_hr"]["std"] > 0
    assert json.loads((latents / "source.json").read_text())["data"] == str(root / "data")
    job = _job("encode_latents")
    before = (latents / "phantom_0000.safetensors").stat().st_mtime_ns
    args = ["--bundle", str(adaptor_run / "bundle"), "--data", str(root / "data"), "--views", "1"]
    assert job.main([*args, "--out", str(latents)]) == 0  # resumable: nothing re-encoded
    assert (latents / "phantom_0000.safetensors").stat().st_mtime_ns == before
    assert json.loads((latents / "stats.json").read_text()) == stats
    # Provenance: the cache records its encoders; another NHAE is refused by encoding into
    # it and by training on it (root/init has other enc3d/f_sr/enc2d weights).
    from caldm.bundle import nhae_hash

    assert stats["nhae_hash"] == nhae_hash(str(adaptor_run / "bundle"))
    other = ["--bundle", str(root / "init"), "--data", str(root / "data")]
    assert job.main([*other, "--out", str(latents)]) == 2
    assert train_stage("--stage", "diff3d", *TINY, "--data", latents, "--out",
                       root / "other_nhae", "--bundle", root / "init") == 2  # fmt: skip
    assert "latents encoded by another NHAE" in capsys.readouterr().err


def test_diff3d_two_workers_zero2_one_shard_per_rank(diff3d_run: Path, adaptor_run) -> None:
    summary = assert_trained(diff3d_run, adaptor_run / "bundle", ["diff3d"], ["refiner", "dec2d"])
    assert optimizer_shards(summary) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    stats = json.loads((Path(diff3d_run).parent / "latents" / "stats.json").read_text())
    scale = read_meta(str(diff3d_run / "bundle"))["latent_scale"]["diff3d"]
    assert scale == pytest.approx(1 / stats["z"]["std"])


def test_conditioned_refiner_killed_after_checkpoint_resumes(
    root: Path, latents: Path, diff3d_run: Path, monkeypatch, capsys
) -> None:
    out = root / "refiner"
    args = [
        "--stage", "refiner", "--preset", "tiny", "--max-steps", "4", "--data", latents,
        "--out", out, "--bundle", diff3d_run / "bundle", "--condition", "layers",
        "--set", "train.max_failures=0", "--set", "train.checkpoint_every=2",
    ]  # fmt: skip
    monkeypatch.setenv("CALDM_FAIL_AFTER_STEP", "2")
    assert train_stage(*args) == 1  # the worker "dies" right after checkpointing step 2
    assert not (out / "summary.json").exists()
    monkeypatch.delenv("CALDM_FAIL_AFTER_STEP")
    # Guarded resume: checkpoints of other settings are refused in one line naming the change.
    capsys.readouterr()
    for extra, named in (
        (["--workers", "2"], "--workers 1 -> 2"),
        (["--zero-stage", "3"], "--zero-stage 2 -> 3"),
        (["--set", "train.lr=0.5"], "train.lr"),
    ):
        assert train_stage(*args, *extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and named in err, err
    run = json.loads((out / "run.json").read_text())
    assert (run["world_size"], run["zero_stage"]) == (1, 2) and len(run["config_hash"]) == 64
    assert train_stage(*args, "--max-steps", "4") == 0  # the schedule may change; it does not
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["resumed_from_step"], summary["global_step"]) == (2, 4)

    # The resume continued the same MLflow run (its id kept in run.json), now FINISHED.
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    (tracked,) = client.search_runs([client.get_experiment_by_name("caldm-train").experiment_id])
    assert tracked.info.run_id == run["mlflow_run_id"] and tracked.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(tracked.info.run_id, "loss")]
    assert sorted(steps) == [1, 2, 3, 4]

    bundle = out / "bundle"
    meta = read_meta(str(bundle))
    assert meta["condition"] == "layers" and meta["conditioned"] == ["refiner"]
    assert set(meta["latent_scale"]) == {"diff3d", "refiner"}
    loaded = load_bundle(str(bundle), ["refiner", "cond_refiner", "diff3d"])
    unconditional = weights(diff3d_run / "bundle", "refiner")
    tuned = weights(bundle, "refiner")
    conv_in = "unet.conv_in.conv.weight"
    old_in = unconditional[conv_in].shape[1]
    assert tuned[conv_in].shape[1] == old_in + preset("tiny").model.condition.channels
    assert changed(
        {k: v for k, v in unconditional.items() if k != conv_in},
        {k: v for k, v in tuned.items() if k != conv_in},
    )
    assert loaded["refiner"].in_channels == tuned[conv_in].shape[1]


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_fail_before_any_worker(tmp_path: Path, capsys) -> None:
    cfg = preset("tiny")
    data = tmp_path / "data"
    write_phantom_dataset(str(data), count=2, preset="tiny")
    no_dec2d = tmp_path / "no_dec2d"
    save_bundle(str(no_dec2d), cfg, {"enc2d": build("enc2d", cfg)})
    ae2d_cfg = tmp_path / "ae2d.yaml"
    save_config(cfg.model_copy(update={"stage": "ae2d"}), str(ae2d_cfg))
    other = tmp_path / "other"
    other.mkdir()
    (other / "run.json").write_text(json.dumps({"stage": "ae2d", "condition": None}))
    empty = tmp_path / "empty_latents"
    empty.mkdir()
    base = ["--preset", "tiny", "--data", str(data)]
    capsys.readouterr()
    cases = {
        "lacks dec2d": ["--stage", "adaptor", *base, "--out", tmp_path / "a", "--bundle",
                        no_dec2d],
        "config of stage 'ae2d'": ["--stage", "nhae", *base, "--out", tmp_path / "b",
                                   "--bundle", no_dec2d, "--config", ae2d_cfg],
        "no latent cache": ["--stage", "diff3d", "--preset", "tiny", "--data", empty,
                            "--out", tmp_path / "c"],
        "holds a run of stage 'ae2d'": ["--stage", "nhae", *base, "--out", other,
                                        "--bundle", no_dec2d],
        "unknown config key 'train.lrr'": ["--stage", "ae2d", *base, "--out", tmp_path / "d",
                                           "--set", "train.lrr=1"],
        "takes no label condition": ["--stage", "ae2d", *base, "--out", tmp_path / "e",
                                     "--condition", "layers"],
    }  # fmt: skip
    for expected, args in cases.items():
        assert train_stage(*args) == 2, expected
        err = capsys.readouterr().err.strip()
        assert err.startswith("train_stage: error: ") and "\n" not in err, err
        assert expected in err, err
    assert not (tmp_path / "a").exists()  # nothing written for a rejected run
    job = _job("encode_latents")
    assert job.main(["--bundle", str(no_dec2d), "--data", str(data), "--out", "x"]) == 2
    assert "lacks enc3d, f_sr" in capsys.readouterr().err


def test_help_needs_no_cluster() -> None:
    for name in ("train_stage", "encode_latents"):
        done = subprocess.run(
            [sys.executable, str(REPO / "jobs" / f"{name}.py"), "--help"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0 and "--out" in done.stdout


# --------------------------------------------------------------------------- ray job submit


def _node_ip() -> str:
    import ray._private.services

    return ray._private.services.get_node_ip_address()


@pytest.fixture
def ray_head(tmp_path: Path, s3_server: str):
    """``ray start --head`` in its own process group; killed by that group (never ``ray stop``,
    which would also stop every other Ray on the machine)."""
    port, dash, agent, client = (free_port() for _ in range(4))
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    env.pop("RAY_ADDRESS", None)
    ray = str(Path(sys.executable).parent / "ray")
    # Its own short temp dir (sockets live there): no trace in /tmp/ray for other Rays to find.
    temp = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")
    cmd = [ray, "start", "--head", "--block", "--num-cpus", "2", "--port", str(port),
           "--dashboard-port", str(dash), "--include-dashboard", "true",
           # free ports for what otherwise has fixed defaults another Ray may hold already
           "--dashboard-agent-listen-port", str(agent), "--ray-client-server-port", str(client),
           "--temp-dir", temp]  # fmt: skip
    log = open(tmp_path / "head.log", "w")  # noqa: SIM115
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 120
        for host, wait_port in (("127.0.0.1", dash), (_node_ip(), agent)):  # jobs need both
            while time.time() < deadline:
                try:
                    socket.create_connection((host, wait_port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(1)
        yield f"http://127.0.0.1:{dash}", env
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # the head's process group: only what it started
        head.wait(timeout=30)
        kill_processes_using(temp)  # what left the group (dashboard, agents, nodes)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_to_a_head_with_s3_storage(ray_head, s3_bucket: str, tmp_path) -> None:
    import s3fs

    address, env = ray_head
    data = tmp_path / "data"
    write_phantom_dataset(str(data), count=2, preset="tiny")
    out = f"{s3_bucket}/runs/ae2d"
    ray = str(Path(sys.executable).parent / "ray")
    cmd = [ray, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
           sys.executable, "jobs/train_stage.py", "--stage", "ae2d", *TINY,
           "--data", str(data), "--out", out]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    fs = s3fs.S3FileSystem()
    summary = json.loads(fs.cat(f"{out}/summary.json"))
    assert summary["global_step"] == 2 and summary["checkpoint"].startswith(out)
    assert fs.exists(f"{out}/bundle/enc2d.safetensors")
    assert fs.glob(f"{summary['checkpoint']}/model/state/*optim_states.pt")


def test_warmup_ramps_the_learning_rate_linearly_then_holds() -> None:
    import torch

    from caldm.distributed.engine import warmup_schedule

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1e-3)
    assert warmup_schedule(opt, 0) is None
    schedule = warmup_schedule(opt, 4)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
