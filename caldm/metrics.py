"""Evaluation metrics of the paper: Intra-FID, Inter-FID and total variation (TV), plus slice
consistency (:class:`SliceProfileHF`, :class:`InterSliceRatio`): the strip artefact of Fig. 4.

Axis order is D x H x W (D slices, i.e. B-scans, of H (depth) x W). The two FIDs differ only in
which planes of a volume are compared:

- Intra-FID: B-scan planes ``volume[d, :, :]`` (H x W), the intra-slice direction.
- Inter-FID: planes across slices ``volume[:, :, w]`` (D x H), the inter-slice direction; this
  is where slice-to-slice inconsistency (the paper's "strip patterns") shows.

Planes are taken at evenly spaced, deterministic indices (:func:`plane_indices`), put on the
range [0, 1] (:func:`intensity_range`), resized to a common size, and passed through a feature
extractor (:mod:`caldm.nn.nets.inception`); feature means and covariances are accumulated
incrementally (:class:`FeatureStats`) and compared with :func:`frechet_distance`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from caldm.data.labels import layer_boundaries  # label geometry lives there; re-exported
from caldm.nn.nets.inception import FEATURE_DIM, INPUT_SIZE

PLANE_KINDS = ("intra", "inter")
TV_SLAB = 64  # slices per chunk in total_variation


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    d^2 = ||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^(1/2)).

    The trace of the matrix square root is computed from symmetric eigendecompositions rather
    than with ``scipy.linalg.sqrtm`` as FID tools do: with S = sigma1^(1/2) = U L^(1/2) U^T,
    sigma1 sigma2 is similar to S sigma2 S, which is symmetric positive semi-definite, so
    Tr((sigma1 sigma2)^(1/2)) = sum_i sqrt(eig_i(B^T sigma2 B)) with B = U L^(1/2) restricted
    to the non-negligible eigenvalues of sigma1. This is the same quantity, but real by
    construction (no imaginary parts to drop, no offset needed for the singular covariances of
    small sample sets), and for 2048-d features with few samples it takes one 2048 x 2048
    eigendecomposition (~3 s on 2 cores) where sqrtm takes ~18 s. Rounding makes tiny
    negative eigenvalues, which are clipped to 0.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    s1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    s2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}"
        )
    diff = mu1 - mu2
    # torch's eigh is ~2x faster than scipy's here; both are LAPACK float64.
    w, u = torch.linalg.eigh(torch.from_numpy((s1 + s1.T) / 2))
    tol = max(float(w.max()), 0.0) * w.numel() * np.finfo(np.float64).eps
    keep = w > tol
    b = u[:, keep] * w[keep].sqrt()
    m = b.T @ torch.from_numpy(s2) @ b
    tr_covmean = float(torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum())
    value = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    # Rounding can push an exact zero (a set against itself) slightly negative.
    return float(max(value, 0.0))


def frechet_distance_of_samples(x: np.ndarray, y: np.ndarray) -> float:
    """:func:`frechet_distance` of the Gaussians fitted to samples ``x`` (N1, F) and ``y`` (N2, F).

    With A = centred x / sqrt(N1 - 1) and B likewise (so sigma1 = A^T A), the nonzero
    eigenvalues of sigma1 sigma2 are the squared singular values of A B^T, hence
    Tr((sigma1 sigma2)^(1/2)) = sum of singular values of the N1 x N2 matrix A B^T. Exact, and
    much cheaper than any F x F decomposition when there are fewer samples than features.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
        raise ValueError(f"need (N >= 2, F) samples of one F, got {x.shape} and {y.shape}")
    a = (x - x.mean(0)) / np.sqrt(len(x) - 1)
    b = (y - y.mean(0)) / np.sqrt(len(y) - 1)
    diff = x.mean(0) - y.mean(0)
    tr_covmean = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    value = diff @ diff + (a * a).sum() + (b * b).sum() - 2 * tr_covmean
    return float(max(value, 0.0))


