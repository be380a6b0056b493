"""Does the label decide the anatomy? Sample with real labels and with the same labels moved
down by a fraction of the depth (same seeds), and measure from the images alone
(:mod:`caldm.anatomy`):

- shift ratio: how far the synthetic retina moved (cross-correlation of depth profiles) over
  how far its label moved; 1 = follows the label, 0 = the condition decides nothing;
- boundary MAD (px): retina top (ILM) and bright-band bottom (Bruch's membrane) found in the
  image vs the moved label, per A-scan; next to it the detector's own MAD on the real volumes.

    python benchmarks/label_follow.py --bundle RUN/bundle --labels DATASET [--shift 0.1]
        [--volumes 2] [--seeds 2] [--steps S] [--json FILE]

``--labels`` is a dataset in the layout (images + labels/layers); the class under the bright
band is the last class of the phantom's layer names (the choroid) unless ``--below-class``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

import numpy as np  # noqa: E402

from caldm.anatomy import depth_shift, edge_mad, shift_label  # noqa: E402
from caldm.data.io import read_label, read_volume  # noqa: E402
from caldm.data.layout import DatasetLayout  # noqa: E402
from caldm.data.preprocess import resize  # noqa: E402
from caldm.pipeline import CALDMPipeline  # noqa: E402


def below_class_of(layout: DatasetLayout, classes: int) -> int:
    """The first class named ``choroid`` in the manifest (the phantom's), else the last."""
    for row in layout.read_manifest():
        for i, name in enumerate(row.get("layer_names", [])):
            if name.startswith("choroid"):
                return i
    return classes - 1


def measure(
    pipe: CALDMPipeline,
    layout: DatasetLayout,
    shift: float = 0.1,
    volumes: int = 2,
    seeds: int = 2,
    steps: int | None = None,
    below_class: int | None = None,
) -> dict[str, float]:
    """Median shift ratio and mean boundary MADs over ``volumes`` labels x ``seeds`` seeds."""
    shape = pipe.cfg.model.image_shape
    ratios, mads, mads_orig, mads_real = [], [], [], []
    for sample_id in layout.label_ids("layers")[:volumes]:
        url = layout.label_url("layers", sample_id)
        label = resize(read_label(url, "layers"), shape, "nearest")
        below = below_class if below_class is not None else below_class_of(layout, label.max() + 1)
        rows = int(round(shift * shape[1]))
        moved = shift_label(label, rows)
        real, _ = read_volume(layout.image_url(sample_id))
        mads_real.append(edge_mad(resize(np.asarray(real), shape), label, below))
        for seed in range(seeds):
            a = pipe.sample(seed, label, steps=steps)
            b = pipe.sample(seed, moved, steps=steps)
            ratios.append(depth_shift(a, b) / rows)
            mads.append(edge_mad(b, moved, below))
            mads_orig.append(edge_mad(a, label, below))
    return {
        "shift_rows": rows,
        "shift_ratio_median": float(np.median(ratios)),
        "shift_ratios": [round(r, 3) for r in ratios],
        "mad_moved_px": float(np.mean(mads)),
        "mad_original_px": float(np.mean(mads_orig)),
        "mad_real_px": float(np.mean(mads_real)),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bundle", required=True, help="a layers-conditioned bundle")
    p.add_argument("--labels", required=True, help="dataset with images and labels/layers")
    p.add_argument("--shift", type=float, default=0.1, help="label move, fraction of the depth")
    p.add_argument("--volumes", type=int, default=2)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (bundle default)")
    p.add_argument("--below-class", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args()
    pipe = CALDMPipeline.from_bundle(args.bundle, device="cpu")
    result = measure(
        pipe,
        DatasetLayout(args.labels),
        args.shift,
        args.volumes,
        args.seeds,
        args.steps,
        args.below_class,
    )
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({**vars(args), **result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
