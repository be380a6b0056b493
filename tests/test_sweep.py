"""Ray Tune sweeps (tuning/sweep.py) at tiny on CPU: two 2-trial sweeps, a resume, bad input.

Each trial is a real stage run (TorchTrainer + DeepSpeed, 1 worker, 3 steps, evaluated at steps
2 and 3); trials run one at a time on the session's 2-CPU Ray.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from caldm.bundle import init_bundle, save_bundle
from caldm.config import load_config, preset
from caldm.data.latents import latent_url, write_latent_source, write_latents
from caldm.data.phantom import write_phantom_dataset
from caldm.errors import ConfigError
from caldm.nn.factory import build

REPO = Path(__file__).resolve().parents[1]
SWEEP = ["--samples", "2", "--max-steps", "3", "--preset", "tiny"]


def _sweep_main():
    spec = importlib.util.spec_from_file_location("tuning_sweep", REPO / "tuning" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def sweep(*args: object) -> int:
    return _sweep_main()([str(a) for a in args])


def read_trials(out: Path) -> list[dict[str, str]]:
    with open(out / "trials.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Phantom volumes, a random bundle, and a latent cache of random tensors."""
    root = tmp_path_factory.mktemp("sweep")
    write_phantom_dataset(str(root / "data"), count=3, preset="tiny", seed=0)
    init_bundle("tiny", str(root / "init"))
    cfg = preset("tiny")
    rng = np.random.default_rng(0)
    for i in range(3):
        m = cfg.model
        write_latents(
            latent_url(str(root / "latents"), f"v{i}"),
            z=rng.standard_normal(m.latent_shape),
            z_sr=rng.standard_normal(m.z_sr_shape),
            z_hr=rng.standard_normal(m.z_sr_shape),
        )
    write_latent_source(str(root / "latents"), str(root / "data"))
    stats = {k: {"mean": 0.0, "std": 1.0} for k in ("z", "z_sr", "z_hr")}
    (root / "latents" / "stats.json").write_text(json.dumps({"count": 3, **stats}))
    # A bundle with Enc2D but no Dec2D: the adaptor sweep cannot start from it.
    save_bundle(str(root / "no_dec2d"), cfg, {"enc2d": build("enc2d", cfg)})
    return root


def assert_sweep(out: Path, stage: str, searched: list[str]) -> list[dict[str, str]]:
    """2 finished trials with finite scores; best.yaml = the best row's values, stage set."""
    rows = read_trials(out)
    assert len(rows) == 2
    # ASHA may stop the worse trial at its first evaluation (step 2)
    assert all((r["status"], r["step"]) in {("done", "3"), ("stopped", "2")} for r in rows), rows
    scores = [float(r["val_score"]) for r in rows]
    assert all(math.isfinite(s) for s in scores)
    cfg = load_config(None, str(out / "best.yaml"))
    assert cfg.stage == stage and cfg.preset == "tiny"
    assert cfg.train.max_steps == preset("tiny").train.max_steps  # not the sweep's budget
    best = rows[int(np.argmin(scores))]
    flat = cfg.flat()
    for key in searched:
        assert yaml.safe_load(best[key]) == pytest.approx(flat[key]), key
    for row in (r for r in rows if r["status"] == "done"):  # ran to its end: summary written
        summary = json.loads((out / "trials" / row["trial_id"] / "summary.json").read_text())
        assert summary["global_step"] == 3
    return rows


def test_adaptor_sweep_and_resume(root: Path, ray_cluster, capsys) -> None:
    out = root / "adaptor"
    rc = sweep(
        "--target", "adaptor", "--bundle", root / "init", "--data", root / "data",
        "--out", out, *SWEEP,
    )  # fmt: skip
    assert rc == 0
    searched = [
        "train.lr",
        "model.adaptor.alpha_init",
        "model.adaptor.kernel_size",
        "model.k",
        "model.adaptor.levels",
    ]
    rows = assert_sweep(out, "adaptor", searched)
    for r in rows:  # the score is reconstruction plus the inter-slice consistency term
        total = float(r["val_rec"]) + float(r["val_consistency"])
        assert float(r["val_score"]) == pytest.approx(total)
        assert float(r["val_consistency"]) > 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["best_score"] == min(float(r["val_score"]) for r in rows)

    # The base bundle holds only the frozen modules: trials start their adaptors fresh.
    assert json.loads((out / "base_bundle" / "bundle.json").read_text())["modules"] == [
        "dec2d",
        "enc2d",
    ]
    # best.yaml is accepted by the train job on a bundle without adaptors.
    from caldm.distributed.train import TrainRequest, plan

    p = plan(
        TrainRequest(
            stage="adaptor",
            data=str(root / "data"),
            out=str(root / "best_check"),
            bundle=str(out / "base_bundle"),
            config_file=str(out / "best.yaml"),
        )
    )
    assert p.cfg.model.adaptor == load_config(None, str(out / "best.yaml")).model.adaptor

    # A rerun with the same --out resumes the finished sweep: no new trials, same results.
    trials = sorted(p.name for p in (out / "trials").iterdir())
    assert sweep(
        "--target", "adaptor", "--bundle", root / "init", "--data", root / "data",
        "--out", out, *SWEEP,
    ) == 0  # fmt: skip
    assert sorted(p.name for p in (out / "trials").iterdir()) == trials
    assert read_trials(out) == rows


