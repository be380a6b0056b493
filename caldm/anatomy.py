"""Where the retina lies in an OCT volume, read from the image alone (never from the label a
model was guided by): the measurements of the moved-label check (does a label moved down move
the synthetic retina with it?).

- :func:`depth_shift`: how far one volume's retina sits below another's, from the
  cross-correlation of their mean depth profiles (sub-pixel);
- :func:`retina_edges`: per A-scan, the top of the retina (ILM) and the bottom of its bright
  band (the RPE's lower edge, at Bruch's membrane), by a half-maximum threshold;
- :func:`label_edges`: the same two boundaries read from a layer label;
- :func:`shift_label`: a label moved along depth (edges replicated).

Volumes are ``(D, H, W)`` with H the depth axis.
"""

from __future__ import annotations

import numpy as np


def depth_profile(volume: np.ndarray) -> np.ndarray:
    """Mean intensity per depth row, ``(H,)`` float64."""
    return np.asarray(volume, dtype=np.float64).mean(axis=(0, 2))


def depth_shift(reference: np.ndarray, moved: np.ndarray, most: float | None = None) -> float:
    """Rows by which ``moved``'s depth profile lies below ``reference``'s (negative: above).

    The shift maximising the correlation of the two mean-subtracted profiles, searched in
    0.1-row steps up to ``most`` rows (default: a quarter of the depth) with linear
    interpolation of the moved profile.
    """
    a, b = depth_profile(reference), depth_profile(moved)
    a, b = a - a.mean(), b - b.mean()
    h = a.size
    most = h / 4 if most is None else most
    rows = np.arange(h, dtype=np.float64)
    best, best_score = 0.0, -np.inf
    for s in np.arange(-most, most + 1e-9, 0.1):
        shifted = np.interp(rows + s, rows, b)  # the moved profile, moved back up by s
        score = float(np.dot(a, shifted))
        if score > best_score:
            best, best_score = float(s), score
    return best


def _smooth(volume: np.ndarray) -> np.ndarray:
    """A 3 x 3 x 3 box average (edges replicated): speckle off, boundaries kept within 1 px."""
    x = np.asarray(volume, dtype=np.float32)
    for axis in range(3):
        pad = [(0, 0)] * 3
        pad[axis] = (1, 1)
        p = np.pad(x, pad, mode="edge")
        n = x.shape[axis]
        x = sum(np.take(p, range(i, i + n), axis=axis) for i in range(3)) / 3
    return x


def retina_edges(volume: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(top, bottom) rows of the retina's bright band per A-scan, each ``(D, W)`` float.

    The threshold is half-way between the background (the 5th percentile of the smoothed
    volume) and the bright layers (its 99th percentile); top is the first row at or above it,
    bottom the row after the last. A-scans without a bright row get NaN.
    """
    x = _smooth(volume)
    lo, hi = np.percentile(x, [5, 99])
    bright = x >= (lo + hi) / 2  # (D, H, W)
    any_bright = bright.any(axis=1)
    h = x.shape[1]
    top = np.argmax(bright, axis=1).astype(np.float64)
    bottom = h - np.argmax(bright[:, ::-1], axis=1).astype(np.float64)
    top[~any_bright] = np.nan
    bottom[~any_bright] = np.nan
    return top, bottom


def label_edges(label: np.ndarray, below_class: int) -> tuple[np.ndarray, np.ndarray]:
    """(top, bottom) per A-scan of a ``(D, H, W)`` layer label: the first non-background row
    and the first row of ``below_class`` (the class under the bright band, e.g. the choroid)."""
    label = np.asarray(label)
    top = np.argmax(label != 0, axis=1).astype(np.float64)
    bottom = np.argmax(label == below_class, axis=1).astype(np.float64)
    return top, bottom


def edge_mad(volume: np.ndarray, label: np.ndarray, below_class: int) -> float:
    """Mean absolute distance (rows) between the retina's edges in ``volume`` and in ``label``,
    over both edges and every A-scan where the image has a bright band."""
    found, want = retina_edges(volume), label_edges(label, below_class)
    diffs = np.concatenate([np.abs(f - w).ravel() for f, w in zip(found, want)])
    return float(np.nanmean(diffs))


def shift_label(label: np.ndarray, rows: int) -> np.ndarray:
    """``label`` moved down by ``rows`` along depth (axis 1), the edge rows replicated."""
    from caldm.data.labels import shift_depth

    return shift_depth(label, rows, axis=1)