class FeatureStats:
    """Running mean and covariance of feature vectors (float64 sums; mergeable).

    While there are at most ``dim`` vectors they are also kept, so that
    :meth:`frechet_distance` can use the exact and fast :func:`frechet_distance_of_samples`;
    beyond that only the sums are kept and memory stays O(dim^2).
    """

    def __init__(self, dim: int) -> None:
        self.n = 0
        self.sum = np.zeros(dim, np.float64)
        self.outer = np.zeros((dim, dim), np.float64)
        self._samples: list[np.ndarray] | None = []

    def update(self, features: np.ndarray) -> None:
        """Add a (N, dim) batch."""
        x = np.asarray(features, np.float64).reshape(-1, self.sum.size)
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.outer += x.T @ x
        self._keep(x)

    def _keep(self, x: np.ndarray | None) -> None:
        if x is not None and self._samples is not None and self.n <= self.sum.size:
            self._samples.append(x.copy())
        else:
            self._samples = None

    def merge(self, other: FeatureStats) -> None:
        """Add another accumulator of the same dimension."""
        self.n += other.n
        self.sum += other.sum
        self.outer += other.outer
        for x in other._samples if other._samples is not None else [None]:
            self._keep(x)

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.n, 1)

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance (as ``np.cov``); needs at least two samples."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.n}")
        mu = self.mean
        return (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)

    def frechet_distance(self, other: FeatureStats) -> float:
        """FID between the Gaussians fitted to this and ``other``."""
        if self._samples is not None and other._samples is not None:
            return frechet_distance_of_samples(
                np.concatenate(self._samples), np.concatenate(other._samples)
            )
        return frechet_distance(self.mean, self.cov, other.mean, other.cov)


def plane_indices(n: int, max_slices: int | None) -> np.ndarray:
    """``min(n, max_slices)`` evenly spaced indices into an axis of length ``n``.

    Indices are the centres of equal bins (e.g. n=512, k=4 -> 64, 192, 320, 448), so the
    choice is deterministic and avoids the often empty border slices. ``None`` or ``0``
    means every index.
    """
    k = n if not max_slices or max_slices >= n else max_slices
    return ((np.arange(k) + 0.5) * n / k).astype(np.int64)


def intra_planes(volume: np.ndarray, max_slices: int | None) -> np.ndarray:
    """B-scan planes ``volume[d, :, :]`` at :func:`plane_indices` of D: (k, H, W)."""
    return volume[plane_indices(volume.shape[0], max_slices)]


def inter_planes(volume: np.ndarray, max_slices: int | None) -> np.ndarray:
    """Planes across slices ``volume[:, :, w]`` at :func:`plane_indices` of W: (k, D, H)."""
    idx = plane_indices(volume.shape[2], max_slices)
    return np.moveaxis(volume[:, :, idx], 2, 0)


def intensity_range(volume: np.ndarray) -> tuple[float, float]:
    """The intensities that map to 0 and 1, by the rule training uses.

    As :func:`caldm.data.preprocess.to_unit_range` (which maps to [-1, 1] for the networks):
    an integer volume uses its dtype's full range (uint8: 0..255), so brightness differences
    between sets stay visible; a float volume has no fixed range (the pipeline writes [-1, 1],
    other tools [0, 1]) and uses its own minimum and maximum.
    """
    if np.issubdtype(volume.dtype, np.integer):
        info = np.iinfo(volume.dtype)
        return float(info.min), float(info.max)
    return float(np.min(volume)), float(np.max(volume))


