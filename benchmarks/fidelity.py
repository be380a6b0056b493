"""Shared by the quality benchmarks: held-out phantom volumes, sampling a set of volumes guided
by their labels, and one table row of fidelity numbers (local, no Ray).

Held-out volumes are phantoms seeded from ``HELDOUT_SEED`` (the main job trains on seed 0 and
holds out seed 10 000), so no benchmark compares against a volume the bundle was trained on.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from caldm.data.phantom import make_phantom, volume_seed
from caldm.metrics import ColumnPersistence, evaluate_volumes
from caldm.pipeline import CALDMPipeline

HELDOUT_SEED = 20_000
COLUMNS = (
    "Intra-FID",
    "Inter-FID",
    "TV syn/real",
    "strips D syn/real",
    "strips W syn/real",
    "inter/in-plane syn/real",
    "column persistence syn (real)",
)


def heldout_phantoms(
    shape: tuple[int, int, int], count: int, seed: int = HELDOUT_SEED
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``count`` phantom (image, layers, vessels) triples never used in training."""
    return [make_phantom(shape, volume_seed(seed, i)) for i in range(count)]


def sample_set(
    pipe: CALDMPipeline,
    heldout: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    desc: str,
    **sample_kwargs: Any,
) -> tuple[list[np.ndarray], float]:
    """One volume per held-out label (seed = its index); returns volumes and median s/volume."""
    volumes, seconds = [], []
    for i, (_, layers, vessels) in enumerate(tqdm(heldout, desc=desc, unit="vol")):
        labels = {"layers": layers, "vessels": vessels}.get(pipe.condition or "")
        start = time.perf_counter()
        volumes.append(pipe.sample(i, labels, **sample_kwargs))
        seconds.append(time.perf_counter() - start)
    return volumes, float(np.median(seconds))


def fidelity_row(
    real: list[np.ndarray], synthetic: list[np.ndarray], max_slices: int = 16
) -> dict[str, Any]:
    """:func:`evaluate_volumes` plus the flat numbers of :data:`COLUMNS` under ``row``."""
    report = evaluate_volumes(real, synthetic, max_slices_per_volume=max_slices)
    sc = report["slice_consistency"]
    persistence = ColumnPersistence()
    columns = [float(np.mean([persistence(v) for v in vs])) for vs in (synthetic, real)]
    report["column_persistence"] = {"synthetic": columns[0], "real": columns[1]}
    report["row"] = dict(
        zip(
            COLUMNS,
            (
                report["intra_fid"],
                report["inter_fid"],
                report["tv"]["ratio"],
                sc["profile_hf_d"]["ratio"],
                sc["profile_hf_w"]["ratio"],
                sc["inter_slice_ratio"]["ratio"],
                f"{columns[0]:.2f} ({columns[1]:.2f})",
            ),
        )
    )
    return report


def markdown_table(rows: dict[str, dict[str, Any]], extra: tuple[str, ...] = ()) -> str:
    """A markdown table: one line per named row, :data:`COLUMNS` then ``extra`` columns."""
    cols = (*COLUMNS, *extra)
    lines = ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in rows.items():
        cells = [f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
