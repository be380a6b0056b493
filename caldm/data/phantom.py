"""The phantom OCT dataset: the embedded default that demos and tests train on.

A phantom volume is D x H x W with H the depth (A-scan) axis, like OCTA-500 B-scans. Its
retina is a stack of smooth surfaces over the en-face plane (D x W): a bowl-shaped Bruch's
membrane with a random low-frequency wobble, layers stacked above it whose inner layers thin
out into a foveal pit, and a choroid below. Layer classes (``LAYER_NAMES``) each have their own
reflectivity; en-face arteries and veins sit in the inner retina, appear bright, and cast
shadows on every layer below them; multiplicative speckle covers everything.

Everything is drawn from one ``numpy`` generator seeded by ``seed``, so a seed gives the same
volume on every machine. The volume is built slab by slab along D to keep memory and time low
(512^3 takes a few seconds).
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from caldm.config import preset as get_preset
from caldm.data.io import spacing_affine, write_volume
from caldm.data.layout import DatasetLayout

# Class 0 is background: vitreous above the retina and sclera below the choroid.
LAYER_NAMES = ("background", "RNFL", "GCL+IPL", "INL", "OPL", "ONL", "IS/OS", "RPE", "choroid")
# Thickness of each layer as a fraction of H, from the top (RNFL) down to the choroid.
_THICKNESS = np.array([0.04, 0.06, 0.04, 0.03, 0.08, 0.025, 0.025, 0.08])
# Inner layers vanish in the foveal pit; the ONL thickens a little there.
_PIT_SCALE = np.array([-0.95, -0.95, -0.85, -0.7, 0.3, 0.0, 0.0, 0.0])
# Mean reflectivity (0..255) per class: bright nerve fibres, dark nuclear layers, bright RPE.
REFLECTIVITY = np.array([10, 200, 120, 65, 150, 40, 185, 235, 95], dtype=np.float32)
_SPECKLE = 0.3  # relative standard deviation of the multiplicative speckle
_NOISE_FLOOR = 12.0
_SHADOW = 0.35  # fraction of the signal that passes a vessel
_VESSEL_BRIGHTNESS = 230.0
# Other class counts (num_classes): boundaries merged away first (fewer classes), or layers
# split at half thickness first (more classes); indices into the 9 boundaries, ILM = 0.
_MERGE_ORDER = (3, 5, 1, 2, 4, 6, 7)  # INL+OPL, ONL+IS/OS, RNFL+GCL+IPL, ...
_SPLIT_ORDER = (4, 7, 1, 0, 2, 3, 5, 6)  # ONL, choroid, GCL+IPL, RNFL, ...
# Field of view (mm) along D, H, W: roughly OCTA-500's 6 mm x 2 mm x 6 mm.
_FOV_MM = (6.0, 2.0, 6.0)


def _wobble(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, amp: float) -> np.ndarray:
    """A smooth random field on the en-face plane: a few low-frequency sinusoids."""
    out = np.zeros(np.broadcast_shapes(u.shape, v.shape))
    for _ in range(3):
        fu, fv = rng.uniform(0.5, 2.5, 2)
        phase = rng.uniform(0, 2 * np.pi)
        out += np.sin(2 * np.pi * (fu * u + fv * v) + phase)
    return amp * out / 3


def _surfaces(rng: np.random.Generator, d: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Boundary heights (fractions of H) of shape (9, D, W), top (ILM) first; and r^2 map."""
    u = (np.arange(d) + 0.5)[:, None] / d - 0.5  # en-face coordinates in [-0.5, 0.5]
    v = (np.arange(w) + 0.5)[None, :] / w - 0.5
    fu, fv = rng.normal(0, 0.04, 2)  # fovea near the centre
    r2 = (u - fu) ** 2 + (v - fv) ** 2
    pit = np.exp(-r2 / (2 * rng.uniform(0.05, 0.07) ** 2))
    # Bruch's membrane: a bowl (the retina curves up towards the edges of the scan).
    bm = 0.68 - rng.uniform(0.2, 0.35) * (u**2 + v**2) + _wobble(rng, u, v, 0.03)
    thick = _THICKNESS[:, None, None] * (1 + _PIT_SCALE[:, None, None] * pit)
    thick = thick * (1 + _wobble(rng, u, v, 0.15))
    inner = thick[:7]  # RNFL .. RPE, stacked upwards from BM
    tops = bm - np.cumsum(inner[::-1], axis=0)[::-1]  # top boundary of each layer
    return np.concatenate([tops, bm[None], (bm + thick[7])[None]]), r2


