"""Bulk label-guided synthetic dataset ("200% Syn") on a Ray cluster, written in the dataset layout.

    python jobs/generate_dataset.py --bundle URL --labels URL --out URL --per-label N \
        [--sampler ddim|dpm++] [--steps N] [--workers W] [--gpus-per-worker G]

Samples N volumes per real label of the kind the bundle was fine-tuned on; rerunning the same
command resumes (complete samples are skipped). See caldm/distributed/generate.py for the
layout, determinism and integrity guarantees. Connects to RAY_ADDRESS when set, else starts Ray
locally. Exit status: 0 done; 2 a bad argument or input (one line on stderr naming the file or
key), or some labels or samples failed (listed in <out>/errors.jsonl, counted on the last
line of stderr; every other sample was made; a rerun retries the failed ones).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from caldm.errors import job_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="generate_dataset.py",
        description="Sample --per-label synthetic volumes for every real label at --labels "
        "with a label-conditioned bundle, as a resumable Ray Data job.",
    )
    p.add_argument("--bundle", required=True, help="model bundle fine-tuned with a condition")
    p.add_argument(
        "--labels",
        required=True,
        help="dataset root with labels/<kind>/<id>.nii.gz (local path or s3://...)",
    )
    p.add_argument("--out", required=True, help="output dataset root (local path or s3://...)")
    p.add_argument(
        "--per-label",
        type=int,
        required=True,
        metavar="N",
        help="synthetic volumes per label (2 for the paper's 200%% Syn)",
    )
    p.add_argument(
        "--sampler",
        choices=("ddim", "dpm++", "ddpm"),
        default=None,
        help="default: the bundle config's sampling.sampler",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        metavar="N",
        help="denoising steps (default: the bundle config's sampling.steps)",
    )
    p.add_argument(
        "--ablation",
        choices=("full", "nhae_diff3d_refiner", "nhae_diff3d"),
        default="full",
        help="Table 1's rows: nhae_diff3d (Dec2D on f_sr(z)), nhae_diff3d_refiner (no "
        "adaptors), full (default)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="W",
        help="sampler actors, each loading the bundle once (default 1)",
    )
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        default=0.0,
        metavar="G",
        help="GPUs per actor (default 0: CPU)",
    )
    p.add_argument(
        "--cpus-per-worker",
        type=float,
        default=1.0,
        metavar="C",
        help="CPUs per actor (default 1); writer tasks take 0.5 each",
    )
    p.add_argument(
        "--ids", metavar="IDS", help="only these label volumes: a,b,c or DATA/split.json:test"
    )
    p.add_argument("--exclude", metavar="IDS", help="label volumes to leave out (as --ids)")
    p.add_argument(
        "--progress-every",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds between progress lines (default 60)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return job_main("generate_dataset", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from caldm.data.layout import parse_ids
    from caldm.distributed.generate import generate_dataset

    report = generate_dataset(
        args.bundle,
        args.labels,
        args.out,
        args.per_label,
        sampler=args.sampler,
        steps=args.steps,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
        progress_every=args.progress_every,
        ablation=args.ablation,
        ids=parse_ids(args.ids),
        exclude=parse_ids(args.exclude),
    )
    for error in report.errors:
        what = error.get("sample") or error["label"]
        print(f"generate_dataset: {what}: skipped ({error['error']})", file=sys.stderr)
    if report.failed:
        print(
            f"generate_dataset: {report.failed_samples} sample(s) and {report.failed_labels} "
            f"label(s) failed (listed in {args.out.rstrip('/')}/errors.jsonl); the other "
            f"{report.generated + report.skipped} samples are made; rerun to retry",
            file=sys.stderr,
        )
    return 2 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
