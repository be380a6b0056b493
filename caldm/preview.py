"""Preview images of OCT volumes, laid out like the paper's Fig. 2.

One row per volume: the middle B-scan ``volume[D//2]`` (H x W), the middle plane across slices
``volume[:, :, W//2]`` (shown H x D, depth downwards like the B-scan) and the en-face mean
projection along depth H (D x W). Each panel is scaled to its own 0.5-99.5 percentile range
and stretched to a square tile (as in Fig. 2); column headers and row titles are labelled.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

TILE = 192
LABEL_W = 150
HEADER_H = 18
PAD = 4
COLUMNS = ("middle B-scan", "middle across slices", "en-face mean")


def _panels(volume: np.ndarray) -> list[np.ndarray]:
    v = np.asarray(volume, np.float32)
    if v.ndim != 3:
        raise ValueError(f"expected a D x H x W volume, got shape {v.shape}")
    d, _, w = v.shape
    return [v[d // 2], v[:, :, w // 2].T, v.mean(axis=1)]


def _to_tile(panel: np.ndarray, tile: int) -> Image.Image:
    lo, hi = np.percentile(panel, [0.5, 99.5])
    scaled = np.clip((panel - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(panel)
    img = Image.fromarray((scaled * 255).round().astype(np.uint8), mode="L")
    # Square tiles: OCT volumes cover a roughly square field whatever their voxel counts.
    return img.resize((tile, tile), Image.BILINEAR)


def volume_preview(
    volumes: list[np.ndarray], titles: list[str] | None = None, tile: int = TILE
) -> Image.Image:
    """A labelled grid (one row per D x H x W volume) of middle slices and mean projection."""
    if not volumes:
        raise ValueError("volume_preview needs at least one volume")
    if titles is not None and len(titles) != len(volumes):
        raise ValueError(f"{len(titles)} titles for {len(volumes)} volumes")
    titles = titles or [f"volume {i}" for i in range(len(volumes))]
    width = LABEL_W + len(COLUMNS) * (tile + PAD)
    height = HEADER_H + len(volumes) * (tile + PAD)
    sheet = Image.new("L", (width, height), 32)
    draw = ImageDraw.Draw(sheet)
    for j, name in enumerate(COLUMNS):
        draw.text((LABEL_W + j * (tile + PAD) + 2, 3), name, fill=255)
    for i, (volume, title) in enumerate(zip(volumes, titles)):
        y = HEADER_H + i * (tile + PAD)
        shape = "x".join(str(s) for s in np.shape(volume))
        draw.text((4, y + tile // 2 - 12), title[:24], fill=255)
        draw.text((4, y + tile // 2 + 2), shape, fill=160)
        for j, panel in enumerate(_panels(volume)):
            sheet.paste(_to_tile(panel, tile), (LABEL_W + j * (tile + PAD), y))
    return sheet.convert("RGB")


# Boundary colours, one per layer boundary (cycled when there are more boundaries).
BOUNDARY_COLOURS = (
    (255, 60, 60), (255, 170, 40), (240, 240, 60), (80, 220, 80), (60, 220, 220),
    (80, 140, 255), (190, 100, 255), (255, 100, 200), (200, 200, 200), (140, 90, 40),
)
VESSEL_COLOURS = {1: (255, 60, 60), 2: (60, 120, 255)}  # artery, vein


def _overlay_tiles(volume: np.ndarray, label: np.ndarray, tile: int) -> list[Image.Image]:
    """[plain, with the label drawn over it]: the middle B-scan with the layer boundaries of a
    D x H x W layer label, or the en-face projection with the outline of a D x W vessel map."""
    from caldm.data.labels import layer_boundaries

    v = np.asarray(volume, np.float32)
    lab = np.asarray(label)
    if lab.ndim == 3:
        panel, lab2 = v[v.shape[0] // 2], lab[lab.shape[0] // 2]
    else:
        panel, lab2 = v.mean(axis=1), lab
    plain = _to_tile(panel, tile).convert("RGB")
    drawn = plain.copy()
    draw = ImageDraw.Draw(drawn)
    h, w = lab2.shape
    if lab.ndim == 3:  # boundaries: the top of each class 1..C-1 along each A-scan
        depths = layer_boundaries(lab2, int(lab.max()) + 1, axis=0)
        xs = (np.arange(w) + 0.5) * tile / w
        for c, z in enumerate(depths):
            points = [(float(x), float(d) * tile / h) for x, d in zip(xs, z) if d < h]
            if len(points) > 1:
                draw.line(points, fill=BOUNDARY_COLOURS[c % len(BOUNDARY_COLOURS)], width=1)
    else:  # vessels: outline pixels (a vessel pixel with a non-vessel 4-neighbour)
        for cls, colour in VESSEL_COLOURS.items():
            m = lab2 == cls
            inner = m.copy()
            inner[1:] &= m[:-1]
            inner[:-1] &= m[1:]
            inner[:, 1:] &= m[:, :-1]
            inner[:, :-1] &= m[:, 1:]
            for i, j in zip(*np.nonzero(m & ~inner)):
                draw.point(((j + 0.5) * tile / w, (i + 0.5) * tile / h), fill=colour)
    return [plain, drawn]


def label_overlay(
    volumes: list[np.ndarray],
    labels: list[np.ndarray],
    titles: list[str],
    tile: int = TILE,
) -> Image.Image:
    """Does the image follow its label? One row per volume: the middle B-scan, and the same
    B-scan with its layer label's boundaries drawn over it (a D x W vessel label: the en-face
    projection with the artery (red) and vein (blue) outlines)."""
    if not volumes or not (len(volumes) == len(labels) == len(titles)):
        raise ValueError(f"{len(volumes)} volumes, {len(labels)} labels, {len(titles)} titles")
    columns = ("image", "image + guiding label")
    width = LABEL_W + len(columns) * (tile + PAD)
    height = HEADER_H + len(volumes) * (tile + PAD)
    sheet = Image.new("RGB", (width, height), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    for j, name in enumerate(columns):
        draw.text((LABEL_W + j * (tile + PAD) + 2, 3), name, fill=(255, 255, 255))
    for i, (volume, label, title) in enumerate(zip(volumes, labels, titles)):
        y = HEADER_H + i * (tile + PAD)
        draw.text((4, y + tile // 2 - 6), title[:24], fill=(255, 255, 255))
        for j, img in enumerate(_overlay_tiles(volume, label, tile)):
            sheet.paste(img, (LABEL_W + j * (tile + PAD), y))
    return sheet


# ------------------------------------------------------- datasets: real beside synthetic

PREVIEW_PER_SET = 2


def list_volumes(root: str) -> list[tuple[str, str]]:
    """(id, image URL) of every volume under ``root``; DataError naming ``root`` if none."""
    from caldm.data.layout import DatasetLayout

    layout = DatasetLayout(root)
    return [(sample_id, layout.image_url(sample_id)) for sample_id in layout.ids()]


def preview_image(real: str, synthetic: str, per_set: int = PREVIEW_PER_SET) -> Image.Image:
    """Fig. 2-style preview: the first ``per_set`` real volumes above the synthetic ones."""
    from caldm.data.io import read_volume

    vols, titles = [], []
    for name, root in (("real", real), ("synthetic", synthetic)):
        for sample_id, url in list_volumes(root)[:per_set]:
            vols.append(read_volume(url)[0])
            titles.append(f"{name}: {sample_id}")
    return volume_preview(vols, titles)


def overlay_image(
    real: str, synthetic: str, task: str, per_set: int = PREVIEW_PER_SET
) -> Image.Image:
    """Synthetic volumes with their guiding label drawn over them, beside real ones with their
    own label (:func:`caldm.preview.label_overlay`)."""
    from caldm.data.io import read_label, read_volume
    from caldm.data.layout import DatasetLayout

    vols, labels, titles = [], [], []
    for name, root in (("real", real), ("synthetic", synthetic)):
        layout = DatasetLayout(root)
        for sample_id in layout.label_ids(task)[:per_set]:
            vols.append(read_volume(layout.image_url(sample_id))[0])
            labels.append(read_label(layout.label_url(task, sample_id), task))
            titles.append(f"{name}: {sample_id}")
    return label_overlay(vols, labels, titles)
