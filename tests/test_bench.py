"""Meta-device accounting: exact on a case computed by hand, and the paper-scale budget."""

import json
import subprocess
import sys

import pytest
import torch

from caldm.bench.memory import GIB, stage_peak_bytes
from caldm.bench.meta import PeakMemory, module_bytes
from caldm.config import STAGES, preset


def test_peak_memory_counts_a_linear_layer_by_hand() -> None:
    with torch.device("meta"):
        lin = torch.nn.Linear(1000, 1000)
        x = torch.empty(64, 1000)
    with PeakMemory(module_bytes(lin)) as pm:
        y = lin(x).relu()  # addmm output (256 kB), then relu output (256 kB) kept for backward
        y.sum().backward()
    params = 4 * (1000 * 1000 + 1000)
    # live at the end: params, their grads, y
    assert pm.current == 2 * params + 64 * 1000 * 4
    # peak: params + both activations + the weight grad being formed
    assert pm.peak >= 2 * params + 2 * 64 * 1000 * 4
    del y
    assert pm.current == 2 * params


def test_views_and_inplace_ops_cost_nothing() -> None:
    x = torch.empty(1000, device="meta")
    with PeakMemory() as pm:
        v = x.view(10, 100).t()
        v.mul_(2)
    assert pm.peak == 0


def test_paper_training_fits_a_24gb_card() -> None:
    cfg = preset("paper")
    peaks = {stage: stage_peak_bytes(stage, cfg)["peak"] for stage in STAGES}
    assert all(p <= 22 * GIB for p in peaks.values()), {k: v / GIB for k, v in peaks.items()}
    # and the accounting is not trivially small: the diffusion UNet alone holds ~666M params
    assert peaks["diff3d"] > 10 * GIB


@pytest.mark.parametrize("flag", [[], ["--json"]])
def test_info_command(flag: list[str]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "caldm", "info", "--preset", "paper", *flag],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if flag:
        info = json.loads(out)
        assert info["image_shape"] == [512, 512, 512]
        assert info["thumbnail_shape"] == [256, 256, 256]
        assert info["slice_latent_shape"] == [4, 64, 64]
        assert set(info["params"]) == {
            "enc2d",
            "dec2d",
            "enc3d",
            "f_sr",
            "adaptors",
            "diff3d",
            "refiner",
        }
    else:
        assert "diff3d" in out and "parameters" in out


def test_bench_memory_command_json() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "caldm", "bench", "memory", "--preset", "tiny", "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    report = json.loads(out)
    assert set(report["train"]) == set(STAGES)
    assert all(v > 0 for v in report["train"].values()) and report["sample"] > 0
    # label-guided rows: the encoders and their class-fraction input cost something on top
    guided = report["conditioned"]
    assert guided["layer_classes"] == 11 and set(guided["train"]) == {"diff3d", "refiner"}
    assert guided["sample"] > report["sample"]
    assert all(guided["train"][s] > report["train"][s] for s in guided["train"])


# ---------------------------------------------------------------- benchmarks/gpu_suite.py


