"""How the share of real planes in a Real+Syn training set moves Table 2, at two budgets.

    python benchmarks/downstream_mix.py OUT [--task layers|vessels] [--steps 150,400] [--seeds 2]

``OUT`` is a finished main job (``jobs/pipeline.py --out OUT``): its ``downstream/real``,
``downstream/synthetic`` and ``data/heldout`` are the Real, Syn and test sets of its Table 2.
Every row trains the same segmenter (:func:`caldm.nn.nets.segmenter.train_segmenter`: same
budget, seeds and batch) and scores it on the held-out real volumes:

| row | training planes | share of real draws |
|---|---|---|
| real | the real volumes | 1 |
| syn | the synthetic volumes | 0 |
| real+syn uniform | both, every plane equally likely (as jobs/downstream.py) | n_real / n_all |
| real+syn balanced | both, the real planes listed twice | about 1/2 for 200% Syn |
| real, all | every training volume of the main job (``data/train``) | 1 |

The last row is the headroom: if all the generator's training volumes score no better than the
few of ``real``, Table 2's Real row is at the segmenter's ceiling and no training set can beat it.

A synthetic set that adds what the real one lacks lifts the mixed rows above ``real``; one
whose pairs disagree with their labels pulls them below it, more the larger its share.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

import numpy as np  # noqa: E402


def table2_sets(out: str, task: str) -> tuple[Any, list, list, list]:
    """A finished main job's Table 2 sets: ``(segmenter config, real, synthetic, test)``, the
    last three as lists of :class:`caldm.segmentation.Pair` (``downstream/real``,
    ``downstream/synthetic``, ``data/heldout``)."""
    from caldm.nn.nets.segmenter import SegmenterConfig, plane_shape_for
    from caldm.segmentation import iter_pairs, num_classes_of

    classes = num_classes_of(f"{out}/downstream/real", task)
    real, syn, test = (list(iter_pairs(f"{out}/{part}", task, classes))
                       for part in ("downstream/real", "downstream/synthetic", "data/heldout"))
    cfg = SegmenterConfig(task, classes, plane_shape_for(real[0].volume.shape, task))
    return cfg, real, syn, test


def train_and_score(
    images: np.ndarray, labels: np.ndarray, cfg: Any, test: list, steps: int, seeds: int
) -> dict[str, dict[str, float]]:
    """Train the Table 2 segmenter on (images, labels) planes once per seed (same budget and
    batch as ``jobs/downstream.py``) and score each on ``test``; ``{metric: {"mean", "std"}}``
    over the seeds' per-volume means."""
    from caldm.nn.nets.segmenter import train_segmenter
    from caldm.segmentation import METRIC_KEYS, nan_mean_std, score_segmenter

    runs = [
        score_segmenter(train_segmenter(images.astype(np.float32), labels, cfg, steps, seed=seed),
                        cfg, test)
        for seed in range(seeds)
    ]
    return {k: nan_mean_std([run[k]["mean"] for run in runs]) for k in METRIC_KEYS[cfg.task]}


def header(columns: tuple[str, ...], keys: tuple[str, ...]) -> list[str]:
    """The two markdown header lines of a table with ``columns`` and then the metrics ``keys``."""
    from caldm.segmentation import METRIC_NAMES

    names = (*columns, *(METRIC_NAMES[k] for k in keys))
    return ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]


def cells(scores: dict[str, dict[str, float]], keys: tuple[str, ...]) -> str:
    """Markdown cells "mean ± std" of ``scores`` in the order of ``keys``."""
    return " | ".join(f"{scores[k]['mean']:.3f} ± {scores[k]['std']:.3f}" for k in keys)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="a finished main job's --out")
    p.add_argument("--task", choices=("layers", "vessels"), default="layers")
    p.add_argument("--steps", default="150,400", help="comma-separated budgets (steps)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--markdown", help="also write the table to this file")
    a = p.parse_args(argv)

    from caldm.segmentation import METRIC_KEYS, iter_pairs, planes_of

    cfg, real, syn, test = table2_sets(a.out, a.task)
    every = list(iter_pairs(f"{a.out}/data/train", a.task, cfg.num_classes))
    r, s = planes_of(real, cfg), planes_of(syn, cfg)

    def cat(*sets):  # noqa: ANN002, ANN202
        return np.concatenate([x.images for x in sets]), np.concatenate([x.labels for x in sets])

    rows = {
        "real": cat(r),
        "syn": cat(s),
        "real+syn uniform": cat(r, s),
        "real+syn balanced": cat(r, r, s),
        f"real, all {len(every)}": cat(planes_of(every, cfg)),
    }
    keys = METRIC_KEYS[a.task]
    lines = [
        f"{a.task}: {len(real)} real / {len(syn)} synthetic training volumes, {len(test)} "
        f"held-out real test volumes, {a.seeds} seeds, batch 8",
        "",
        *header(("row", "steps", "real share"), keys),
    ]
    print("\n".join(lines), flush=True)
    t0 = time.perf_counter()
    for steps in (int(x) for x in a.steps.split(",")):
        for name, (images, labels) in rows.items():
            scores = train_and_score(images, labels, cfg, test, steps, a.seeds)
            copies = {"syn": 0, "real+syn uniform": 1, "real+syn balanced": 2}
            share = copies[name] * len(r.images) / len(images) if name in copies else 1.0
            line = f"| {name} | {steps} | {share:.2f} | " + cells(scores, keys) + " |"
            lines.append(line)
            print(line, flush=True)
    lines += ["", f"wall time: {time.perf_counter() - t0:.0f} s"]
    print(lines[-1])
    if a.markdown:
        Path(a.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
