"""Label fidelity and the Table 2 analogue of a finished main job, against the issue's targets.

    python benchmarks/label_fidelity.py OUT [--markdown FILE]
    python benchmarks/label_fidelity.py --instrument DIR [--markdown FILE]

OUT is the --out of `jobs/pipeline.py` (after it finished: OUT/report.json holds
"label_fidelity" and "table2"). Prints a markdown summary:

- label fidelity: the segmenter's mean Dice and boundary MAD (or IoU-A/IoU-V and the en-face
  vessel contrast) on the synthetic volumes against their guiding labels, and on the held-out
  real volumes against their own; target: synthetic Dice >= 0.9 x held-out real Dice;
- Table 2: each row's metrics (mean +- std over seeds); targets: Syn-only Dice >= 0.9 x Real,
  Real+Syn >= Real.

``--instrument DIR`` needs no trained bundle: it writes the demo's phantom datasets (tiny
preset, 8 training and 4 held-out volumes) under DIR, trains the label-fidelity segmenter as the
main job does, and scores two stand-ins for a generator: one that follows its labels exactly
(the held-out volumes with their own labels: ratio 1 by construction) and one that ignores
them (the same volumes, each with another volume's label). It shows the range the fidelity
numbers of a real bundle fall in.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from caldm.data.io import read_bytes  # noqa: E402


def summary(out: str) -> str:
    """The markdown summary of ``out``'s report.json."""
    report = json.loads(read_bytes(f"{out.rstrip('/')}/report.json"))
    fid, table2 = report.get("label_fidelity"), report.get("table2")
    if fid is None or table2 is None:
        raise SystemExit(f"{out}/report.json: no label_fidelity/table2 (job not finished?)")
    lines = [f"### Label fidelity ({fid['task']}, {fid['num_classes']} classes)", "",
             f"Segmenter: {fid['segmenter']}", "",
             "| metric | synthetic vs guiding label | held-out real vs own label | ratio |",
             "|---|---|---|---|"]
    for key, ratio in fid["ratio"].items():
        s, r = fid["synthetic"][key], fid["real"][key]
        shown = f"{ratio:.2f}" if ratio is not None else "n/a"
        lines.append(f"| {key} | {s['mean']:.3f} ± {s['std']:.3f} | {r['mean']:.3f} ± "
                     f"{r['std']:.3f} | {shown} |")
    lines += ["", f"({fid['synthetic']['n']} synthetic, {fid['real']['n']} held-out volumes)", ""]
    rows = table2["rows"]
    keys = [k for k in ("dice", "mad", "iou_a", "iou_v") if k in rows[0]]
    lines += ["### Table 2 analogue", "", "| train | volumes | " + " | ".join(keys) + " |",
              "|---|---|" + "---|" * len(keys)]
    for row in rows:
        cells = [f"{row[k]['mean']:.3f} ± {row[k]['std']:.3f}" for k in keys]
        lines.append(f"| {row['name']} | {row['n_volumes']} | " + " | ".join(cells) + " |")
    main = keys[0]
    real = rows[0][main]["mean"]
    syn = next(r for r in rows if r["train"] == "synthetic")[main]["mean"]
    both = max(r[main]["mean"] for r in rows if r["train"] == "real+synthetic")
    targets = []
    if "dice" in fid["ratio"]:
        targets.append(("label fidelity Dice >= 0.9 x held-out real", fid["ratio"]["dice"], 0.9))
    targets += [(f"Syn-only {main} >= 0.9 x Real", syn / real if real else 0.0, 0.9),
                (f"best Real+Syn {main} >= Real", both / real if real else 0.0, 1.0)]
    lines += ["", "| target | measured ratio | met |", "|---|---|---|"]
    lines += [f"| {name} | {value:.2f} | {'yes' if value >= need else 'no'} |"
              for name, value, need in targets]
    lines += ["", f"Table 2 wall time: {table2.get('wall_s')} s; whole job: {report['wall_s']} s"]
    return "\n".join(lines) + "\n"


def instrument(root: str) -> str:
    """The fidelity numbers of a label-following and a label-ignoring stand-in generator."""
    import time

    from caldm.data.io import write_bytes
    from caldm.data.layout import DatasetLayout
    from caldm.data.phantom import write_phantom_dataset
    from caldm.distributed.end_to_end import FIDELITY_STEPS
    from caldm.nn.nets.segmenter import segmenter_bytes
    from caldm.segmentation import label_fidelity, load_or_train_segmenter

    train, heldout = f"{root}/train", f"{root}/heldout"
    write_phantom_dataset(train, count=8, preset="tiny", seed=0)
    write_phantom_dataset(heldout, count=4, preset="tiny", seed=10_000)
    start = time.time()
    model, cfg, _ = load_or_train_segmenter("layers", train_real=train, steps=FIDELITY_STEPS)
    train_s = time.time() - start
    seg = f"{root}/segmenter.safetensors"
    write_bytes(seg, segmenter_bytes(model, cfg))
    src = DatasetLayout(heldout)
    ids = src.ids()
    for name, shift in (("follows", 0), ("ignores", 1)):
        dst = DatasetLayout(f"{root}/{name}")
        for i, sid in enumerate(ids):
            write_bytes(dst.image_url(sid), read_bytes(src.image_url(sid)))
            other = ids[(i + shift) % len(ids)]
            write_bytes(dst.label_url("layers", sid), read_bytes(src.label_url("layers", other)))
    lines = [f"Segmenter: {FIDELITY_STEPS} steps on 8 phantom volumes ({train_s:.0f} s)", "",
             "| stand-in generator | Dice synthetic | Dice held-out real | ratio | "
             "MAD synthetic (px) | MAD held-out real (px) |", "|---|---|---|---|---|---|"]
    for name in ("follows", "ignores"):
        f = label_fidelity(heldout, f"{root}/{name}", segmenter=seg)
        s, r = f["synthetic"], f["real"]
        lines.append(
            f"| {name} its label | {s['dice']['mean']:.3f} | {r['dice']['mean']:.3f} | "
            f"{f['ratio']['dice']:.2f} | {s['mad']['mean']:.2f} | {r['mad']['mean']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", help="the --out of a finished jobs/pipeline.py run")
    p.add_argument("--instrument", metavar="DIR", help="stand-in generators (no bundle needed)")
    p.add_argument("--markdown", default=None, help="also write the summary to this file")
    args = p.parse_args()
    if (args.out is None) == (args.instrument is None):
        p.error("give OUT or --instrument DIR")
    text = instrument(args.instrument) if args.instrument else summary(args.out)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