def _gpu_suite():
    """benchmarks/gpu_suite.py as a module (benchmarks/ is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"
    spec = importlib.util.spec_from_file_location("gpu_suite", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REQUIRED_KEYS = {
    "device",
    "train_peak_gib",
    "train_accounted_gib",
    "sample_peak_gib",
    "sample_accounted_gib",
    "seconds_per_volume",
    "skipped",
    "errors",
}


def test_gpu_suite_dry_run_reports_consistent_figures(tmp_path) -> None:
    suite = _gpu_suite()
    budget = 10.0
    argv = ["--dry-run", "--out", str(tmp_path), "--budget-s", str(budget), "--volumes", "1"]
    suite.main([*argv, "--stages", "ae2d", "diff3d", "--train-steps", "1"])
    r = json.loads((tmp_path / "gpu_cpu.json").read_text())
    assert REQUIRED_KEYS <= set(r) and r["device"] == "cpu" and r["dry_run"]
    assert (tmp_path / "gpu_cpu.md").read_text().startswith("# GPU figures: cpu, preset tiny")
    assert r["errors"] == {}
    skipped = {s["part"] for s in r["skipped"]}
    assert {"train:nhae", "train:adaptor", "train:refiner"} <= skipped  # not selected
    # every figure is either there and sane, or its part is listed as skipped
    for stage in STAGES:
        peak, acc = r["train_peak_gib"][stage], r["train_accounted_gib"][stage]
        if peak is None:
            assert f"train:{stage}" in skipped and acc is None
            continue
        # the stand-in step holds what the meta accounting counts (same counting on the CPU)
        assert 0.5 < peak / acc < 1.5, (stage, peak, acc)
        assert r["train_ratio"][stage] == pytest.approx(peak / acc)
        assert r["train_steps_per_s"][stage] > 0
    assert set(suite.REQUIRED_SECONDS) <= set(r["seconds_per_volume"])
    for key, seconds in r["seconds_per_volume"].items():
        source = r["seconds_source"][key]
        if seconds is None:
            assert source is None and "sample:probe" in skipped | set(r["errors"])
            continue
        assert seconds > 0 and source in ("measured", "extrapolated")
        assert sum(r["seconds_split"][key].values()) == pytest.approx(seconds)
        if source == "measured":
            assert f"sample:{key}" not in skipped
    if r["sample_peak_gib"] is None:
        assert "sample:dpmpp20_chunked" in skipped
    else:
        assert 0.5 < r["sample_peak_gib"] / r["sample_accounted_gib"] < 1.5
    f = r["flops_per_volume"]
    if f["ddim200_exact"] is None:
        assert "flops" in skipped
    else:  # exact decoding passes every latent slice k times; 200 steps cost more than 20
        assert f["ddim200_exact"] > f["ddim200_chunked"] > f["dpmpp20_chunked"] > 0
        assert f["dpmpp20_exact"] > f["dpmpp20_chunked"]
    assert r["fraction_of_bf16_peak"]["ddim200_exact"] is None  # no known peak for a CPU
    v = r["volumes_per_hour"]
    assert v is None or (v["inline_per_hour"] > 0 and v["overlapped_per_hour"] > 0)
    assert "throughput" in skipped or v is not None


def test_gpu_suite_out_of_budget_skips_everything(tmp_path) -> None:
    suite = _gpu_suite()
    suite.main(["--dry-run", "--out", str(tmp_path), "--budget-s", "0"])
    r = json.loads((tmp_path / "gpu_cpu.json").read_text())
    skipped = {s["part"] for s in r["skipped"]}
    assert {f"train:{s}" for s in STAGES} | {"sample:setup", "flops", "throughput"} <= skipped
    assert all(v is None for v in r["train_peak_gib"].values())
    assert all(v is None for v in r["seconds_per_volume"].values())
    assert r["sample_peak_gib"] is None and r["volumes_per_hour"] is None
    assert "Skipped: train:ae2d" in (tmp_path / "gpu_cpu.md").read_text()


def test_master_weight_adamw_matches_adamw_on_fp32_masters() -> None:
    """The stand-in optimizer for bf16 weights: fp32 masters updated by AdamW with the bf16
    gradient, the bf16 weights rounded from them, gradients folded and cleared."""
    suite = _gpu_suite()
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64).bfloat16())
    start = w.detach().clone()
    ref = w.detach().float().clone().requires_grad_()
    x = torch.randn(64)
    opt = suite.MasterWeightAdamW([w], lr=0.1, betas=(0.9, 0.999), weight_decay=0.01, grad_clip=0)
    ref_opt = torch.optim.AdamW([ref], lr=0.1, betas=(0.9, 0.999), weight_decay=0.01)
    for _ in range(3):
        (w.float() * x).sum().backward()
        assert w.grad is None  # folded into the fp32 buffer as soon as it was formed
        assert torch.equal(opt.master[0].grad, x.bfloat16().float())
        opt.step()
        ref.grad = x.bfloat16().float()
        ref_opt.step()
        assert torch.allclose(opt.master[0], ref, atol=1e-6)
        assert torch.equal(w.detach(), ref.detach().bfloat16())
        assert not opt.master[0].grad.any()
    assert (w.detach() - start).abs().min() > 0  # every weight moved
