"""Train one CA-LDM stage on Ray (Train + DeepSpeed ZeRO); rerun with the same --out to resume.

    python jobs/train_stage.py --stage ae2d --preset tiny --data DATA --out RUN
    ray job submit --working-dir . -- python jobs/train_stage.py --stage nhae ... --bundle B

A plain run starts a local Ray; under ``ray job submit`` (RAY_ADDRESS set) it joins the cluster.
Outputs: ``<out>/bundle`` (model bundle), ``<out>/summary.json``, Ray checkpoints under
``<out>/<stage>/``, MLflow runs (``MLFLOW_TRACKING_URI``, else ``<out>/mlflow.db``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # caldm without installing it

from caldm.config import PRESETS, STAGES, add_overrides_argument  # noqa: E402  (light imports only: --help is instant)
from caldm.errors import job_main  # noqa: E402

PROG = "train_stage"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", required=True, choices=STAGES)
    p.add_argument("--preset", default="tiny", choices=PRESETS)
    p.add_argument(
        "--data", required=True, help="dataset URL; for diff3d/refiner the latent cache URL"
    )
    p.add_argument("--out", required=True, help="run URL (local path or s3://); reused to resume")
    p.add_argument("--bundle", help="model bundle with the frozen modules / weights to start from")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (default 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="G")
    p.add_argument(
        "--accelerator-type",
        metavar="CARD",
        help="run every worker on this card, e.g. A10G or L4 (never a mix)",
    )
    p.add_argument("--zero-stage", type=int, choices=(1, 2, 3), help="DeepSpeed ZeRO (default 2)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides train.max_steps)")
    p.add_argument(
        "--condition", choices=("layers", "vessels"), help="label-guided fine-tune (diff3d/refiner)"
    )
    p.add_argument(
        "--ids",
        metavar="IDS",
        help="train only on these volumes: a,b,c or DATA/split.json:train (caldm import-octa500 "
        "--split)",
    )
    p.add_argument(
        "--exclude", metavar="IDS", help="volumes never trained on (same forms as --ids)"
    )
    p.add_argument("--config", dest="config_file", metavar="FILE", help="YAML config on top")
    add_overrides_argument(p, "config override, e.g. train.lr=2e-4 (repeatable)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return job_main(PROG, lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from caldm.data.layout import parse_ids
    from caldm.distributed.train import TrainRequest, train

    ids, exclude = parse_ids(args.ids), parse_ids(args.exclude)
    fields = {k: v for k, v in vars(args).items() if k not in ("ids", "exclude", "overrides")}
    request = TrainRequest(
        **fields,
        overrides=tuple(args.overrides),
        ids=tuple(ids) if ids is not None else None,
        exclude_ids=tuple(exclude or ()),
    )
    summary = train(request)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
