"""The main job: CA-LDM's whole path on a dataset (the phantom one by default).

    python jobs/pipeline.py --out DIR [--data URL] [--heldout URL] [--preset tiny]

See caldm/distributed/end_to_end.py for the steps and the layout under --out. Rerunning the
same command resumes. Runs on a local Ray by default; under `ray job submit` it uses the cluster.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from caldm.config import PRESETS, add_overrides_argument  # noqa: E402
from caldm.errors import job_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jobs/pipeline.py",
        description="Every CA-LDM stage, then label-guided generation and evaluation. "
        "Without --data, a phantom dataset is written first. Rerun the same command to resume.",
    )
    p.add_argument("--out", required=True, help="output folder or URL (local path or s3://)")
    p.add_argument("--data", default=None, help="training dataset URL (default: phantom)")
    p.add_argument("--heldout", default=None, help="held-out real dataset for evaluation")
    p.add_argument("--preset", default="tiny", choices=PRESETS)
    p.add_argument("--count", type=int, default=8, help="phantom training volumes (no --data)")
    p.add_argument("--per-label", type=int, default=1, help="synthetic volumes per real label")
    p.add_argument(
        "--steps-scale", type=float, default=1.0, help="multiply every stage's training steps"
    )
    p.add_argument("--sampling-steps", type=int, default=None, help="denoising steps")
    p.add_argument("--condition", choices=("layers", "vessels"), default="layers")
    p.add_argument(
        "--layer-classes",
        type=int,
        default=9,
        help="layer classes of the phantom's labels (no --data; with --data: from its labels)",
    )
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers per stage")
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    add_overrides_argument(
        p,
        "config override for every stage, e.g. model.latent_channels=8 (repeatable; a rerun "
        "resumes only with the same ones, recorded in OUT/job.json)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return job_main("pipeline", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from caldm.distributed.end_to_end import run_pipeline

    run_pipeline(
        args.out,
        data=args.data,
        heldout=args.heldout,
        preset=args.preset,
        count=args.count,
        per_label=args.per_label,
        steps_scale=args.steps_scale,
        sampling_steps=args.sampling_steps,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        condition=args.condition,
        layer_classes=args.layer_classes,
        overrides=tuple(args.overrides),
    )
    print(f"pipeline: report written to {args.out.rstrip('/')}/report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
