"""Cache the latents z, z_sr and z_hr of every volume with a trained NHAE (a Ray Data job).

    python jobs/encode_latents.py --bundle RUN/bundle --data DATA --out LATENTS

diff3d and refiner train on LATENTS (``jobs/train_stage.py --data LATENTS``). Each volume is
cached with its shifted views (``--views``). Rerunning skips what is already cached. A plain
run starts a local Ray; under ``ray job submit`` it joins the cluster.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # caldm without installing it

from caldm.errors import job_main  # noqa: E402

PROG = "encode_latents"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="bundle with enc3d, f_sr and enc2d")
    p.add_argument("--data", required=True, help="dataset URL (local path or s3://)")
    p.add_argument("--out", required=True, help="latent cache URL to write")
    p.add_argument(
        "--actors", type=int, default=1, help="encoder actors (default 1; one per GPU on a cluster)"
    )
    p.add_argument(
        "--gpus-per-actor", type=float, default=0.0, help="GPUs each actor takes (default 0)"
    )
    p.add_argument("--ids", metavar="IDS", help="only these volumes: a,b or DATA/split.json:train")
    p.add_argument("--exclude", metavar="IDS", help="volumes to leave out (same forms as --ids)")
    p.add_argument(
        "--views", type=int, default=None,
        help="shifted views per volume, each moved down by part of a latent pixel before "
        "encoding so label-conditioned training sees every offset (default: the bundle's "
        "data.augment.views; 0 = the volumes only)",
    )  # fmt: skip
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return job_main(PROG, lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from caldm.data.layout import parse_ids
    from caldm.distributed.encode import encode_latents

    stats = encode_latents(
        args.bundle, args.data, args.out, args.actors, args.gpus_per_actor,
        ids=parse_ids(args.ids), exclude=parse_ids(args.exclude), views=args.views,
    )  # fmt: skip
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
