"""cluster.yaml passes Ray's own cluster-launcher validation and keeps its promises."""

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_validates_and_keeps_its_promises() -> None:
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    prepared = prepare_config(config)  # as `ray up` does: AWS defaults merged, docker checked
    validate_config(prepared)  # Ray's JSON schema and its version checks
    assert prepared["available_node_types"]["g5.8xa10g"]["max_workers"] == 6
    assert len(config["provider"]["availability_zone"].split(",")) == 1  # one zone

    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["GPU"] == 0  # the head schedules no GPU work
    workers = {
        name: spec["node_config"]["InstanceType"]
        for name, spec in config["available_node_types"].items()
        if name != config["head_node_type"]
    }
    families = {t.split(".")[0] for t in workers.values()}
    assert families == {"g5", "g6"}  # A10G and L4: 24 GB cards
    assert {"g5.2xlarge", "g5.48xlarge", "g6.2xlarge", "g6.48xlarge"} <= set(workers.values())
    # each GPU type names its card, so a job asking for one never lands on the other; at most
    # 64 GPUs of a card, some of them on 8-GPU nodes (ZeRO-3)
    gpus: dict[str, int] = {}
    for name in workers:
        resources = config["available_node_types"][name]["resources"]
        (card,) = [k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")]
        gpus[card] = gpus.get(card, 0) + resources["GPU"] * config["available_node_types"][
            name
        ]["max_workers"]
    assert gpus == {"A10G": 64, "L4": 64}
    assert any(
        config["available_node_types"][n]["resources"]["GPU"] == 8 for n in workers
    )
    for name, spec in config["available_node_types"].items():
        assert "IamInstanceProfile" in spec["node_config"], name  # S3 through the profile
        if name != config["head_node_type"]:
            assert spec["max_workers"] >= spec["min_workers"] >= 0
    text = (ROOT / "cluster.yaml").read_text()
    assert "AWS_SECRET_ACCESS_KEY" not in text and "aws_secret" not in text.lower()
    head_cmd = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmd
    assert "RAY_AUTH_MODE=token" in head_cmd
    assert "RAY_AUTH_MODE=token" in " ".join(config["worker_start_ray_commands"])
    # the image is the Dockerfile's: Ray 2.60 with caldm baked in, nothing installed at boot
    assert config["docker"]["image"].endswith("/caldm:0.1.0")
    assert "setup_commands" not in config or not config["setup_commands"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0-py311-gpu" in dockerfile
    assert "docker/requirements.lock" in dockerfile
    lock = (ROOT / "docker" / "requirements.lock").read_text().splitlines()
    pins = [line for line in lock if line and not line.startswith("#")]
    assert all("==" in line for line in pins) and any(p.startswith("ray==2.60.0") for p in pins)