def _vessel_map(rng: np.random.Generator, d: int, w: int) -> np.ndarray:
    """En-face artery (1) and vein (2) map: curved branches from the optic-disc side."""
    out = np.zeros((d, w), np.uint8)
    scale = min(d, w)
    side = rng.choice([-1.0, 1.0])  # which side of the scan the optic disc lies on
    for kind in (1, 2, 1, 2, 1, 2):
        start = np.array([rng.uniform(0.3, 0.7) * d, (0.0 if side > 0 else 1.0) * w])
        angle = rng.uniform(-1.1, 1.1) + (0.0 if side > 0 else np.pi)
        radius = max(0.6, rng.uniform(0.006, 0.012) * scale)
        bend = rng.normal(0, 1.5)  # curvature: branches arc around the fovea
        step = max(0.5, radius * 0.8)
        pos = start.copy()
        for _ in range(int(2.5 * scale / step)):
            angle += bend * step / scale + rng.normal(0, 0.03)
            pos += step * np.array([np.sin(angle), np.cos(angle)])
            if not (-radius <= pos[0] < d + radius and -radius <= pos[1] < w + radius):
                break
            r = int(np.ceil(radius))
            d0, d1 = max(0, int(pos[0]) - r), min(d, int(pos[0]) + r + 2)
            w0, w1 = max(0, int(pos[1]) - r), min(w, int(pos[1]) + r + 2)
            if d0 >= d1 or w0 >= w1:
                continue
            dd, ww = np.mgrid[d0:d1, w0:w1]
            disk = (dd + 0.5 - pos[0]) ** 2 + (ww + 0.5 - pos[1]) ** 2 <= radius**2
            out[d0:d1, w0:w1][disk] = kind
            radius = max(0.6, radius * 0.998)
    return out


def _label_boundaries(surfaces: np.ndarray, num_classes: int) -> np.ndarray:
    """The boundaries a ``num_classes`` layer map is cut at (``num_classes - 1`` of them)."""
    n = len(LAYER_NAMES)
    if num_classes <= n:
        drop = set(_MERGE_ORDER[: n - num_classes])
        return surfaces[[i for i in range(len(surfaces)) if i not in drop]]
    split = sorted(_SPLIT_ORDER[: num_classes - n])
    mids = [(surfaces[i] + surfaces[i + 1]) / 2 for i in split]
    return np.sort(np.concatenate([surfaces, np.stack(mids)]), axis=0)


def layer_names(num_classes: int = len(LAYER_NAMES)) -> list[str]:
    """Class names of a ``num_classes`` phantom layer map (merged names joined by ``+``)."""
    names = list(LAYER_NAMES)
    if not 2 <= num_classes <= len(names) + len(_SPLIT_ORDER):
        raise ValueError(f"the phantom makes 2..{len(names) + len(_SPLIT_ORDER)} layer classes")
    if num_classes <= len(names):
        # merging boundary i joins class i (above it) and class i + 1
        groups = [[name] for name in names]
        for b in sorted(_MERGE_ORDER[: len(names) - num_classes], reverse=True):
            groups[b] += groups.pop(b + 1)
        return ["+".join(g) for g in groups]
    split = _SPLIT_ORDER[: num_classes - len(names)]  # boundary i tops class i + 1
    out = []
    for i, name in enumerate(names):
        out += [f"{name}.1", f"{name}.2"] if i - 1 in split else [name]
    return out


