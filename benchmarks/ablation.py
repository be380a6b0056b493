"""Table 1's analogue on held-out phantom volumes: the three ablation rows from one bundle.

    PYTHONPATH=$PWD python benchmarks/ablation.py --bundle DIR [--count 8] [--steps N]

Rows (:data:`caldm.pipeline.ABLATIONS`): ``nhae_diff3d`` (Dec2D on f_sr(z)),
``nhae_diff3d_refiner`` (+ Diff_slice) and ``full`` (+ DecM's adaptors). Each samples one
volume per held-out label (same seeds in every row) and is compared with the held-out volumes:
Intra-FID, Inter-FID (random-weight Inception unless the evaluate job is given weights, so
only the ordering means something), TV and the slice-consistency measures as synthetic/real
(1 is ideal). Writes ``benchmarks/results/ablation_<device>.md`` and ``.json`` and an
en-face preview of each row beside them (``ablation_<device>.png``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from benchmarks.fidelity import (  # noqa: E402
    fidelity_row,
    heldout_phantoms,
    markdown_table,
    sample_set,
)
from caldm.pipeline import ABLATIONS, CALDMPipeline  # noqa: E402
from caldm.preview import volume_preview  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="a trained bundle (e.g. the main job's)")
    p.add_argument("--count", type=int, default=8, help="held-out phantom volumes")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: bundle)")
    p.add_argument("--max-slices", type=int, default=16, help="planes per volume for FID")
    p.add_argument("--out", default=None, help="results stem (default results/ablation_<dev>)")
    args = p.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    stem = Path(args.out) if args.out else RESULTS / f"ablation_{device}"
    rows, reports, previews = {}, {}, []
    heldout = None
    for ablation in reversed(tuple(ABLATIONS)):  # nhae_diff3d first, as in Table 1
        pipe = CALDMPipeline.from_bundle(args.bundle, ablation=ablation)
        if heldout is None:
            heldout = heldout_phantoms(pipe.cfg.model.image_shape, args.count)
        volumes, seconds = sample_set(pipe, heldout, ablation, steps=args.steps)
        report = fidelity_row([h[0] for h in heldout], volumes, args.max_slices)
        rows[ablation] = {**report.pop("row"), "s/volume": seconds}
        reports[ablation] = {**report, "s_per_volume": seconds}
        previews.append((volumes[0], ablation))
        print(ablation, json.dumps(rows[ablation]))
    previews.insert(0, (heldout[0][0], "held-out real"))
    table = markdown_table(rows, ("s/volume",))
    text = (
        f"# Ablation (Table 1 analogue), {device}\n\n"
        f"`PYTHONPATH=$PWD python benchmarks/ablation.py --bundle {args.bundle} "
        f"--count {args.count}" + (f" --steps {args.steps}" if args.steps else "") + "`\n\n"
        f"{args.count} held-out phantom volumes (seeds never trained on), one synthetic volume "
        "per held-out label and row, the same seeds in every row. FIDs use "
        f"{reports['full']['feature_extractor']}: compare rows, not with the paper. Ratios "
        "are synthetic/real (1 is ideal); 'strips' is the high-frequency part of the per-slice "
        "mean along D (W), 'inter/in-plane' the mean slice-to-slice over column-to-column "
        "difference.\n\n" + table + "\n\nPreview (middle B-scan, across slices, en-face): "
        f"`{stem.name}.png`\n"
    )
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(reports, indent=1) + "\n")
    volume_preview([v for v, _ in previews], [t for _, t in previews]).save(
        stem.with_suffix(".png")
    )
    print(text)


if __name__ == "__main__":
    main()
