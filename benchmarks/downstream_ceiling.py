"""Where Table 2's Real+Syn is lost: the real training volumes through each stage, as Syn.

    python benchmarks/downstream_ceiling.py OUT [--steps 150] [--seeds 2] [--markdown F]

``OUT`` is a finished main job (``jobs/pipeline.py --out OUT``). Its Table 2 trains a
segmenter on Real (``downstream/real``), on Syn (``downstream/synthetic``: samples guided by
the real labels) and on both, and scores it on ``data/heldout``. Here the Syn set is replaced
by versions of the Real volumes themselves, each labelled with its own real label, made by the
stages of the bundle's path (:class:`fidelity_ceiling.StagePath`), two per volume as 200% Syn
(seeds 1 and 2: the refined and sampled versions differ; the ae2d ones are the same twice,
since Dec2D's noise is keyed by its latent in eval mode, which keeps 200% Syn's proportions):

| Syn set | what it bounds |
|---|---|
| ae2d: DecM(Enc2D(x)) | any sampler through this slice autoencoder (a perfect Diff3D and refiner) |
| refiner: DecM(Diff_slice(f_sr(Enc3D(x)) / label)) | a perfect Diff3D |
| sampled: the job's own 200% Syn | what generation gives |

If "Real + ae2d" already scores below Real, no diffusion model decoded through this
autoencoder can give Real+Syn >= Real: the slice autoencoder is the stage to improve. Layers
only (the bundle's condition must be ``layers``); same segmenter, budget, batch and seeds as
``jobs/downstream.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks

import numpy as np  # noqa: E402

DRAWS = (1, 2)  # seeds of the two versions per real volume, as 200% Syn


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="a finished main job's --out (layers)")
    p.add_argument("--bundle", help="default: OUT/runs/refiner_guided/bundle")
    p.add_argument("--steps", type=int, default=150, help="segmenter steps (Table 2's budget)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--markdown", help="also write the table to this file")
    a = p.parse_args(argv)

    from downstream_mix import cells, header, table2_sets, train_and_score
    from fidelity_ceiling import StagePath

    from caldm.segmentation import METRIC_KEYS, Pair, planes_of

    started = time.perf_counter()
    bundle = a.bundle or f"{a.out}/runs/refiner_guided/bundle"
    path = StagePath(bundle)
    if path.pipe.condition != "layers":
        raise SystemExit(f"{bundle}: a {path.pipe.condition} bundle; this benchmark is for layers")
    cfg, real, sampled, test = table2_sets(a.out, "layers")
    stages = ("ae2d", "refiner")
    made: dict[str, list[Pair]] = {s: [] for s in stages}
    for pair in real:
        for seed in DRAWS:
            for stage, volume in path.versions(pair, seed, stages).items():
                made[stage].append(Pair(f"{pair.id}_{stage}{seed}", pair.image_url,
                                        pair.label_url, volume, pair.label))
        print(f"downstream_ceiling: {pair.id} through {', '.join(stages)}", file=sys.stderr)
    made["sampled"] = sampled
    planes = {"real": planes_of(real, cfg), **{k: planes_of(v, cfg) for k, v in made.items()}}

    keys = METRIC_KEYS["layers"]
    lines = [
        f"Bundle `{bundle}`: {len(real)} real training volumes, {len(test)} held-out test "
        f"volumes, {a.steps} segmenter steps, {a.seeds} seeds, batch 8.",
        "",
        *header(("Syn set", "train", "planes"), keys),
    ]
    print("\n".join(lines), flush=True)
    rows = [("-", "real", ["real"])]
    for stage in (*stages, "sampled"):
        rows += [(stage, "syn", [stage]), (stage, "real+syn", ["real", stage])]
    for name, train, sets in rows:
        images = np.concatenate([planes[s].images for s in sets])
        labels = np.concatenate([planes[s].labels for s in sets])
        scores = train_and_score(images, labels, cfg, test, a.steps, a.seeds)
        lines.append(f"| {name} | {train} | {len(images)} | " + cells(scores, keys) + " |")
        print(lines[-1], flush=True)
    lines += ["", f"wall time: {time.perf_counter() - started:.0f} s"]
    print(lines[-1])
    if a.markdown:
        Path(a.markdown).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
