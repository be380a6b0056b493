"""Stage datasets: infinite, sharded torch ``IterableDataset`` streams over fsspec.

One volume (or latent file) is read at a time, so no dataset is ever loaded into memory.
Each epoch every rank draws the same permutation of the ids from ``(seed, epoch)`` and takes
every ``world_size``-th id from ``rank`` on, so ranks read disjoint volumes and together cover
all of them; DataLoader workers split a rank's share the same way. A visit to a volume yields
``cfg.data.slices_per_volume`` items (random slices, windows or pairs), or one for the
thumbnail and diff3d streams.

Volumes are normalised with :func:`~caldm.data.preprocess.to_unit_range` and resized
(trilinear) to ``cfg.model.image_shape`` when their shape differs. A volume that cannot be
read is logged and skipped when ``cfg.data.skip_bad_volumes`` (and not retried in later
epochs); otherwise its DataError propagates.

| dataset | stage | item (float32 unless noted) |
|---|---|---|
| BScanDataset | ae2d | image (1, H, W) |
| ThumbnailSliceDataset | nhae | thumbnail (1, Dt, Ht, Wt), slices (S, 1, H, W), index (S,) long |
| SliceWindowDataset | adaptor | window (n, 1, H, W): n consecutive slices, edges replicated |
| LatentDataset diff3d | diff3d | z (c, D', H', W') [+ label: class fractions (C, 2D', 2H', 2W')] |
| LatentDataset refiner | refiner | z_sr, z_hr (c, H', W') of one slice i [+ label (C, 2H', 2W')] |
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
from safetensors.numpy import load as load_safetensors
from torch.utils.data import IterableDataset, get_worker_info

from caldm.config import Config
from caldm.data.io import read_bytes, read_label
from caldm.data.labels import check_label, encoder_grid, reduce_label, shift_depth
from caldm.data.latents import cached_ids, latent_url, parse_view, read_latent_source
from caldm.data.layout import DatasetLayout
from caldm.data.preprocess import read_model_volume, thumbnail
from caldm.errors import DataError

log = logging.getLogger(__name__)

Item = dict[str, torch.Tensor]


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


class _ShardedStream(IterableDataset):
    """Infinite per-epoch-shuffled iteration over ``ids``, sharded by rank and loader worker.

    Subclasses implement ``_load(id)`` (may raise DataError) and ``_items(sample, rng)``.
    """

    def __init__(
        self, root: str, ids: list[str], cfg: Config, rank: int, world_size: int, seed: int
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        if len(ids) < world_size:
            raise DataError(root, f"{len(ids)} volumes cannot be sharded over {world_size} ranks")
        self.root = root
        self.ids = ids
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.seed = seed

    def shard_ids(self, epoch: int) -> list[str]:
        """The ids this rank reads in ``epoch``, in reading order."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.ids))
        return [self.ids[i] for i in perm[self.rank :: self.world_size]]

    def _load(self, sample_id: str) -> Any:
        raise NotImplementedError

    def _items(self, sample: Any, rng: np.random.Generator) -> Iterator[Item]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Item]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        bad: set[str] = set()
        epoch = 0
        while True:
            ids = [i for i in self.shard_ids(epoch)[worker::workers] if i not in bad]
            if not ids:
                if bad:
                    raise DataError(self.root, f"every volume of this shard is bad ({len(bad)})")
                return  # more loader workers than volumes: this worker has nothing to read
            rng = np.random.default_rng([self.seed, epoch, self.rank, worker])
            for sample_id in ids:
                try:
                    sample = self._load(sample_id)
                except DataError as exc:
                    if not self.cfg.data.skip_bad_volumes:
                        raise
                    log.warning("skipping bad volume %s: %s", sample_id, exc)
                    bad.add(sample_id)
                    continue
                yield from self._items(sample, rng)
            epoch += 1


