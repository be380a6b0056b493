"""cluster.yaml passes Ray's own cluster-launcher validation and keeps its promises."""

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_validates_and_keeps_its_promises() -> None:
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    prepared = prepare_config(config)  # as `ray up` does: AWS defaults merged, docker checked
    validate_config(prepared)  # Ray's JSON schema and its version checks
    assert prepared["available_node_types"]["g5.4xa10g"]["max_workers"] == 4

    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["GPU"] == 0  # the head schedules no GPU work
    workers = {
        name: spec["node_config"]["InstanceType"]
        for name, spec in config["available_node_types"].items()
        if name != config["head_node_type"]
    }
    families = {t.split(".")[0] for t in workers.values()}
    assert families == {"g5", "g6"}  # A10G and L4: 24 GB cards
    assert {"g5.2xlarge", "g5.12xlarge", "g6.2xlarge", "g6.12xlarge"} <= set(workers.values())
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
    assert "2.60" in config["docker"]["image"]