def test_refiner_sweep_optuna(root: Path, ray_cluster) -> None:
    out = root / "refiner"
    rc = sweep(
        "--target", "refiner", "--bundle", root / "init", "--data", root / "latents",
        "--out", out, "--search", "optuna", *SWEEP,
    )  # fmt: skip
    assert rc == 0
    searched = [
        "train.lr",
        "model.refiner.channels",
        "train.ema_decay",
        "diffusion.prediction_type",
    ]
    rows = assert_sweep(out, "refiner", searched)
    assert "model.condition.dropout" not in rows[0]  # no --condition: not searched
    assert all(float(r["val_loss"]) > 0 for r in rows)


def test_bad_space_key_fails_before_any_trial(root: Path, tmp_path: Path, capsys) -> None:
    spaces = tmp_path / "spaces.yaml"
    spaces.write_text("adaptor:\n  model.adaptor.kernel: {choice: [3, 5]}\n")
    out = tmp_path / "out"
    rc = sweep(
        "--target", "adaptor", "--bundle", root / "init", "--data", root / "data",
        "--out", out, "--spaces", spaces, *SWEEP,
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert str(spaces) in err and "'model.adaptor.kernel'" in err
    assert "did you mean 'model.adaptor.kernel_size'" in err
    assert not out.exists()


def test_bad_space_value_fails_before_any_trial(root: Path, tmp_path: Path) -> None:
    from caldm.search_space import load_space

    spaces = tmp_path / "spaces.yaml"
    spaces.write_text("adaptor:\n  model.k: {choice: [3, 4]}\n")  # k must be odd
    with pytest.raises(ConfigError, match=r"spaces\.yaml: adaptor: .*model\.k.*odd"):
        load_space(str(spaces), "adaptor", "tiny")


def test_bundle_without_dec2d_fails_before_any_trial(root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    rc = sweep(
        "--target", "adaptor", "--bundle", root / "no_dec2d", "--data", root / "data",
        "--out", out, *SWEEP,
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "lacks dec2d" in err and "adaptor sweep" in err
    assert not out.exists()


def test_refiner_needs_a_latent_cache(root: Path, tmp_path: Path, capsys) -> None:
    rc = sweep(
        "--target", "refiner", "--bundle", root / "init", "--data", root / "data",
        "--out", tmp_path / "out", *SWEEP,
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "encode_latents" in err and str(root / "data") in err


def test_concurrency_below_one_fails_before_any_trial(
    root: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    rc = sweep(
        "--target", "adaptor", "--bundle", root / "init", "--data", root / "data",
        "--out", out, "--concurrency", "0", *SWEEP,
    )  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--concurrency 0" in err
    assert not out.exists()


def test_bundle_without_adaptors_frees_their_config(root: Path, tmp_path: Path) -> None:
    """The train plan lets a run shape a module its bundle lacks, and only such a module."""
    from caldm.distributed.train import TrainRequest, plan

    bundle = tmp_path / "ae"
    cfg = preset("tiny")
    save_bundle(str(bundle), cfg, {n: build(n, cfg) for n in ("enc2d", "dec2d")})
    for url in (bundle, root / "init"):
        request = TrainRequest(
            stage="adaptor",
            data=str(root / "data"),
            out=str(tmp_path / "run"),
            bundle=str(url),
            overrides=("model.adaptor.kernel_size=5", "model.k=3"),
        )
        if url == bundle:
            assert plan(request).cfg.model.adaptor.kernel_size == 5
        else:
            with pytest.raises(ConfigError, match=r"another model \(model\.(k|adaptor\.)"):
                plan(request)


@pytest.mark.long
def test_asha_stops_trials_cleanly(root: Path, ray_cluster, tmp_path: Path) -> None:
    """Enough trials that ASHA stops some (grace period 1 of 4 steps; a learning rate that
    wrecks the adaptors next to a sane one): no trial ends in ERROR (a reused actor of a stopped
    trial would still hold its workers), and every trial's MLflow run is closed with its final
    status (stopped ones KILLED, not left RUNNING)."""
    import time

    import mlflow
    import ray

    before = set(ray.util.placement_group_table())
    spaces = tmp_path / "spaces.yaml"
    spaces.write_text("adaptor:\n  train.lr: {choice: [1.0e-4, 3.0]}\n")
    out = tmp_path / "asha"
    rc = sweep(
        "--target", "adaptor", "--bundle", root / "init", "--data", root / "data",
        "--out", out, "--spaces", spaces, "--samples", "4", "--max-steps", "4",
        "--eval-every", "1", "--preset", "tiny",
    )  # fmt: skip
    assert rc == 0
    rows = read_trials(out)
    statuses = sorted(r["status"] for r in rows)
    assert "error" not in statuses and "stopped" in statuses, rows
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    expect = {"done": "FINISHED", "stopped": "KILLED"}
    for row in rows:
        run_id = json.loads((out / "trials" / row["trial_id"] / "run.json").read_text())[
            "mlflow_run_id"
        ]
        assert client.get_run(run_id).info.status == expect[row["status"]], row
    # A stopped trial's placement group is given back (Ray Train's cleaner removes it once it
    # sees the trial's controller dead), not held until the session ends.
    deadline = time.monotonic() + 30
    while held := [
        pg_id
        for pg_id, pg in ray.util.placement_group_table().items()
        if pg_id not in before and pg.get("state") != "REMOVED"
    ]:
        assert time.monotonic() < deadline, f"placement groups still held: {held}"
        time.sleep(0.5)


@pytest.mark.long
def test_sweep_killed_mid_trial_resumes(root: Path, ray_cluster, tmp_path: Path) -> None:
    """The sweep's driver is killed (SIGKILL, as a lost head node or a cancelled job) while a
    trial is between checkpoints; the same command again resumes the experiment: the killed
    trial continues from its newest checkpoint in its own run directory and MLflow run, no
    trial ends in ERROR, and every MLflow run is closed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import mlflow

    out = tmp_path / "killed"
    args = [
        "--target", "adaptor", "--bundle", root / "init", "--data", root / "data",
        "--out", out, "--samples", "2", "--max-steps", "4", "--eval-every", "1",
        "--preset", "tiny",
    ]  # fmt: skip

    def registered() -> dict[str, int]:
        """Trials with a checkpoint Ray Train has recorded (the newest step), unfinished."""
        found = {}
        for snap in out.glob("trials/*/adaptor/checkpoint_manager_snapshot.json"):
            try:
                results = json.loads(snap.read_text())["checkpoint_results"]
            except (ValueError, KeyError):  # being written
                continue
            steps = [r["metrics"]["step"] for r in results]
            if steps and max(steps) < 4:
                found[snap.parents[1].name] = max(steps)
        return found

    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tuning" / "sweep.py"), *map(str, args)],
        env={**os.environ, "RAY_ADDRESS": ray_cluster},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (killed := registered()):
            assert proc.poll() is None, f"the sweep ended early (rc {proc.returncode})"
            assert time.monotonic() < deadline, "no trial checkpointed within 240 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    run_ids = {
        t: json.loads((out / "trials" / t / "run.json").read_text())["mlflow_run_id"]
        for t in killed
    }

    assert sweep(*args) == 0
    rows = {r["trial_id"]: r for r in read_trials(out)}
    assert len(rows) == 2 and set(killed) <= set(rows), (killed, rows)
    assert all(r["status"] in ("done", "stopped") for r in rows.values()), rows
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    expect = {"done": "FINISHED", "stopped": "KILLED"}
    for trial, step in killed.items():
        row = rows[trial]
        run = json.loads((out / "trials" / trial / "run.json").read_text())
        assert run["mlflow_run_id"] == run_ids[trial]  # the same run, continued
        assert client.get_run(run_ids[trial]).info.status == expect[row["status"]], row
        # Trials run one at a time, so the killed one was first at every ASHA rung: it ran
        # to its end, from its checkpoint rather than from step 0.
        assert row["status"] == "done", row
        summary = json.loads((out / "trials" / trial / "summary.json").read_text())
        assert summary["global_step"] == 4 and summary["resumed_from_step"] >= step, summary


def test_sweep_warns_when_the_state_api_is_unreachable(ray_cluster, monkeypatch, caplog) -> None:
    """Without the State API Ray Train cannot give back an ASHA-stopped trial's placement
    group: the sweep says so in one line (the session cluster has the API: no warning)."""
    import ray.util.state

    from caldm.distributed.tune import _warn_without_state_api

    with caplog.at_level("WARNING", logger="caldm.sweep"):
        _warn_without_state_api()
    assert not caplog.records

    def unreachable(*args: object, **kwargs: object) -> None:
        raise ray.util.state.exception.ServerUnavailable("no dashboard")

    monkeypatch.setattr(ray.util.state, "list_actors", unreachable)
    with caplog.at_level("WARNING", logger="caldm.sweep"):
        _warn_without_state_api()
    (record,) = caplog.records
    assert "State API is not reachable (ServerUnavailable)" in record.getMessage()
    assert "start Ray with its dashboard" in record.getMessage()
