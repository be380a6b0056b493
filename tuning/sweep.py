"""Ray Tune sweep of the adaptor or refiner hyperparameters; rerun with the same --out to resume.

    python tuning/sweep.py --target adaptor --bundle NHAE/bundle --data DATA --samples 16 \\
        --max-steps 2000 --out SWEEP
    python tuning/sweep.py --target refiner --bundle NHAE/bundle --data LATENTS --samples 16 \\
        --max-steps 5000 --out SWEEP --search optuna

Search spaces: tuning/spaces.yaml (or --spaces FILE). Each trial trains the stage as
jobs/train_stage.py does and reports a validation score on the last --holdout volumes; ASHA
stops poor trials. Outputs: <out>/best.yaml (for jobs/train_stage.py --config),
<out>/trials.csv, one MLflow run per trial (MLFLOW_TRACKING_URI, else <out>/mlflow.db).
A plain run starts a local Ray; under ``ray job submit`` (RAY_ADDRESS set) it joins the cluster.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # caldm without installing it

from caldm.config import PRESETS, add_overrides_argument  # noqa: E402  (light imports only: --help is instant)
from caldm.errors import job_main  # noqa: E402

PROG = "sweep"
SPACES = Path(__file__).resolve().parent / "spaces.yaml"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, choices=("adaptor", "refiner"))
    p.add_argument("--bundle", required=True, help="bundle with the modules the target loads")
    p.add_argument(
        "--data", required=True, help="dataset URL (adaptor) or latent cache URL (refiner)"
    )
    p.add_argument("--samples", type=int, required=True, help="trials to run")
    p.add_argument("--max-steps", type=int, required=True, help="optimizer steps per trial")
    p.add_argument("--out", required=True, help="sweep URL (local path or s3://); reused to resume")
    p.add_argument("--preset", default="tiny", choices=PRESETS)
    p.add_argument("--workers-per-trial", type=int, default=1, metavar="W")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="G")
    p.add_argument(
        "--concurrency",
        type=int,
        default=1,
        metavar="N",
        help="trials at once (default 1); each takes W workers x G GPUs",
    )
    p.add_argument("--search", default="random", choices=("random", "optuna"))
    p.add_argument(
        "--spaces", default=str(SPACES), help="search spaces YAML (default: %(default)s)"
    )
    p.add_argument(
        "--condition", choices=("layers", "vessels"), help="refiner: label-guided fine-tune"
    )
    p.add_argument("--holdout", type=int, default=1, help="last ids held out for validation")
    p.add_argument("--eval-every", type=int, help="steps between evaluations (and checkpoints)")
    add_overrides_argument(p, "fixed config override for every trial (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="search and validation-noise seed")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return job_main(PROG, lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from caldm.distributed.tune import SweepRequest, sweep

    request = SweepRequest(**{**vars(args), "overrides": tuple(args.overrides)})
    result = sweep(request)
    summary = {
        "best_config": result.best_config,
        "trials_csv": result.trials_csv,
        "best_trial": result.best_trial,
        "best_score": result.best_score,
        "trials": len(result.trials),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
