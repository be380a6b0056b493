"""Import OCTA-500 as it is distributed into the dataset layout (``caldm import-octa500``).

Source: one OCTA-500 subset folder such as ``OCTA_6mm`` or ``OCTA_3mm`` (any fsspec URL):

- ``OCT/<id>/<n>.bmp``: one folder of B-scans per volume; each BMP is one H x W B-scan and the
  natural sort of the file names (``2.bmp`` before ``10.bmp``) gives the slice order D. The
  volume is written voxel-exact as uint8 D x H x W (400 x 640 x 400 for the 6 mm subset).

Labels, looked up in the subset folder, in its ``GroundTruth/`` subfolder, and in the dataset
root's ``GroundTruth/`` (the folder above the subset) and its ``GroundTruth/<subset>/``:

- ``GT_Layers/<id>.mat`` -> ``labels/layers/<id>.nii.gz``. The release stores six retinal
  surfaces as heights: MATLAB variable ``Layer`` of shape (6, D, W), one row index (along H)
  per surface and A-scan. A voxel's class is the number of surfaces at or above it: 0 above
  the first surface (vitreous), 1..5 between consecutive surfaces, 6 below the last one.
  (MATLAB v7.3/HDF5 .mat files are not supported.)
- ``GT_Artery/<id>.bmp`` and ``GT_Vein/<id>.bmp`` -> ``labels/vessels/<id>.nii.gz``: the
  en-face maps (nonzero = vessel) combine into 0 background, 1 artery, 2 vein (vein wins where
  both are set). The BMP is read as rows = slices (D) and columns = W.

Not imported: the OCTA volumes (``OCTA/``), the projection maps, GT_LargeVessel,
GT_Capillary, GT_FAZ (2D and 3D), the CAVF map and the text labels (age, gender, eye,
disease). The voxel spacing in the affine assumes a 2 mm A-scan depth and a 3 or 6 mm field of
view (from the subset name; 6 mm unless it names 3 mm).

With ``split`` the dataset gets ``split.json``: a seeded 2/3 train, 1/3 test split of the
imported ids (the paper's proportions, 203 / 97 of 300; its ids are not published). Training,
encoding and generation take ``--ids DST/split.json:train`` (or ``--exclude``).

Volumes import in parallel threads (BMP decoding and gzip release the GIL) with a progress
bar; a bad volume is reported and the others still import.
"""

from __future__ import annotations

import io as _io
import re
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from caldm.data.io import list_dir, read_bytes, spacing_affine, url_exists, write_volume
from caldm.data.layout import DatasetLayout
from caldm.errors import CaldmError, DataError

_DEPTH_MM = 2.0


