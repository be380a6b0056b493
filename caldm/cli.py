"""The ``caldm`` command: local tools around the library (no Ray cluster needed).

Each subcommand imports its implementation lazily so that ``--help`` is instant.
A :class:`~caldm.errors.CaldmError` becomes one line on stderr and its exit status (see job_main).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from caldm.config import PRESETS
from caldm.errors import CaldmError, job_main


def _cmd_info(args: argparse.Namespace) -> int:
    from caldm.nn.factory import model_info

    info = model_info(args.preset)
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"preset {args.preset}")
    for key in ("image_shape", "thumbnail_shape", "latent_shape", "slice_latent_shape", "k"):
        print(f"  {key:<20} {info[key]}")
    print(f"  {'network':<20} {'parameters':>14}")
    for name, n in info["params"].items():
        print(f"  {name:<20} {n:>14,}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from caldm.bench.memory import memory_report, print_memory_report

    report = memory_report(args.preset)
    if args.json:
        print(json.dumps(report))
    else:
        print_memory_report(args.preset, report)
    return 0


def _cmd_init_bundle(args: argparse.Namespace) -> int:
    from caldm.bundle import init_bundle

    init_bundle(args.preset, args.out, condition=args.condition, seed=args.seed)
    print(f"wrote a randomly initialised {args.preset} bundle to {args.out}")
    return 0


def _cmd_phantom(args: argparse.Namespace) -> int:
    from caldm.data.phantom import write_phantom_dataset

    ids = write_phantom_dataset(args.out, count=args.count, preset=args.preset, seed=args.seed)
    print(f"wrote {len(ids)} phantom volumes ({args.preset}) to {args.out}")
    return 0


def _cmd_import_octa500(args: argparse.Namespace) -> int:
    from caldm.data.octa500 import import_octa500

    failures = import_octa500(
        args.src, args.dst, workers=args.workers, split=args.split, split_seed=args.split_seed
    )
    return 1 if failures else 0


def _cmd_sample(args: argparse.Namespace) -> int:
    """``caldm sample``: one volume from a bundle into a NIfTI file, with a progress bar."""
    import time

    import torch

    from caldm.data.io import nifti_stem, read_label
    from caldm.data.phantom import phantom_affine
    from caldm.data.sinks import NiftiSink
    from caldm.pipeline import CALDMPipeline

    if nifti_stem(args.out.rstrip("/").rsplit("/", 1)[-1]) is None:
        raise CaldmError(f"{args.out}: expected a .nii or .nii.gz output file name")
    try:
        device = torch.device(args.device) if args.device else None
    except RuntimeError:
        raise CaldmError(f"--device {args.device!r}: not a torch device") from None
    pipe = CALDMPipeline.from_bundle(args.bundle, device=device, ablation=args.ablation)
    cfg = pipe.cfg
    limit = cfg.diffusion.num_train_timesteps
    for flag, value in (("--steps", args.steps), ("--refiner-steps", args.refiner_steps)):
        if value is not None and not 1 <= value <= limit:
            raise CaldmError(f"{flag} {value}: must be in 1..{limit}")
    labels = None
    if args.labels:
        if pipe.condition is None:
            raise CaldmError(
                f"{args.labels}: bundle {args.bundle} is not label-guided "
                "(it has no condition encoders); drop --labels or use a conditioned bundle"
            )
        labels = pipe.prepare_labels(read_label(args.labels, pipe.condition), args.labels)
    shape = cfg.model.image_shape
    sink = NiftiSink(args.out, shape, phantom_affine(shape))
    began = time.perf_counter()
    pipe.sample(
        args.seed,
        labels,
        sampler=args.sampler,
        steps=args.steps,
        refiner_sampler=args.refiner_sampler or args.sampler,
        refiner_steps=args.refiner_steps or args.steps,
        decode=args.decode,
        sink=sink,
        progress=True,
    )
    sink.close()
    seconds = time.perf_counter() - began
    print(
        f"wrote {args.out}: {'x'.join(map(str, shape))} uint8, seed {args.seed}, "
        f"{pipe.device.type}, {seconds:.1f} s"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="caldm",
        description="CA-LDM for high-resolution OCT volumes: inspect, account, sample, import.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, fn: Callable[[argparse.Namespace], int], help_: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(fn=fn)
        return p

    p = add("info", _cmd_info, "Shapes and parameter counts of every network of a preset.")
    p.add_argument("--preset", default="paper", choices=PRESETS)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = add("bench", _cmd_bench, "Meta-device accounting (nothing is allocated).")
    bench_sub = p.add_subparsers(dest="what", required=True, metavar="WHAT")
    pm = bench_sub.add_parser(
        "memory",
        help="peak memory of each training stage and of sampling",
        description="Peak bytes of one training step per stage (one worker, the preset's "
        "default settings) and of streaming sampling, counted on the meta device.",
    )
    pm.add_argument("--preset", default="paper", choices=PRESETS)
    pm.add_argument("--json", action="store_true", help="print one JSON object")

    p = add("init-bundle", _cmd_init_bundle, "Write a bundle of randomly initialised weights.")
    p.add_argument("--preset", default="tiny", choices=PRESETS)
    p.add_argument("--out", required=True, help="bundle URL (local path or s3://)")
    p.add_argument("--condition", choices=("layers", "vessels"), default=None)
    p.add_argument("--seed", type=int, default=0)

    p = add(
        "phantom", _cmd_phantom, "Write the phantom OCT dataset (images, layer and vessel labels)."
    )
    p.add_argument("--out", required=True, help="dataset URL (local path or s3://)")
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--preset", default="tiny", choices=PRESETS, help="volume shape of the preset")
    p.add_argument("--seed", type=int, default=0)

    p = add("import-octa500", _cmd_import_octa500, "Import OCTA-500 (folders of B-scan BMPs).")
    p.add_argument("src", help="an OCTA-500 subset folder such as OCTA_6mm (holding OCT/<id>/)")
    p.add_argument("dst", help="dataset URL to write (local path or s3://)")
    p.add_argument("--workers", type=int, default=4, help="volumes imported in parallel")
    p.add_argument(
        "--split",
        action="store_true",
        help="write DST/split.json: seeded 2/3 train, 1/3 test (the paper's proportions)",
    )
    p.add_argument("--split-seed", type=int, default=0, help="seed of --split (default 0)")

    p = add("sample", _cmd_sample, "Sample one volume from a bundle into a NIfTI file.")
    p.add_argument("--bundle", required=True, help="bundle URL (local path or s3://)")
    p.add_argument("--out", required=True, help="output FILE.nii.gz (local path or s3://)")
    p.add_argument("--labels", default=None, help="label volume URL for label-guided sampling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decode", choices=("exact", "chunked"), default=None)
    p.add_argument(
        "--ablation",
        choices=("full", "nhae_diff3d_refiner", "nhae_diff3d"),
        default="full",
        help="Table 1's rows: nhae_diff3d decodes f_sr(z) with Dec2D (no refiner, no "
        "adaptors); nhae_diff3d_refiner adds the refiner; full adds DecM's adaptors",
    )
    p.add_argument("--sampler", choices=("ddim", "dpm++", "ddpm"), default=None)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (both processes)")
    p.add_argument("--refiner-sampler", choices=("ddim", "dpm++", "ddpm"), default=None)
    p.add_argument("--refiner-steps", type=int, default=None, help="refiner steps, if different")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return job_main("caldm", lambda: args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
