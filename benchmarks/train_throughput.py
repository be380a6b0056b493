"""Training throughput of every stage: samples/s of the real step (DeepSpeed engine, one process).

    python benchmarks/train_throughput.py                  # tiny on CPU, paper when CUDA is up
    python benchmarks/train_throughput.py --preset small --steps 5

Each stage runs :class:`caldm.distributed.train.StageTrainer` (the one the Ray workers run:
ZeRO engines, discriminator engine with the adversarial loss on, EMA for diffusion) on
synthetic batches of the preset's shapes, in a one-process DeepSpeed group, so no data, bundle
or Ray cluster is needed. On CUDA it also prints the measured peak memory
(``torch.cuda.max_memory_allocated``) next to the meta-device estimate of
:mod:`caldm.bench.memory`.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from caldm.config import PRESETS, STAGES, load_config  # noqa: E402
from caldm.stages import example_batch  # noqa: E402

GIB = 2**30


def _init_process_group() -> None:
    """A one-process DeepSpeed group (what Ray Train sets up for each worker)."""
    import deepspeed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    deepspeed.init_distributed("nccl" if torch.cuda.is_available() else "gloo")


def _estimate(stage: str, cfg) -> float | None:
    try:
        from caldm.bench.memory import stage_peak_bytes
    except ImportError:  # accounting module absent
        return None
    return stage_peak_bytes(stage, cfg)["peak"] / GIB


def bench_stage(stage: str, preset: str, steps: int, overrides: list[str]) -> dict[str, float]:
    """Warm up 2 optimizer steps, then time ``steps``; returns samples/s (and GiB on CUDA)."""
    from caldm.distributed.train import StageTrainer, TrainPlan

    # The discriminator is on from step 0 so that GAN stages pay for it (their worst case).
    cfg = load_config(preset, None, ["model.loss.adv_start_step=0", *overrides])
    cfg.stage = stage
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    trainer = StageTrainer(TrainPlan(stage, cfg, data="", out="", bundle=None), device)

    def batches():
        while True:
            yield example_batch(stage, cfg)

    it = batches()
    for _ in range(2):
        trainer.step(it)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.step(it)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    samples = steps * cfg.train.micro_batch * cfg.train.grad_accum
    row = {"samples_per_s": samples / elapsed, "step_s": elapsed / steps}
    if device.type == "cuda":
        row["measured_gib"] = torch.cuda.max_memory_allocated() / GIB
        row["estimate_gib"] = _estimate(stage, cfg)
    del trainer
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = "paper" if torch.cuda.is_available() else "tiny"
    parser.add_argument("--preset", default=default, choices=PRESETS)
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per stage")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (default 1, as a Ray worker with one CPU: OMP_NUM_THREADS=1; more "
        "threads than free cores slows a CPU step down by an order of magnitude)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    _init_process_group()
    cfg = load_config(args.preset, None, args.overrides)
    t = cfg.train
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(
        f"preset {args.preset} on {where}: micro_batch {t.micro_batch}, grad_accum "
        f"{t.grad_accum}, ZeRO {t.zero_stage}, {t.precision if where == 'CPU' else 'bf16'}, "
        f"activation checkpointing {t.activation_checkpointing}, torch threads "
        f"{torch.get_num_threads()}"
    )
    cuda = torch.cuda.is_available()
    header = f"{'stage':<8} {'samples/s':>10} {'s/step':>8}"
    if cuda:
        header += f" {'peak GiB':>9} {'meta GiB':>9}"
    print(header)
    for stage in args.stages:
        row = bench_stage(stage, args.preset, args.steps, args.overrides)
        line = f"{stage:<8} {row['samples_per_s']:>10.2f} {row['step_s']:>8.3f}"
        if cuda:
            est = row["estimate_gib"]
            line += f" {row['measured_gib']:>9.2f} {'n/a' if est is None else f'{est:.2f}':>9}"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