def natural_key(name: str) -> list[Any]:
    """Sort key that orders embedded numbers numerically: ``2.bmp`` < ``10.bmp``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _read_gray(url: str) -> np.ndarray:
    """A grayscale BMP as uint8 H x W, exactly (gray palettes and gray RGB are accepted)."""
    try:
        with Image.open(_io.BytesIO(read_bytes(url))) as img:
            img.load()
            if img.mode in ("L", "1"):
                return np.asarray(img.convert("L"))
            array = np.asarray(img.convert("RGB"))  # palette images: look up their colours
    except DataError:
        raise
    except Exception as exc:
        raise DataError(url, f"not a readable image ({exc})") from None
    if not ((array[..., 0] == array[..., 1]) & (array[..., 1] == array[..., 2])).all():
        raise DataError(url, "expected a grayscale image, got colour")
    return np.ascontiguousarray(array[..., 0])


def read_bscan_folder(url: str) -> np.ndarray:
    """The volume D x H x W (uint8) of a folder of B-scan BMPs in natural order."""
    names = sorted((n for n in list_dir(url) if n.lower().endswith(".bmp")), key=natural_key)
    if not names:
        raise DataError(url, "no .bmp B-scans in this folder")
    slices = []
    for name in names:
        bscan = _read_gray(f"{url}/{name}")
        if slices and bscan.shape != slices[0].shape:
            raise DataError(
                f"{url}/{name}", f"B-scan shape {bscan.shape} differs from {slices[0].shape}"
            )
        slices.append(bscan)
    return np.stack(slices)


def layers_from_surfaces(surfaces: np.ndarray, height: int) -> np.ndarray:
    """Class map D x H x W from surface heights (n, D, W): the count of surfaces at or above."""
    rows = np.arange(height)[None, :, None]
    out = np.zeros((surfaces.shape[1], height, surfaces.shape[2]), np.uint8)
    for surface in np.sort(surfaces, axis=0):
        out += rows >= surface[:, None, :]
    return out


def _find(src: str, folder: str, name: str) -> str | None:
    root, _, subset = src.rpartition("/")
    parents = [src, f"{src}/GroundTruth"]
    if root:
        parents += [f"{root}/GroundTruth", f"{root}/GroundTruth/{subset}"]
    for parent in parents:
        url = f"{parent}/{folder}/{name}"
        if url_exists(url):
            return url
    return None


def _read_layers(url: str, shape: tuple[int, int, int]) -> np.ndarray:
    import scipy.io

    try:
        mat = scipy.io.loadmat(_io.BytesIO(read_bytes(url)))
    except DataError:
        raise
    except Exception as exc:
        raise DataError(url, f"not a readable MATLAB file ({exc})") from None
    surfaces = mat.get("Layer")
    if surfaces is None:
        raise DataError(url, "no variable 'Layer' (surface heights) in this .mat file")
    d, h, w = shape
    if surfaces.ndim != 3 or surfaces.shape[1:] != (d, w):
        raise DataError(url, f"'Layer' has shape {surfaces.shape}, expected (n, {d}, {w})")
    return layers_from_surfaces(surfaces.astype(np.float64), h)


def _read_vessels(artery: str | None, vein: str | None, shape: tuple[int, int, int]) -> np.ndarray:
    out = np.zeros((shape[0], shape[2]), np.uint8)
    for url, value in ((artery, 1), (vein, 2)):
        if url is None:
            continue
        mask = _read_gray(url)
        if mask.shape != out.shape:
            raise DataError(url, f"en-face map shape {mask.shape} does not match D x W {out.shape}")
        out[mask > 0] = value
    return out


def _affine(src: str, shape: tuple[int, int, int]) -> np.ndarray:
    fov = 3.0 if re.search(r"3\s*(mm|m\b)", src.rstrip("/").rsplit("/", 1)[-1], re.I) else 6.0
    d, h, w = shape
    return spacing_affine((fov / d, _DEPTH_MM / h, fov / w))


def import_volume(src: str, layout: DatasetLayout, sample_id: str) -> dict[str, Any]:
    """Import one volume and its labels; returns its manifest record."""
    volume = read_bscan_folder(f"{src}/OCT/{sample_id}")
    shape = volume.shape
    affine = _affine(src, shape)
    labels = []
    layers_url = _find(src, "GT_Layers", f"{sample_id}.mat")
    layers = _read_layers(layers_url, shape) if layers_url else None
    artery = _find(src, "GT_Artery", f"{sample_id}.bmp")
    vein = _find(src, "GT_Vein", f"{sample_id}.bmp")
    vessels = _read_vessels(artery, vein, shape) if artery or vein else None
    # Labels are checked before anything is written, so a failed volume leaves no files.
    write_volume(layout.image_url(sample_id), volume, affine)
    if layers is not None:
        write_volume(layout.label_url("layers", sample_id), layers, affine)
        labels.append("layers")
    if vessels is not None:
        enface = spacing_affine((affine[0, 0], affine[2, 2], affine[1, 1]))
        write_volume(layout.label_url("vessels", sample_id), vessels, enface)
        labels.append("vessels")
    record: dict[str, Any] = {"id": sample_id, "source": "octa500", "shape": list(shape)}
    record["labels"] = labels
    if layers is not None:
        record["layer_classes"] = int(layers.max()) + 1
    return record


def import_octa500(
    src: str, dst: str, workers: int = 4, split: bool = False, split_seed: int = 0
) -> list[tuple[str, str]]:
    """Import every volume of an OCTA-500 subset folder ``src`` into the dataset at ``dst``.

    Returns the failures as ``(id, message)`` pairs (also printed to stderr at the end); the
    other volumes are all written and added to ``manifest.jsonl``. With ``split``, writes
    ``<dst>/split.json`` over every volume of ``dst`` (module docstring).
    """
    src = src.rstrip("/")
    oct_dir = f"{src}/OCT"
    ids = sorted((n for n in list_dir(oct_dir) if not n.startswith(".")), key=natural_key)
    if not ids:
        raise DataError(oct_dir, "no volume folders (expected OCT/<id>/<n>.bmp)")
    layout = DatasetLayout(dst)
    records: dict[str, dict[str, Any]] = {}
    failures: list[tuple[str, str]] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(import_volume, src, layout, i): i for i in ids}
        for future in tqdm(as_completed(futures), total=len(ids), desc="octa500", unit="vol"):
            sample_id = futures[future]
            try:
                records[sample_id] = future.result()
            except CaldmError as exc:
                failures.append((sample_id, str(exc)))
    # Keep records of volumes imported earlier (another subset into the same dataset).
    kept = [r for r in layout.read_manifest() if r.get("id") not in records]
    layout.write_manifest(kept + [records[i] for i in ids if i in records])
    failures.sort(key=lambda f: natural_key(f[0]))
    print(f"imported {len(records)} of {len(ids)} volumes into {dst}", file=sys.stderr)
    if split and records:
        layout = DatasetLayout(dst)  # a fresh listing: the volumes just written
        parts = layout.write_split(layout.ids(), seed=split_seed)
        print(f"split: {len(parts['train'])} train, {len(parts['test'])} test -> "
              f"{layout.split_url}", file=sys.stderr)  # fmt: skip
    for sample_id, message in failures:
        print(f"failed: {sample_id}: {message}", file=sys.stderr)
    return failures
