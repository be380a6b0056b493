"""The latent cache (``jobs/encode_latents.py`` writes it, the diffusion stages read it).

Layout under the cache root::

    <id>.safetensors         float32 ``z`` (c, D', H', W'), ``z_sr`` and ``z_hr`` (c, D, H', W')
    <id>~dy<rows>.safetensors  the same volume moved down by ``rows`` image rows (a view)
    source.json              {"data": the dataset URL the latents were encoded from, ...}
    stats.json               mean and std of each of :data:`KEYS` over the cache, its
                             ``count`` and the ``nhae_hash`` of the encoders that wrote it
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save as save_safetensors

from caldm.config import Config
from caldm.data.io import list_dir, read_json, write_bytes
from caldm.errors import BundleError, DataError

LATENT_SUFFIX = ".safetensors"
STATS_FILE = "stats.json"
#: the latents of one cache entry, each with a mean and std in stats.json
KEYS = ("z", "z_sr", "z_hr")


#: a shifted view's cache id: ``<volume id>~dy<rows>`` (rows on the model's image grid)
VIEW_SEP = "~dy"


def view_shifts(cfg: Config) -> list[int]:
    """Depth offsets (image rows, 0 first) of the views of each volume in the latent cache.

    Training moves latents and labels together by whole latent pixels only
    (``data.augment.shift``); a latent pixel is many image rows (8 at the paper preset), so
    without views the labels a model sees sit at a handful of offsets and it never learns that
    a label moved by part of a latent pixel moves the anatomy by as much. Each view is the
    volume moved by ``k / (views + 1)`` of a latent pixel (k = 1..views) *before* encoding,
    its label moved with it; with the whole-pixel shifts on top they cover every offset.
    """
    views = cfg.data.augment.views
    if views <= 0 or cfg.data.augment.shift <= 0:
        return [0]
    rows_per_pixel = cfg.model.image_shape[1] / cfg.model.latent_shape[2]
    offsets = {int(round(rows_per_pixel * k / (views + 1))) for k in range(1, views + 1)}
    return [0, *sorted(offsets - {0})]


def view_id(sample_id: str, rows: int) -> str:
    """The cache id of ``sample_id`` moved down by ``rows`` image rows (itself for 0)."""
    return sample_id if rows == 0 else f"{sample_id}{VIEW_SEP}{rows}"


def parse_view(cache_id: str) -> tuple[str, int]:
    """``(volume id, rows)`` of a latent cache id (:func:`view_id`)."""
    base, sep, rows = cache_id.rpartition(VIEW_SEP)
    if not sep:
        return cache_id, 0
    try:
        return base, int(rows)
    except ValueError:
        return cache_id, 0


def latent_url(latents_root: str, sample_id: str) -> str:
    """Where the encode job caches a volume's latents."""
    return f"{latents_root.rstrip('/')}/{sample_id}{LATENT_SUFFIX}"


def cached_ids(latents_root: str, views: bool = True) -> list[str]:
    """Sorted ids of the latent cache at ``latents_root``: every entry (``<id>~dy<rows>``
    views included) or, with ``views=False``, the volumes they come from."""
    names = [n[: -len(LATENT_SUFFIX)] for n in list_dir(latents_root) if n.endswith(LATENT_SUFFIX)]
    return sorted(names if views else {parse_view(n)[0] for n in names})


def write_latents(url: str, z: Any, z_sr: Any, z_hr: Any) -> None:
    """Cache one volume's latents (numpy or torch) as float32 safetensors, atomically.

    ``z``: (c, D', H', W'); ``z_sr`` and ``z_hr``: (c, D, H', W').
    """

    def f32(x: Any) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            x = x.detach().float().cpu().numpy()
        return np.ascontiguousarray(x, dtype=np.float32)

    write_bytes(url, save_safetensors({"z": f32(z), "z_sr": f32(z_sr), "z_hr": f32(z_hr)}))


def write_latent_source(latents_root: str, data: str, **info: Any) -> None:
    """Write ``<latents_root>/source.json``: the dataset the latents were encoded from."""
    text = json.dumps({"data": data, **info}, indent=2, sort_keys=True)
    write_bytes(f"{latents_root.rstrip('/')}/source.json", text.encode("utf-8"))


def read_latent_source(latents_root: str) -> dict[str, Any]:
    """The contents of ``<latents_root>/source.json``."""
    url = f"{latents_root.rstrip('/')}/source.json"
    source = read_json(url)
    if source is None:
        raise DataError(url, "missing: rerun jobs/encode_latents.py on this cache")
    if not isinstance(source, dict) or not isinstance(source.get("data"), str):
        raise DataError(url, 'expected {"data": "<dataset URL>", ...}')
    return source


def latent_stats(latents: str) -> dict[str, Any]:
    """``<latents>/stats.json`` as written by ``jobs/encode_latents.py``."""
    url = f"{latents.rstrip('/')}/{STATS_FILE}"
    stats = read_json(url)
    if stats is None:
        raise DataError(url, "missing: rerun jobs/encode_latents.py on this cache")
    return stats


def check_nhae(latents: str, expected: str) -> None:
    """Refuse a latent cache written by other encoders than ``expected`` (:func:`nhae_hash`):
    its latents live in another latent space. Caches without the record are accepted."""
    stats = read_json(f"{latents.rstrip('/')}/{STATS_FILE}") or {}
    if stats.get("nhae_hash") not in (None, expected):
        raise BundleError(
            f"{latents}/stats.json: latents encoded by another NHAE (hash "
            f"{stats['nhae_hash'][:12]}, this bundle's is {expected[:12]}); rerun "
            "jobs/encode_latents.py with this bundle into another --out"
        )
