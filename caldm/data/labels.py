"""Label geometry in one place: reading labels with their voxel sizes, checking them against a
model, and reducing a full-resolution label to what the condition encoders read.

Two kinds of label (DESIGN.md dataset layout):
- ``layers``: a layer map, one class per voxel, ``(D, H, W)``;
- ``vessels``: an en-face artery/vein map ``(D, W)``: 0 background, 1 artery, 2 vein.

The condition encoders (:mod:`caldm.nn.nets.condition`) read **class fractions** on a grid
twice the latent grid (:func:`encoder_grid`): for each cell, the share of the full-resolution
voxels of each class (an area-averaged one-hot map, :func:`reduce_label`). Every voxel counts,
so a one-voxel band or a boundary moved by one voxel still changes the encoder's input, which
nearest-neighbour sampling to the grid did not guarantee. The reduction runs in slabs along the
first axis, so a 512^3 label with 11 classes never exists as a full one-hot map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from caldm.config import Config
from caldm.data.io import LabelKind, read_label
from caldm.errors import DataError

if TYPE_CHECKING:  # torch is imported where it is used: Ray writer tasks import this module
    import torch

VESSEL_CLASSES = 3  # background, artery, vein
Consumer = Literal["diff3d", "refiner"]
_SLAB_VOXELS = 1 << 22  # voxels counted at a time (about 4M: 32 MiB of int64 indices)


@dataclass
class LabelMap:
    """A label as stored: its class map and voxel sizes (mm per voxel along each axis)."""

    array: np.ndarray  # uint8, (D, H, W) layers or (D, W) vessels
    spacing: tuple[float, ...]
    kind: LabelKind
    url: str


def shift_depth(array: np.ndarray, rows: int, axis: int = 1) -> np.ndarray:
    """``array`` moved down by ``rows`` along its depth ``axis`` (up for ``rows < 0``), the edge
    rows replicated: what enters is vitreous or sclera, like the rows it copies. One rule for
    volumes, labels and latents, so that moving them together keeps them aligned."""
    n = array.shape[axis]
    return np.take(array, np.clip(np.arange(n) - rows, 0, n - 1), axis=axis)


def layer_boundaries(label: np.ndarray, num_classes: int, axis: int = -2) -> np.ndarray:
    """Depth of every boundary between consecutive layer classes, per A-scan.

    Boundary c (c = 1..C-1) is the top of class c: in each A-scan (a line along ``axis``, the
    depth), the index of the first pixel whose class is >= c. A layer that thins out to nothing
    thus puts its boundary on the next one, as layer surfaces do. An A-scan with no class >= c
    has no boundary c: its depth is the A-scan length (just below the scan).

    Returns int64 of shape (C-1, *A-scan grid) (``label``'s shape without ``axis``).
    """
    lab = np.moveaxis(np.asarray(label), axis, -1)
    depth = lab.shape[-1]
    out = np.empty((num_classes - 1, *lab.shape[:-1]), np.int64)
    for c in range(1, num_classes):
        below = lab >= c
        first = below.argmax(axis=-1)
        first[~below.any(axis=-1)] = depth
        out[c - 1] = first
    return out


def read_label_map(url: str, kind: LabelKind) -> LabelMap:
    """Read a label and its voxel sizes (from the NIfTI affine, through nibabel).

    Raises DataError naming ``url`` for a missing, corrupt or wrongly shaped file.
    """
    array, spacing = read_label(url, kind, with_spacing=True)
    if 0 in array.shape:
        raise DataError(url, f"{kind} label has an empty axis (shape {array.shape})")
    return LabelMap(array, spacing, kind, url)


def num_label_classes(kind: str, layer_classes: int) -> int:
    """Classes an encoder one-hot encodes: ``layer_classes`` for layers, 3 for vessels."""
    return layer_classes if kind == "layers" else VESSEL_CLASSES


def check_label(
    label: np.ndarray,
    kind: str,
    source: str,
    num_classes: int,
    image_shape: tuple[int, int, int] | None = None,
) -> np.ndarray:
    """``label`` as a uint8 array, after checking it fits a model; one DataError naming ``source``.

    Checks: the dimensionality of ``kind`` (D x H x W layers, D x W vessels), integer values in
    ``0 .. num_classes - 1`` (layers; vessels always have 3 classes) and, when ``image_shape``
    is given, the shape (the image's D x H x W, or D x W for vessels).
    """
    label = np.asarray(label)
    want_ndim = 3 if kind == "layers" else 2
    if kind not in ("layers", "vessels"):
        raise DataError(source, f"unknown label kind {kind!r}; expected layers or vessels")
    if label.ndim != want_ndim:
        layout = "D x H x W layer map" if kind == "layers" else "D x W en-face vessel map"
        raise DataError(source, f"expected a {layout} ({kind} label), got shape {label.shape}")
    if 0 in label.shape:
        raise DataError(source, f"{kind} label has an empty axis (shape {label.shape})")
    if image_shape is not None:
        d, h, w = image_shape
        want = (d, h, w) if kind == "layers" else (d, w)
        if tuple(label.shape) != want:
            raise DataError(
                source, f"{kind} label shape {label.shape} does not match the image {want}"
            )
    if label.dtype.kind not in "iub":
        raise DataError(source, f"{kind} label values must be integers, got {label.dtype}")
    classes = num_label_classes(kind, num_classes)
    top = int(label.max())
    if int(label.min()) < 0 or top >= classes:
        raise DataError(
            source,
            f"{kind} label values must be in 0..{classes - 1} ({classes} classes, as the model "
            f"was built for), got values up to {top}",
        )
    return label.astype(np.uint8, copy=False)


def encoder_grid(cfg: Config, kind: str, consumer: Consumer) -> tuple[int, ...]:
    """The grid a condition encoder reads its class fractions on: twice its latent grid.

    ``diff3d``: ``(2D', 2H', 2W')`` (vessels: ``(2D', 2W')``); ``refiner``: one row per image
    slice, ``(D, 2H', 2W')`` (vessels: ``(D, 2W')``), of which slice ``i`` is row ``i``.
    """
    m = cfg.model
    if consumer == "diff3d":
        _, d, h, w = m.latent_shape
        grid = (2 * d, 2 * h, 2 * w)
    elif consumer == "refiner":
        _, h, w = m.slice_latent_shape
        grid = (m.image_shape[0], 2 * h, 2 * w)
    else:
        raise ValueError(f"unknown condition consumer {consumer!r}; expected diff3d or refiner")
    return grid if kind == "layers" else (grid[0], grid[2])


def _cells(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """(cell of each input index, input index per output cell when upsampling or None).

    Shrinking (``n_in >= n_out``): each voxel goes to the cell containing its centre.
    Growing: each cell takes the voxel containing its centre (every voxel is still used).
    """
    if n_in >= n_out:
        cells = ((np.arange(n_in) + 0.5) * n_out / n_in).astype(np.int64)
        return np.minimum(cells, n_out - 1), None
    pick = np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)
    return np.arange(n_out, dtype=np.int64), pick


def reduce_label(
    label: np.ndarray | torch.Tensor,
    kind: str,
    grid: tuple[int, ...],
    num_classes: int,
) -> np.ndarray | torch.Tensor:
    """Area-averaged one-hot: the fraction of each class's voxels in every cell of ``grid``.

    Args:
        label: integer class map of any size with ``len(grid)`` axes (layers ``(D, H, W)`` or one
            B-scan ``(H, W)``; vessels ``(D, W)`` or one row ``(W,)``), values below the class
            count (checked by :func:`check_label`; larger values raise ValueError).
        kind: ``layers`` or ``vessels`` (3 classes, whatever ``num_classes`` says).
        grid: the output cells per axis (see :func:`encoder_grid`).
        num_classes: layer classes.

    Returns:
        float32 ``(C, *grid)``, each cell's fractions summing to 1; numpy for numpy input, a
        tensor on the input's device for tensor input. An axis longer than its cells is
        averaged (each voxel counted in the cell holding its centre; exact area averaging when
        the sizes divide); a shorter one is sampled at cell centres. Counting runs in slabs
        along the first axis with ``bincount``, never building a full-resolution one-hot map.
    """
    import torch

    classes = num_label_classes(kind, num_classes)
    as_numpy = not isinstance(label, torch.Tensor)
    x = torch.as_tensor(np.ascontiguousarray(label)) if as_numpy else label
    grid = tuple(int(g) for g in grid)
    if x.dim() != len(grid):
        raise ValueError(f"a label of shape {tuple(x.shape)} cannot be reduced to grid {grid}")
    if x.numel() and (int(x.min()) < 0 or int(x.max()) >= classes):
        top = int(x.max())
        raise ValueError(f"{kind} label values must be in 0..{classes - 1}, got up to {top}")
    device = x.device
    cell, sizes = [], []
    for axis, (n, m) in enumerate(zip(x.shape, grid)):
        to_cell, pick = _cells(int(n), m)
        if pick is not None:  # fewer voxels than cells along this axis: sample it first
            x = x.index_select(axis, torch.as_tensor(pick, device=device))
        cell.append(torch.as_tensor(to_cell, device=device))
        sizes.append(torch.bincount(cell[-1], minlength=m).to(torch.float64))
    # flat cell index of every voxel = sum over axes of cell[axis] * stride[axis]
    strides = [int(np.prod(grid[a + 1 :])) for a in range(len(grid))]
    rest = sum(
        (cell[a] * strides[a]).view(*[-1 if b == a else 1 for b in range(len(grid))])
        for a in range(1, len(grid))
    )
    n_cells = int(np.prod(grid))
    counts = torch.zeros(n_cells * classes, dtype=torch.float64, device=device)
    per_row = max(1, int(np.prod(x.shape[1:])))
    slab = max(1, _SLAB_VOXELS // per_row)
    for s0 in range(0, x.shape[0], slab):
        part = x[s0 : s0 + slab].long()
        flat = cell[0][s0 : s0 + slab].view(-1, *[1] * (x.dim() - 1)) * strides[0] + rest
        counts += torch.bincount((flat * classes + part).reshape(-1), minlength=n_cells * classes)
    volume = sizes[0]
    for s in sizes[1:]:
        volume = torch.outer(volume.reshape(-1), s).reshape(-1)
    fractions = (counts.view(n_cells, classes) / volume.view(-1, 1)).T.reshape(classes, *grid)
    fractions = fractions.to(torch.float32)
    return fractions.numpy() if as_numpy else fractions


@dataclass
class PreparedLabels:
    """A label reduced on the host for both condition encoders (:func:`prepare_labels`)."""

    diff3d: np.ndarray  # (C, *encoder_grid(cfg, kind, "diff3d"))
    refiner: np.ndarray  # (D, C, ...): row i is what the refiner's encoder reads for slice i


def prepare_labels(
    label: np.ndarray,
    kind: str,
    cfg: Config,
    source: str = "labels",
    num_classes: int | None = None,
) -> PreparedLabels:
    """Check a full-resolution label against a model and reduce it for both encoders.

    ``label`` may have any size (it is reduced from its own resolution, never resized to the
    image first); ``num_classes`` defaults to ``cfg.model.condition.layer_classes``. Errors are
    :class:`DataError` naming ``source``.
    """
    classes = num_classes or cfg.model.condition.layer_classes
    label = check_label(label, kind, source, classes)
    diff3d = reduce_label(label, kind, encoder_grid(cfg, kind, "diff3d"), classes)
    refiner = reduce_label(label, kind, encoder_grid(cfg, kind, "refiner"), classes)
    return PreparedLabels(diff3d, np.ascontiguousarray(np.moveaxis(refiner, 1, 0)))


def resize_to_image(
    label: LabelMap, image_shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """The label on the image's grid (nearest neighbour) and the 4x4 affine of that grid.

    The affine keeps the label's field of view: voxel sizes scale with the resize. This is
    the label written beside a generated volume; the encoders read :func:`prepare_labels`.
    """
    from caldm.data.io import spacing_affine
    from caldm.data.preprocess import resize

    d, h, w = image_shape
    array, zooms = label.array, label.spacing
    if label.kind == "layers":
        target: tuple[int, ...] = (d, h, w)
        spacing = [z * s / t for z, s, t in zip(zooms, array.shape, target)]
    else:  # en-face D x W: the depth spacing is unknown, 1 mm
        target = (d, w)
        spacing = [zooms[0] * array.shape[0] / d, 1.0, zooms[1] * array.shape[1] / w]
    return resize(array, target, order="nearest"), spacing_affine(tuple(spacing))


def load_label(
    url: str, kind: LabelKind, image_shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`resize_to_image` of the label at ``url``; DataError naming ``url`` if unreadable."""
    return resize_to_image(read_label_map(url, kind), image_shape)
