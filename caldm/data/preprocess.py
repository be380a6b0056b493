"""Preprocessing as in the paper: resizing to the preset's shape, thumbnails, [-1, 1] scaling.

The paper resizes OCTA-500 volumes from 400 x 640 x 400 to 512^3 (D x H x W) and encodes a
nearest-neighbour thumbnail. Labels are always resized with nearest neighbour.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike

Order = Literal["linear", "nearest"]


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    # Voxel centres map to voxel centres, the same geometry as linear resizing with
    # align_corners=False, so resized labels stay registered to resized images.
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


def resize(array: np.ndarray, shape: tuple[int, ...], order: Order = "linear") -> np.ndarray:
    """Resize a 2D or 3D array to ``shape``; the dtype is kept.

    ``linear`` is (bi/tri)linear interpolation (integer inputs are rounded and clipped back to
    their dtype); ``nearest`` picks the nearest voxel centre (use it for labels).
    """
    array = np.asarray(array)
    shape = tuple(int(s) for s in shape)
    if len(shape) != array.ndim or array.ndim not in (2, 3):
        raise ValueError(f"cannot resize an array of shape {array.shape} to {shape}")
    if tuple(array.shape) == shape:
        return array
    if order == "nearest":
        index = [_nearest_index(n, m) for n, m in zip(array.shape, shape)]
        return array[np.ix_(*index)]
    if order != "linear":
        raise ValueError(f"unknown resize order {order!r}; expected 'linear' or 'nearest'")
    mode = "bilinear" if array.ndim == 2 else "trilinear"
    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    out = F.interpolate(x, size=shape, mode=mode, align_corners=False)[0, 0].numpy()
    if array.dtype.kind in "iub":
        info = np.iinfo(array.dtype) if array.dtype.kind != "b" else np.iinfo(np.uint8)
        return np.clip(np.rint(out), info.min, info.max).astype(array.dtype)
    return out.astype(array.dtype, copy=False)


def thumbnail(volume: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """The thumbnail Enc3D sees: nearest-neighbour downsampling, as the paper code does."""
    return resize(volume, shape, order="nearest")


def to_unit_range(array: np.ndarray) -> np.ndarray:
    """Intensities as float32 in [-1, 1] for training.

    Integer volumes use their dtype's full range (uint8: x / 127.5 - 1). Float volumes have no
    fixed range, so each is min-max scaled to [-1, 1] (a constant volume maps to 0).
    """
    array = np.asarray(array)
    if array.dtype.kind in "iub":
        info = np.iinfo(array.dtype) if array.dtype.kind != "b" else np.iinfo(np.uint8)
        span = float(info.max) - float(info.min)
        return (array.astype(np.float32) - info.min) * np.float32(2.0 / span) - 1.0
    x = array.astype(np.float32)
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros_like(x)
    return (x - lo) * np.float32(2.0 / (hi - lo)) - 1.0


def from_unit_range(x: ArrayLike) -> np.ndarray:
    """[-1, 1] (numpy or CPU torch) to uint8 0..255, clipping values outside the range."""
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=np.float32)
    return np.rint((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def read_model_volume(url: str, shape: tuple[int, int, int]) -> np.ndarray:
    """The volume at ``url`` as every stage sees it: float32 in [-1, 1]
    (:func:`to_unit_range`), resized trilinearly to the model's image grid ``shape``."""
    from caldm.data.io import read_volume

    volume, _ = read_volume(url)
    return resize(to_unit_range(volume), tuple(shape), order="linear")