def make_phantom(
    shape: tuple[int, int, int], seed: int, num_classes: int = len(LAYER_NAMES)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One phantom OCT volume: (image uint8 D x H x W, layers uint8 D x H x W, vessels uint8 D x W).

    ``layers`` holds a class per voxel (``layer_names(num_classes)``; 0 above and below the
    retina); ``vessels`` is 0 background, 1 artery, 2 vein. Deterministic for ``seed``; the
    image does not depend on ``num_classes`` (fewer classes merge neighbouring layers, more
    split the thickest ones at half thickness).
    """
    d, h, w = (int(s) for s in shape)
    layer_names(num_classes)  # checks the range
    rng = np.random.default_rng(seed)
    surfaces, _ = _surfaces(rng, d, w)
    cuts = (_label_boundaries(surfaces, num_classes) * h).astype(np.float32)
    vessels = _vessel_map(rng, d, w)
    # Vessels lie in the ganglion cell layer, a little below the ILM.
    vessel_depth = (surfaces[1] + 0.3 * (surfaces[2] - surfaces[1])) * h
    rows = (surfaces * h).astype(np.float32)  # boundary rows, (9, D, W)
    depth = np.arange(h, dtype=np.float32)[None, :, None] + 0.5
    image = np.empty((d, h, w), np.uint8)
    layers = np.empty((d, h, w), np.uint8)
    n_classes = len(LAYER_NAMES)
    slab = max(1, (1 << 22) // (h * w))  # about 4M voxels at a time
    for s0 in range(0, d, slab):
        s1 = min(d, s0 + slab)
        count = np.zeros((s1 - s0, h, w), np.uint8)  # boundaries above each voxel
        for boundary in rows[:, s0:s1]:
            count += depth >= boundary[:, None, :]
        count[count == n_classes] = 0  # below the choroid: background again
        if num_classes == n_classes:
            layers[s0:s1] = count
        else:
            cut = np.zeros_like(count)
            for boundary in cuts[:, s0:s1]:
                cut += depth >= boundary[:, None, :]
            cut[cut == num_classes] = 0
            layers[s0:s1] = cut
        signal = REFLECTIVITY[count]
        # Vessel columns: bright vessel wall, then a shadow on everything below it.
        vd, vw = np.nonzero(vessels[s0:s1])
        if vd.size:
            top = vessel_depth[s0 + vd, vw][:, None]
            column = signal[vd, :, vw]
            bottom = top + max(1.0, 0.015 * h)
            column = np.where(depth[0, :, 0] >= bottom, column * _SHADOW, column)
            inside = (depth[0, :, 0] >= top) & (depth[0, :, 0] < bottom)
            column = np.where(inside, _VESSEL_BRIGHTNESS, column)
            signal[vd, :, vw] = column
        noise = rng.standard_normal(signal.shape, dtype=np.float32)
        signal = (signal + _NOISE_FLOOR) * (1 + _SPECKLE * noise)
        np.clip(signal, 0, 255, out=signal)
        image[s0:s1] = signal.astype(np.uint8)
    return image, layers, vessels


def phantom_affine(shape: tuple[int, int, int]) -> np.ndarray:
    """The affine of a phantom volume: a 6 x 2 x 6 mm field of view over ``shape``."""
    return spacing_affine(tuple(f / n for f, n in zip(_FOV_MM, shape)))


def volume_seed(seed: int, index: int) -> int:
    """The seed of volume ``index`` of a dataset seeded with ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def write_phantom_dataset(
    out: str,
    count: int,
    preset: str = "tiny",
    seed: int = 0,
    num_classes: int = len(LAYER_NAMES),
) -> list[str]:
    """Write ``count`` phantom volumes with the ``preset``'s image shape in the dataset layout.

    ``num_classes``: layer classes of the labels (default 9, ``LAYER_NAMES``; see
    :func:`make_phantom`).

    Writes ``images/``, ``labels/layers/``, ``labels/vessels/`` and ``manifest.jsonl`` under
    ``out``; volume ``i`` has id ``phantom_{i:04d}`` and is seeded from ``(seed, i)``.
    Returns the ids.
    """
    shape = get_preset(preset).model.image_shape
    layout = DatasetLayout(out)
    affine = phantom_affine(shape)
    enface = spacing_affine((affine[0, 0], affine[2, 2], affine[1, 1]))  # D x W map: i=D, j=W
    ids, records = [], []
    for i in tqdm(range(count), desc=f"phantom {preset}", unit="vol"):
        sample_id = f"phantom_{i:04d}"
        s = volume_seed(seed, i)
        image, layers, vessels = make_phantom(shape, s, num_classes)
        write_volume(layout.image_url(sample_id), image, affine)
        write_volume(layout.label_url("layers", sample_id), layers, affine)
        write_volume(layout.label_url("vessels", sample_id), vessels, enface)
        ids.append(sample_id)
        records.append(
            {
                "id": sample_id,
                "source": "phantom",
                "seed": s,
                "shape": list(shape),
                "layer_classes": num_classes,
                "layer_names": layer_names(num_classes),
            }
        )
    layout.write_manifest(records)
    return ids
