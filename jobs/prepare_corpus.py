"""Write the sharded training corpus: every stage's items pre-resized and compact (Ray Data).

    python jobs/prepare_corpus.py --data DATA --out CORPUS --preset paper \
        [--latents LATENTS --stages ae2d,nhae,adaptor,diff3d,refiner] [--workers W]
    python jobs/prepare_corpus.py --data DATA --out CORPUS --preset paper \
        --latents LATENTS --stages diff3d,refiner --condition layers

Then train any stage with ``--data CORPUS`` (jobs/train_stage.py); the old inputs (a dataset
root, a latent cache) keep working. Rerunning skips shards already written. A plain run starts
a local Ray; under ``ray job submit`` it joins the cluster.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # caldm without installing it

from caldm.config import PRESETS, add_overrides_argument  # noqa: E402
from caldm.errors import CaldmError, job_main  # noqa: E402

PROG = "prepare_corpus"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="dataset URL (local path or s3://)")
    p.add_argument("--out", required=True, help="corpus URL to write")
    p.add_argument("--preset", default="tiny", choices=PRESETS, help="shapes to store at")
    p.add_argument(
        "--stages",
        default="ae2d,nhae,adaptor",
        help="comma-separated stages (default: the image stages)",
    )
    p.add_argument("--latents", help="latent cache (jobs/encode_latents.py): diff3d, refiner")
    p.add_argument(
        "--condition",
        choices=("layers", "vessels"),
        help="write the diffusion stages' items with this label (for --condition fine-tunes)",
    )
    p.add_argument(
        "--draws",
        action="append",
        default=[],
        metavar="STAGE=N",
        help="random items per volume for nhae / adaptor (default nhae=8, adaptor=64)",
    )
    p.add_argument("--ids", metavar="IDS", help="only these volumes: a,b or DATA/split.json:train")
    p.add_argument("--exclude", metavar="IDS", help="volumes to leave out (same forms as --ids)")
    p.add_argument("--workers", type=int, default=1, help="volumes processed at once")
    p.add_argument("--cpus-per-task", type=float, default=1.0, help="CPUs per volume task")
    p.add_argument("--seed", type=int, default=0, help="seed of the random draws")
    add_overrides_argument(p, "config override (repeatable), e.g. data.slices_per_volume=2")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return job_main(PROG, lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from caldm.config import load_config
    from caldm.data.layout import DatasetLayout, parse_ids, select_ids
    from caldm.distributed.corpus import prepare_corpus

    draws = {}
    for spec in args.draws:
        stage, _, n = spec.partition("=")
        if not n.isdigit():
            raise CaldmError(f"--draws {spec!r}: expected STAGE=N")
        draws[stage] = int(n)
    cfg = load_config(args.preset, None, args.overrides)
    ids = None
    if args.ids or args.exclude:
        listed = DatasetLayout(args.data).ids()
        what = f"--ids (volumes of {args.data})"
        ids = select_ids(listed, parse_ids(args.ids), parse_ids(args.exclude), what=what)
    manifest = prepare_corpus(
        args.data,
        args.out,
        cfg,
        stages=tuple(s for s in args.stages.split(",") if s),
        latents=args.latents,
        draws=draws,
        ids=ids,
        workers=args.workers,
        cpus_per_task=args.cpus_per_task,
        seed=args.seed,
        condition=args.condition,
    )
    print(json.dumps({"written": manifest["written"], "stages": list(manifest["stages"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
