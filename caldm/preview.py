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