def to_zero_one(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """float32 ``(x - lo) / (hi - lo)`` clipped to [0, 1]; zeros when ``hi <= lo``."""
    if hi <= lo:
        return np.zeros(np.shape(x), np.float32)
    y = (np.asarray(x, np.float32) - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    return np.clip(y, 0.0, 1.0, out=y)


def resize_planes(planes: np.ndarray, size: int) -> np.ndarray:
    """(k, h, w) -> (k, size, size) float32, bilinear (align_corners=False, as FID resizes)."""
    t = torch.from_numpy(np.ascontiguousarray(planes, dtype=np.float32))[:, None]
    if t.shape[-2:] != (size, size):
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return t[:, 0].numpy()


def mean_abs_differences(volume: np.ndarray) -> tuple[float, float, float]:
    """Sum of ``|forward difference|`` along D, H and W of a volume mapped to [0, 1], each
    divided by the voxel count (the three parts of :func:`total_variation`)."""
    volume = np.asarray(volume)
    lo, hi = intensity_range(volume)
    sums = [0.0, 0.0, 0.0]
    # Slabs of slices (overlapping by one for the D differences) bound the float32 copies to a
    # few hundred MB for 512^3 volumes.
    for start in range(0, volume.shape[0], TV_SLAB):
        x = torch.from_numpy(to_zero_one(volume[start : start + TV_SLAB + 1], lo, hi))
        sums[0] += float(torch.diff(x, dim=0).abs().sum(dtype=torch.float64))
        x = x[:TV_SLAB]  # the overlapping slice is counted with the next slab
        for a in (1, 2):
            sums[a] += float(torch.diff(x, dim=a).abs().sum(dtype=torch.float64))
    return (sums[0] / volume.size, sums[1] / volume.size, sums[2] / volume.size)


def total_variation(volume: np.ndarray) -> float:
    """Anisotropic 3D total variation per voxel of a volume on the unit range.

    TV = (1 / (D H W)) * sum over voxels of |x[d+1,h,w]-x[d,h,w]| + |x[d,h+1,w]-x[d,h,w]|
    + |x[d,h,w+1]-x[d,h,w]| (forward differences; missing ones at the far borders count 0),
    after mapping :func:`intensity_range` to [0, 1]. Dividing by the voxel count makes sets of
    different shapes comparable; the value lies in [0, 3]: 0 for flat volumes, ~1 for uniform
    noise, ~0.27 for the phantom dataset.

    The paper (Table 1) reports ~575-712 for 512^3 volumes without stating its normalisation
    or intensity scale, so the numbers are not comparable in magnitude, only in ordering
    (lower is cleaner).
    """
    return float(sum(mean_abs_differences(volume)))


class SliceProfileHF:
    """Strip energy: the high-frequency part of the per-slice mean intensity along an axis.

    m[i] is the mean of slice i (D by default) on [0, 1] (:func:`intensity_range`); the value
    is the RMS of ``m`` minus its local quadratic fit over ``window`` slices (Savitzky-Golay,
    exact for linear and quadratic drifts, also at the ends): what changes within a few slices.
    Anatomy drifts slowly along D, so a real volume scores low; bright/dark slices alternating,
    or a step every decode chunk, score high. Compare sets by the ratio synthetic/real (1 is
    ideal; above 1, strips). With ``axis=2`` it measures strips along W of the en-face view.
    """

    def __init__(self, axis: int = 0, window: int = 7) -> None:
        self.axis = axis
        self.window = window

    def __call__(self, volume: np.ndarray) -> float:
        from scipy.signal import savgol_filter

        volume = np.asarray(volume)
        lo, hi = intensity_range(volume)
        other = tuple(a for a in range(volume.ndim) if a != self.axis)
        m = (volume.mean(axis=other, dtype=np.float64) - lo) / max(hi - lo, 1e-12)
        window = min(self.window, m.size - 1 + m.size % 2)  # odd, at most the length
        if window < 5:
            return 0.0
        hf = m - savgol_filter(m, window, 2, mode="interp")
        return float(np.sqrt(np.mean(hf**2)))


class InterSliceRatio:
    """Mean ``|x[d+1] - x[d]|`` across slices over mean ``|x[:, :, w+1] - x[:, :, w]|`` within
    them (W, the other lateral axis, so anatomy affects both alike).

    Slices decoded independently differ more from their neighbours than neighbouring columns
    do: the ratio rises with slice-to-slice inconsistency. Compare sets by synthetic/real.
    """

    def __call__(
        self, volume: np.ndarray, differences: tuple[float, float, float] | None = None
    ) -> float:
        """``differences``: :func:`mean_abs_differences` of ``volume`` when already known."""
        d, _, w = differences or mean_abs_differences(volume)
        return d / w if w > 0 else float("inf") if d > 0 else 1.0


class ColumnPersistence:
    """How much of each slice's fine column texture the other slices share: the mean Pearson
    correlation, over pairs of slices, of their high-passed column profiles.

    A slice's column profile is its mean over depth (H) for each column (W); high-passing it
    (minus a moving average over ``window`` columns) keeps the texture finer than the anatomy.
    Real speckle is drawn afresh in every slice: about 0. A decoder that paints the same fine
    pattern into every slice whose latent is alike, scores towards 1, and that pattern is what
    the en-face projection shows as vertical lines (:class:`SliceProfileHF` with ``axis=2``
    measures their strength; this measures why they survive averaging over slices). Reported
    as a value, not a ratio, since the real value is near 0. The high-pass is a moving average
    (not :class:`SliceProfileHF`'s Savitzky-Golay fit): it runs over all slices' profiles at
    once, and a correlation does not depend on the filter's gain. It is the one the ae2d
    column term trains on (:func:`caldm.nn.losses.column_texture`).
    """

    def __init__(self, window: int | None = None) -> None:
        from caldm.nn.losses import COLUMN_WINDOW

        self.window = COLUMN_WINDOW if window is None else window

    def __call__(self, volume: np.ndarray) -> float:
        from caldm.nn.losses import column_texture

        slices = torch.from_numpy(np.ascontiguousarray(volume, np.float64))[:, None]  # (D,1,H,W)
        hp = column_texture(slices, self.window).double().numpy()  # (D, W)
        hp -= hp.mean(axis=1, keepdims=True)
        norm = np.linalg.norm(hp, axis=1)
        keep = norm > 1e-12 * max(float(norm.max(initial=0.0)), 1.0)
        if keep.sum() < 2:
            return 0.0
        unit = hp[keep] / norm[keep, None]
        corr = unit @ unit.T
        n = len(unit)
        return float((corr.sum() - n) / (n * (n - 1)))


SLICE_CONSISTENCY = ("profile_hf_d", "profile_hf_w", "inter_slice_ratio")


def slice_consistency(
    volume: np.ndarray, differences: tuple[float, float, float] | None = None
) -> dict[str, float]:
    """The :data:`SLICE_CONSISTENCY` measures of one volume (higher: more strips)."""
    return {
        "profile_hf_d": SliceProfileHF(axis=0)(volume),
        "profile_hf_w": SliceProfileHF(axis=2)(volume),
        "inter_slice_ratio": InterSliceRatio()(volume, differences),
    }


def ratio_report(real: list[float], synthetic: list[float]) -> dict[str, object]:
    """``{"real": mean_std, "synthetic": mean_std, "ratio": synthetic mean / real mean}``."""
    r, s = mean_std(real), mean_std(synthetic)
    return {"real": r, "synthetic": s, "ratio": s["mean"] / r["mean"] if r["mean"] else None}


def mean_std(values: list[float] | np.ndarray) -> dict[str, float]:
    """``{"mean", "std"}`` of a set of per-volume values (population std; 0 for one value)."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        raise ValueError("no values")
    return {"mean": float(v.mean()), "std": float(v.std())}


# ------------------------------------------------------------------ label fidelity (Table 2)
# Segmentation metrics of the paper's Table 2 on integer label maps (numpy or torch). Layer
# maps follow the dataset convention: class 0 is background (above and below the retina) and
# classes 1..C-1 are stacked top to bottom along the depth axis.


def _one_hot(label: np.ndarray | torch.Tensor, num_classes: int) -> torch.Tensor:
    """(...) integer map -> (1, C, ...) float one-hot, the layout MONAI's metrics take."""
    t = torch.as_tensor(np.asarray(label), dtype=torch.long)
    return F.one_hot(t, num_classes).movedim(-1, 0)[None].float()


def _check_pair(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> None:
    if np.shape(pred) != np.shape(ref):
        raise ValueError(f"prediction {np.shape(pred)} and reference {np.shape(ref)} differ")
    top = max(int(np.max(pred)), int(np.max(ref))) if np.size(ref) else 0
    if top >= num_classes:
        raise ValueError(f"class {top} found; expected classes 0..{num_classes - 1}")


class MeanDice:
    """Mean Dice over the foreground classes 1..C-1, one value per (prediction, reference)
    pair, averaged over the pairs seen (a pair is typically one volume).

    Per pair it is MONAI's ``compute_dice`` over all its pixels per class, averaged over the
    classes present in the reference (a class absent from the reference is skipped, whatever
    the prediction holds). ``metric(pred, ref)`` adds a pair and returns its value;
    :meth:`aggregate` is the mean over pairs.
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.values: list[float] = []

    def __call__(self, pred: np.ndarray, ref: np.ndarray) -> float:
        from monai.metrics import compute_dice

        _check_pair(pred, ref, self.num_classes)
        per_class = compute_dice(
            _one_hot(pred, self.num_classes),
            _one_hot(ref, self.num_classes),
            include_background=False,
            ignore_empty=True,  # NaN for classes missing from the reference
        )
        value = float(torch.nanmean(per_class))
        self.values.append(value)
        return value

    def aggregate(self) -> float:
        return float(np.mean(self.values)) if self.values else float("nan")


class ArteryVeinIoU:
    """IoU of arteries (class 1) and veins (class 2) of en-face vessel maps (the paper's IoU-A
    and IoU-V), one pair per volume, averaged over pairs.

    Per pair it is MONAI's ``compute_iou``; a class absent from both maps counts as IoU 1, absent
    only from the reference as 0 (a false vessel is an error). ``metric(pred, ref)`` returns
    ``{"iou_a", "iou_v"}`` of that pair; :meth:`aggregate` the means.
    """

    def __init__(self) -> None:
        self.values: list[dict[str, float]] = []

    def __call__(self, pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
        from monai.metrics import compute_iou

        _check_pair(pred, ref, 3)
        iou = compute_iou(_one_hot(pred, 3), _one_hot(ref, 3), include_background=False,
                          ignore_empty=False)[0]
        value = {"iou_a": float(iou[0]), "iou_v": float(iou[1])}
        self.values.append(value)
        return value

    def aggregate(self) -> dict[str, float]:
        keys = ("iou_a", "iou_v")
        if not self.values:
            return {k: float("nan") for k in keys}
        return {k: float(np.mean([v[k] for v in self.values])) for k in keys}


class BoundaryMAD:
    """Layer-boundary mean absolute distance (MAD, pixels along depth; the paper's Table 2).

    For a (prediction, reference) pair of layer maps, with boundaries as in
    :func:`layer_boundaries` (the top of each class 1..C-1, per A-scan): MAD is the mean of
    ``|depth_pred - depth_ref|`` over every boundary and A-scan where the reference has that
    boundary. Reference boundaries that do not exist (no class >= c in that A-scan) are not
    scored; a boundary the prediction lacks sits at the A-scan length, so leaving a layer out
    costs its distance to the bottom of the scan. A pair whose reference has no boundary at all
    is NaN. ``axis`` is the depth axis (-2 for H x W B-scans and D x H x W volumes).
    ``metric(pred, ref)`` returns the pair's MAD; :meth:`aggregate` the mean over pairs.
    """

    def __init__(self, num_classes: int, axis: int = -2) -> None:
        self.num_classes = num_classes
        self.axis = axis
        self.values: list[float] = []

    def __call__(self, pred: np.ndarray, ref: np.ndarray) -> float:
        _check_pair(pred, ref, self.num_classes)
        depth = np.shape(ref)[self.axis]
        zp = layer_boundaries(pred, self.num_classes, self.axis)
        zr = layer_boundaries(ref, self.num_classes, self.axis)
        scored = zr < depth
        value = float(np.abs(zp - zr)[scored].mean()) if scored.any() else float("nan")
        self.values.append(value)
        return value

    def aggregate(self) -> float:
        return float(np.nanmean(self.values)) if self.values else float("nan")


def vessel_contrast(volume: np.ndarray, vessels: np.ndarray) -> float:
    """How much the en-face mean projection darkens where the en-face label has vessels.

    ``(mean outside - mean inside) / std outside`` of ``volume.mean(axis=1)`` (D x W), with
    inside = label > 0: positive when vessels shade the layers below them (as in OCT), about 0
    when the image ignores the vessel label. NaN when the label has no vessels or no background.
    """
    proj = np.asarray(volume, np.float64).mean(axis=1)
    inside = np.asarray(vessels) > 0
    if proj.shape != inside.shape:
        raise ValueError(f"en-face projection {proj.shape} and vessel map {inside.shape} differ")
    if inside.all() or not inside.any():
        return float("nan")
    out = proj[~inside]
    return float((out.mean() - proj[inside].mean()) / max(out.std(), 1e-12))


# ------------------------------------------------------------- sets of volumes, in process

SETS = ("real", "synthetic")


def volume_planes(volume: np.ndarray, max_slices: int) -> dict[str, Any]:
    """A volume's TV, slice consistency and intra and inter planes at INPUT_SIZE on [0, 1].

    Returns ``{"tv": float, <each of SLICE_CONSISTENCY>: float, "intra": (k, S, S),
    "inter": (k, S, S)}`` (float32 planes).
    """
    lo, hi = intensity_range(volume)
    intra = intra_planes(volume, max_slices)
    inter = inter_planes(volume, max_slices)
    differences = mean_abs_differences(volume)
    return {
        "tv": float(sum(differences)),
        **slice_consistency(volume, differences),
        "intra": resize_planes(to_zero_one(intra, lo, hi), INPUT_SIZE),
        "inter": resize_planes(to_zero_one(inter, lo, hi), INPUT_SIZE),
    }


def evaluate_volumes(
    real: list[np.ndarray],
    synthetic: list[np.ndarray],
    inception_weights: str | None = None,
    max_slices_per_volume: int = 16,
    batch_size: int = 32,
) -> dict[str, Any]:
    """:func:`compute_report`'s numbers for volumes in memory, in this process (no Ray).

    For benchmarks that compare a few small sets (ablations, samplers): same planes, same
    extractor and the same statistics as the Ray Data job. Returns ``intra_fid``,
    ``inter_fid``, ``tv`` and ``slice_consistency`` (each ``{"real", "synthetic", "ratio"}``)
    and ``feature_extractor``.
    """
    import torch

    from caldm.nn.nets.inception import build_fid_inception

    model, extractor = build_fid_inception(inception_weights)
    model.eval()
    stats = {(s, k): FeatureStats(FEATURE_DIM) for s in SETS for k in PLANE_KINDS}
    scalars: dict[str, dict[str, list[float]]] = {
        m: {s: [] for s in SETS} for m in ("tv", *SLICE_CONSISTENCY)
    }
    for set_name, volumes in zip(SETS, (real, synthetic)):
        for volume in volumes:
            planes = volume_planes(np.asarray(volume), max_slices_per_volume)
            for m in scalars:
                scalars[m][set_name].append(planes[m])
            for kind in PLANE_KINDS:
                for i in range(0, len(planes[kind]), batch_size):
                    x = torch.from_numpy(planes[kind][i : i + batch_size])[:, None]
                    with torch.inference_mode():
                        stats[set_name, kind].update(model.features(x).float().numpy())
    return {
        "intra_fid": stats["real", "intra"].frechet_distance(stats["synthetic", "intra"]),
        "inter_fid": stats["real", "inter"].frechet_distance(stats["synthetic", "inter"]),
        "tv": ratio_report(scalars["tv"]["real"], scalars["tv"]["synthetic"]),
        "slice_consistency": {
            m: ratio_report(scalars[m]["real"], scalars[m]["synthetic"])
            for m in SLICE_CONSISTENCY
        },
        "feature_extractor": extractor,
    }
