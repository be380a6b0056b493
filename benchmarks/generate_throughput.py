"""Throughput of the bulk generation job (caldm/distributed/generate.py).

For each number of sampler actors, the same ``--volumes`` (one per phantom label) are generated
with a randomly initialised, layers-conditioned bundle into a fresh local output, and one row
is printed:

- volumes per hour, and per GPU (per actor on a CPU-only machine), over the steady state: from
  the first sampling start to the last write end (Ray start-up and model loading excluded, as
  they vanish in a long run; the wall time including them is shown too);
- sampler busy: the time actors spent inside ``CALDMPipeline.sample`` over actors x steady
  time. Writing runs in separate Ray Data tasks; near 1 means writing overlaps sampling (a
  serial sample-then-write loop would give sample / (sample + write)).

    python benchmarks/generate_throughput.py [--preset P] [--actors 1 2] [--volumes N]
        [--steps S] [--markdown FILE]

Default preset: ``paper`` with one GPU per actor where CUDA is available, else ``tiny`` on CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

import torch  # noqa: E402

from caldm.bundle import init_bundle  # noqa: E402
from caldm.config import preset  # noqa: E402
from caldm.data.phantom import LAYER_NAMES, write_phantom_dataset  # noqa: E402
from caldm.distributed.generate import GenerateReport, generate_dataset  # noqa: E402


def run(args: argparse.Namespace) -> list[tuple[int, GenerateReport]]:
    """Generate ``args.volumes`` volumes once per actor count; returns (actors, report)."""
    import ray

    gpus = torch.cuda.device_count()
    if gpus and max(args.actors) > gpus:
        raise SystemExit(f"--actors {max(args.actors)}: this machine has {gpus} GPU(s)")
    cores = os.cpu_count() or 1
    # On CPU every actor takes one logical CPU and writer tasks need room beside them; on a
    # machine with fewer cores than that the logical CPUs oversubscribe (see the notes).
    ray.init(address="local", num_cpus=max(cores, max(args.actors) + 1), log_to_driver=False)
    tmp = tempfile.mkdtemp(prefix="caldm-generate-bench-")
    cfg = preset(args.preset)
    cfg.model.condition.layer_classes = len(LAYER_NAMES)
    init_bundle(args.preset, f"{tmp}/bundle", condition="layers", cfg=cfg)
    write_phantom_dataset(f"{tmp}/labels", count=args.volumes, preset=args.preset)
    results = []
    for actors in args.actors:
        report = generate_dataset(
            f"{tmp}/bundle",
            f"{tmp}/labels",
            f"{tmp}/out-{actors}",
            per_label=1,
            steps=args.steps,
            workers=actors,
            gpus_per_worker=1.0 if gpus else 0.0,
            progress_every=3600,
            log=lambda line: print(line, file=sys.stderr),
        )
        results.append((actors, report))
    ray.shutdown()
    return results


def table(args: argparse.Namespace, results: list[tuple[int, GenerateReport]]) -> str:
    """The markdown table of ``results`` with a header naming the machine and settings."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    unit = "GPU" if gpu else "actor"
    device = gpu or f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    lines = [
        f"# Generation throughput: preset `{args.preset}`, {args.steps} steps, {device}",
        "",
        f"{args.volumes} volumes per row, one per phantom label; local output; "
        f"`python benchmarks/generate_throughput.py --preset {args.preset} --steps {args.steps} "
        f"--volumes {args.volumes} --actors {' '.join(map(str, args.actors))}`.",
        "",
        f"| actors | wall s | steady s | volumes/h | volumes/h per {unit} | sample s/vol "
        "| write s/vol | sampler busy |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for actors, r in results:
        n = max(r.generated, 1)
        per_hour = r.generated / max(r.span_s, 1e-9) * 3600
        busy = r.sample_s / max(actors * r.span_s, 1e-9)
        lines.append(
            f"| {actors} | {r.wall_s:.1f} | {r.span_s:.1f} | {per_hour:.1f} | "
            f"{per_hour / actors:.1f} | {r.sample_s / n:.2f} | {r.write_s / n:.3f} | {busy:.2f} |"
        )
    cores = os.cpu_count() or 1
    if not gpu and cores < max(args.actors) + 1:
        lines += [
            "",
            f"On {cores} cores, {max(args.actors)} actors plus writer tasks oversubscribe the "
            "CPU: the rows measure contention for cores (on GPUs each actor has its own device).",
        ]
    if hasattr(os, "getloadavg"):
        lines += ["", f"Load average at the end: {os.getloadavg()[0]:.1f} (other jobs count)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="paper" if gpu else "tiny")
    p.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    p.add_argument("--volumes", type=int, default=6, help="volumes per actor count (default 6)")
    p.add_argument("--steps", type=int, default=None, help="default: the preset's steps")
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    args = p.parse_args()
    args.steps = args.steps or preset(args.preset).sampling.steps
    text = table(args, run(args))
    print(text)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text)


if __name__ == "__main__":
    main()
