"""The paper's Table 2 as a Ray Train job: train one segmenter on Real, Syn and Real+Syn and
score each on a held-out real test set.

    python jobs/downstream.py --real URL --test URL --synthetic URL [--synthetic URL] \
        --task layers|vessels --out URL [--seeds N] [--max-steps N] [--batch-size B] \
        [--workers N] [--gpus-per-worker G]

Writes <out>/report.json ({"task", "rows": [{"train", "n_volumes", "dice"|"iou_a": {"mean",
"std"}, ...}]}), report.md, report.png, segmenter_real.safetensors (for jobs/evaluate.py
--segmenter) and MLflow runs; see caldm/distributed/downstream.py. Rerunning resumes. Runs on
a local Ray, or on the cluster of RAY_ADDRESS / `ray job submit`. Bad input gives one line
naming the file on stderr and exit status 2 (1 when the training run itself failed).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from caldm.errors import job_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jobs/downstream.py",
        description="Table 2: the same segmenter trained under the same budget and seeds on "
        "real, synthetic and real+synthetic (1 and 2 samples per label) data, scored on a "
        "real test set (layers: Dice, boundary MAD; vessels: IoU-A, IoU-V).",
    )
    p.add_argument("--real", required=True, help="real training dataset root (path or URL)")
    p.add_argument("--test", required=True, help="held-out real test dataset root")
    p.add_argument(
        "--synthetic", required=True, action="append", help="synthetic dataset root (repeatable)"
    )
    p.add_argument("--task", required=True, choices=("layers", "vessels"))
    p.add_argument("--out", required=True, help="output folder or URL")
    p.add_argument("--seeds", type=int, default=3, help="seeds per row (default 3)")
    p.add_argument("--max-steps", type=int, default=300, help="training steps per model")
    p.add_argument("--batch-size", type=int, default=8, help="planes per step and worker")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (DDP)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return job_main("downstream", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from caldm.distributed.downstream import DownstreamRequest, run_downstream

    report = run_downstream(
        DownstreamRequest(
            real=args.real,
            test=args.test,
            synthetic=tuple(args.synthetic),
            task=args.task,
            out=args.out,
            seeds=args.seeds,
            max_steps=args.max_steps,
            batch_size=args.batch_size,
            workers=args.workers,
            gpus_per_worker=args.gpus_per_worker,
        )
    )
    print(json.dumps({"task": report["task"], "rows": report["rows"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
