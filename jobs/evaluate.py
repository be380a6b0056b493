"""Evaluate a synthetic dataset against a real one: Intra-FID, Inter-FID and TV (a Ray Data job),
and label fidelity (does each synthetic volume follow the label that guided it?).

    python jobs/evaluate.py --real URL --synthetic URL --out FILE.json \
        [--inception-weights URL] [--max-slices-per-volume N] [--batch-size B] \
        [--num-gpus G | --workers W] [--segmenter FILE | --train-real URL [--segmenter-steps N]]

With --segmenter (segmenter_real.safetensors of jobs/downstream.py) or --train-real (real
training data to train one on), the report has "label_fidelity": mean Dice and boundary MAD
(layers) or IoU-A/IoU-V and en-face vessel contrast (vessels) of the synthetic volumes against
their guiding labels, next to the same on the held-out --real volumes; a label_overlay.png
(synthetic B-scans with their guiding label's boundaries, beside real ones) goes beside it.

Writes the report JSON to --out, a preview PNG beside it, and logs both to MLflow. Without
--inception-weights a fixed-seed random Inception is used and the report says its values are
not comparable with published FIDs. Connects to RAY_ADDRESS when set, else starts Ray locally.
Bad input gives one line naming the file on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from caldm.errors import job_main  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="evaluate.py",
        description="Intra-FID, Inter-FID and total variation of --synthetic against --real "
        "(dataset roots with images/<id>.nii.gz), computed as a Ray Data job.",
    )
    p.add_argument("--real", required=True, help="real dataset root (local path or s3://...)")
    p.add_argument("--synthetic", required=True, help="synthetic dataset root")
    p.add_argument("--out", required=True, help="report FILE.json; the preview PNG goes beside")
    p.add_argument(
        "--inception-weights",
        default=None,
        metavar="URL",
        help="pt_inception-2015-12-05 weights (.pth or .safetensors); never "
        "downloaded. Default: a fixed-seed random Inception (not comparable with "
        "published FID values)",
    )
    p.add_argument(
        "--max-slices-per-volume",
        type=int,
        default=16,
        metavar="N",
        help="evenly spaced planes per volume and direction (default 16)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=32,
        metavar="B",
        help="planes per feature batch (default 32)",
    )
    p.add_argument(
        "--num-gpus",
        type=int,
        default=None,
        metavar="G",
        help="GPU actors, one GPU each (default 0: CPU actors)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="W",
        help="without GPUs: up to W CPU feature actors (default 1)",
    )
    seg = p.add_mutually_exclusive_group()
    seg.add_argument(
        "--segmenter",
        default=None,
        metavar="FILE",
        help="label fidelity with this segmenter (segmenter_real.safetensors of "
        "jobs/downstream.py)",
    )
    seg.add_argument(
        "--train-real",
        default=None,
        metavar="URL",
        help="label fidelity with a segmenter trained here on this real dataset (not --real)",
    )
    p.add_argument(
        "--segmenter-steps",
        type=int,
        default=300,
        metavar="N",
        help="training steps of the --train-real segmenter (default 300)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return job_main("evaluate", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from caldm.distributed.evaluation import evaluate

    report = evaluate(
        args.real,
        args.synthetic,
        inception_weights=args.inception_weights,
        max_slices_per_volume=args.max_slices_per_volume,
        batch_size=args.batch_size,
        num_gpus=args.num_gpus,
        out=args.out,
        workers=args.workers,
        segmenter=args.segmenter,
        train_real=args.train_real,
        segmenter_steps=args.segmenter_steps,
    )
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