class _VolumeStream(_ShardedStream):
    """Streams image volumes of a dataset, normalised and resized to the preset's shape."""

    def __init__(
        self, root: str, cfg: Config, rank: int = 0, world_size: int = 1, seed: int = 0
    ) -> None:
        self.layout = DatasetLayout(root)
        super().__init__(root, self.layout.ids(), cfg, rank, world_size, seed)

    def _load(self, sample_id: str) -> np.ndarray:
        return read_model_volume(self.layout.image_url(sample_id), self.cfg.model.image_shape)

    def _moved(self, volume: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The volume moved along depth by up to ``data.augment.ae_shift`` of it (edges
        replicated): an autoencoder that only ever saw the retina at the device's usual depth
        decodes it there whatever its latent says, and then no label can move it."""
        most = int(round(self.cfg.data.augment.ae_shift * volume.shape[1]))
        rows = int(rng.integers(-most, most + 1)) if most else 0
        return shift_depth(volume, rows, axis=1) if rows else volume

    def _slice_indices(self, rng: np.random.Generator, depth: int) -> np.ndarray:
        n = self.cfg.data.slices_per_volume
        return rng.choice(depth, size=n, replace=n > depth)


class BScanDataset(_VolumeStream):
    """ae2d: random B-scans, ``{"image": (1, H, W)}``."""

    def _items(self, volume: np.ndarray, rng: np.random.Generator) -> Iterator[Item]:
        volume = self._moved(volume, rng)
        for i in self._slice_indices(rng, volume.shape[0]):
            yield {"image": _tensor(volume[i][None])}


class ThumbnailSliceDataset(_VolumeStream):
    """nhae: the thumbnail with S random full-resolution slices and their indices."""

    def _items(self, volume: np.ndarray, rng: np.random.Generator) -> Iterator[Item]:
        volume = self._moved(volume, rng)
        index = np.sort(self._slice_indices(rng, volume.shape[0]))
        yield {
            "thumbnail": _tensor(thumbnail(volume, self.cfg.model.thumbnail_shape)[None]),
            "slices": _tensor(volume[index][:, None]),
            "index": _tensor(index.astype(np.int64)),
        }


class SliceWindowDataset(_VolumeStream):
    """adaptor: a decode chunk and its halo (``Config.adaptor_window``: n = decode_chunk +
    2 (k // 2) consecutive slices) around a random slice, ``{"window": (n, 1, H, W)}``; beyond
    the volume the end slices repeat, as decoding does."""

    def _items(self, volume: np.ndarray, rng: np.random.Generator) -> Iterator[Item]:
        volume = self._moved(volume, rng)
        n, _ = self.cfg.adaptor_window()
        offsets = np.arange(n) - n // 2
        for centre in self._slice_indices(rng, volume.shape[0]):
            index = np.clip(centre + offsets, 0, volume.shape[0] - 1)  # replicate the edges
            yield {"window": _tensor(volume[index][:, None])}


def volume_label(
    layout: DatasetLayout, cfg: Config, condition: Literal["layers", "vessels"], volume_id: str
) -> np.ndarray:
    """A volume's label, read and checked against ``cfg.model.condition.layer_classes``."""
    url = layout.label_url(condition, volume_id)
    classes = cfg.model.condition.layer_classes
    return check_label(read_label(url, condition), condition, url, classes)


def latent_label(
    layout: DatasetLayout,
    cfg: Config,
    condition: Literal["layers", "vessels"],
    kind: Literal["diff3d", "refiner"],
    sample_id: str,
    label: np.ndarray | None = None,
) -> np.ndarray:
    """The class fractions a conditioned ``kind`` reads beside cached latents ``sample_id``.

    The volume's label (:func:`volume_label`, or ``label`` when the caller has read it already),
    moved with a shifted view's volume (``<id>@<rows>``), reduced to :func:`encoder_grid`.
    """
    volume_id, rows = parse_view(sample_id)
    classes = cfg.model.condition.layer_classes
    if label is None:
        label = volume_label(layout, cfg, condition, volume_id)
    if rows and condition == "layers":  # the view's volume was moved down by rows
        rows = int(round(rows * label.shape[1] / cfg.model.image_shape[1]))
        label = shift_depth(label, rows, axis=1)
    return reduce_label(label, condition, encoder_grid(cfg, condition, kind), classes)


def augment_latents(
    item: dict[str, np.ndarray],
    cfg: Config,
    condition: str | None,
    kind: str,
    rng: np.random.Generator,
) -> Item:
    """Move latents and label together (``cfg.data.augment``), then make float tensors.

    Latents are ``(c, [D,] H', W')``, the label ``(C, [D,] 2H', 2W')`` (vessels: no H); a
    shift of s latent rows moves the label by the same depth. Edges are replicated (the rows
    entering are vitreous or sclera, like the rows they copy). Items without a label pass.
    """
    aug = cfg.data.augment
    if "label" in item:
        latent_h = item["z" if "z" in item else "z_hr"].shape[-2]
        most = int(round(aug.shift * latent_h))
        s = int(rng.integers(-most, most + 1)) if most else 0
        flip_w = aug.flip_w and rng.random() < 0.5
        flip_d = aug.flip_d and kind == "diff3d" and rng.random() < 0.5
        layers = condition == "layers"
        for key, array in item.items():
            is_label = key == "label"
            if s and (layers or not is_label):
                factor = array.shape[-2] // latent_h if is_label else 1
                array = shift_depth(array, s * factor, axis=-2)
            if flip_w:
                array = array[..., ::-1]
            if flip_d:
                array = array[:, ::-1]
            item[key] = array
    return {k: _tensor(v.astype(np.float32, copy=False)) for k, v in item.items()}


class LatentDataset(_ShardedStream):
    """diff3d / refiner: cached latents, optionally with a layer or vessel label.

    Latents are ``<latents_root>/<id>.safetensors`` holding ``z``, ``z_sr`` and ``z_hr``.
    Labels come from ``data_root`` (default: ``"data"`` in ``<latents_root>/source.json``), are
    checked against ``cfg.model.condition.layer_classes`` and reduced from their own resolution
    to the class fractions the condition encoder reads (:mod:`caldm.data.labels`): layers
    ``(C, 2D', 2H', 2W')`` for diff3d and ``(C, 2H', 2W')`` of slice i for the refiner; vessels
    without the H' axis.
    """

    def __init__(
        self,
        latents_root: str,
        cfg: Config,
        kind: Literal["diff3d", "refiner"],
        condition: Literal["layers", "vessels"] | None = None,
        data_root: str | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        if kind not in ("diff3d", "refiner"):
            raise ValueError(f"unknown latent dataset kind {kind!r}")
        if condition not in (None, "layers", "vessels"):
            raise ValueError(f"unknown condition {condition!r}")
        latents_root = latents_root.rstrip("/")
        ids = cached_ids(latents_root)
        if not ids:
            raise DataError(
                latents_root, "no latent cache (<id>.safetensors); run jobs/encode_latents.py"
            )
        self.kind = kind
        self.condition = condition
        self.layout: DatasetLayout | None = None
        if condition is not None:
            self.layout = DatasetLayout(data_root or read_latent_source(latents_root)["data"])
            have = set(self.layout.label_ids(condition))
            missing = [parse_view(i)[0] for i in ids if parse_view(i)[0] not in have]
            if missing:
                url = self.layout.label_url(condition, missing[0])
                raise DataError(url, f"missing {condition} label ({len(missing)} missing in all)")
        super().__init__(latents_root, ids, cfg, rank, world_size, seed)

    def _load(self, sample_id: str) -> dict[str, np.ndarray]:
        url = latent_url(self.root, sample_id)
        try:
            tensors = load_safetensors(read_bytes(url))
        except DataError:
            raise
        except Exception as exc:
            raise DataError(url, f"not a readable safetensors file ({exc})") from None
        model = self.cfg.model
        want = {"z": model.latent_shape, "z_sr": model.z_sr_shape, "z_hr": model.z_sr_shape}
        for key, shape in want.items():
            if key not in tensors:
                raise DataError(url, f"no tensor {key!r}")
            if tuple(tensors[key].shape) != tuple(shape):
                raise DataError(url, f"{key} has shape {tensors[key].shape}, expected {shape}")
            if not np.isfinite(tensors[key]).all():
                raise DataError(url, f"{key} contains NaN or Inf values")
        if self.condition is not None and self.layout is not None:
            tensors["label"] = latent_label(
                self.layout, self.cfg, self.condition, self.kind, sample_id
            )
        return tensors

    def _augment(self, item: dict[str, np.ndarray], rng: np.random.Generator) -> Item:
        return augment_latents(item, self.cfg, self.condition, self.kind, rng)

    def _items(self, sample: dict[str, np.ndarray], rng: np.random.Generator) -> Iterator[Item]:
        keep = ("label",) if "label" in sample else ()
        if self.kind == "diff3d":
            yield self._augment({k: sample[k] for k in ("z", *keep)}, rng)
            return
        depth = sample["z_sr"].shape[1]
        n = self.cfg.data.slices_per_volume
        for i in rng.choice(depth, size=n, replace=n > depth):
            yield self._augment({k: sample[k][:, i] for k in ("z_sr", "z_hr", *keep)}, rng)


def num_layer_classes(root: str, max_files: int = 3) -> int:
    """Layer classes of a dataset: from its manifest, else max label + 1 over a few files."""
    layout = DatasetLayout(root)
    counts = [r["layer_classes"] for r in layout.read_manifest() if "layer_classes" in r]
    if counts:
        return int(max(counts))
    ids = layout.label_ids("layers")
    if not ids:
        raise DataError(root, "no layer labels (labels/layers/) to count the classes from")
    labels = (read_label(layout.label_url("layers", i), "layers") for i in ids[:max_files])
    return max(int(label.max()) for label in labels) + 1
