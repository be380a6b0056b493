"""The sharded training corpus: what each stage consumes, pre-resized and compact, in Parquet.

The old input path (:mod:`caldm.data.datasets`) reads a whole gzipped volume, normalises and
resizes it to ``image_shape`` for every item; at the paper preset that is seconds of one CPU
core per B-scan, and ~68 MiB of fp32 latents per refiner slice pair. The corpus does that work
once (``jobs/prepare_corpus.py``, a Ray Data job) and stores each stage's items as they are fed:

| stage | columns (bytes; shape from ``corpus.json``) | rows per volume |
|---|---|---|
| ae2d | ``image`` uint8 (H, W) | every slice |
| nhae | ``thumbnail`` u8 (Dt, Ht, Wt), ``slices`` u8 (S, H, W), ``index`` int64 (S,) | draws |
| adaptor | ``window`` uint8 (n, H, W): ``Config.adaptor_window`` slices | draws |
| diff3d | ``z`` bf16 (c, D', H', W') | 1 |
| refiner | ``z_sr``, ``z_hr`` bf16 (c, H', W') of one slice | every slice |
| diff3d+layers | ``z``, ``label`` u8 class fractions (C, 2D', 2H', 2W') | 1 |
| refiner+layers | ``z_sr``, ``z_hr``, ``label`` u8 (C, 2H', 2W') of one slice | every slice |

(``+vessels`` likewise, without the H axis in the label.) A conditioned fine-tune reads its
``<stage>+<condition>`` items: the label already reduced to what the condition encoder reads
(:func:`caldm.data.datasets.latent_label`, 1/255 steps), instead of a full-resolution label per
item; the shifted views of the latent cache (``<id>@<rows>``) are rows of their volume's shard.

Images are the training range [-1, 1] quantised to uint8 (``round((x + 1) * 127.5)``; the
sources are 8-bit OCT, so the step is below their own resolution); latents are bfloat16, the
precision the paper preset trains in. Every column is raw bytes with its dtype and shape in
``corpus.json``: any Parquet reader reads it, no Ray extension types.

Layout::

    corpus.json            stages, their columns, rows and shard files; the sources
    stats.json             the latent cache's stats (the diffusion stages scale by them)
    <stage>/<id>.parquet   one shard per volume (row groups of ROW_GROUP rows)

One shard per volume makes the job resumable (a shard that exists is skipped) and lets ranks
and loader workers split shards. :class:`CorpusDataset` reads them: it shards the files by
rank and loader worker, interleaves row groups of several open shards into a shuffle buffer,
and keeps a local copy of remote shards (``cache_dir``) so later epochs read local disk.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from caldm.config import Config
from caldm.data.io import read_bytes, read_json, split_url, url_exists, write_bytes
from caldm.data.labels import shift_depth
from caldm.errors import ConfigError, DataError

log = logging.getLogger(__name__)

MANIFEST = "corpus.json"
ROW_GROUP = 64  # rows per Parquet row group: the unit read into the shuffle buffer
IMAGE_STAGES = ("ae2d", "nhae", "adaptor")
LATENT_STAGES = ("diff3d", "refiner")
DTYPES = {"uint8": torch.uint8, "int64": torch.int64, "bfloat16": torch.bfloat16}

Item = dict[str, torch.Tensor]


def is_corpus(url: str) -> bool:
    """Whether ``url`` is a corpus root (has ``corpus.json``)."""
    return url_exists(f"{url.rstrip('/')}/{MANIFEST}")


# ----------------------------------------------------------------------------- encoding


def quantize(x: np.ndarray) -> np.ndarray:
    """[-1, 1] float -> uint8 (the corpus's image encoding)."""
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def dequantize(q: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [-1, 1]."""
    return q.float().mul_(1.0 / 127.5).sub_(1.0)


def bf16_bytes(x: np.ndarray | torch.Tensor) -> bytes:
    t = torch.as_tensor(np.ascontiguousarray(x)).to(torch.bfloat16).contiguous()
    return t.view(torch.int16).numpy().tobytes()


def split_stage(stage: str) -> tuple[str, str | None]:
    """``"diff3d+layers"`` -> ``("diff3d", "layers")``; ``"ae2d"`` -> ``("ae2d", None)``."""
    base, _, condition = stage.partition("+")
    return base, condition or None


def stage_key(stage: str, condition: str | None) -> str:
    """The corpus stage a (possibly conditioned) training stage reads."""
    return f"{stage}+{condition}" if condition else stage


def columns(stage: str, cfg: Config) -> dict[str, dict[str, Any]]:
    """The columns of ``stage`` (dtype and item shape) at ``cfg``'s shapes."""
    from caldm.data.labels import encoder_grid, num_label_classes

    stage, condition = split_stage(stage)
    m = cfg.model
    d, h, w = m.image_shape
    s = cfg.data.slices_per_volume
    c = m.latent_shape[0]
    cols = {
        "ae2d": {"image": ("uint8", (h, w))},
        "nhae": {
            "thumbnail": ("uint8", tuple(m.thumbnail_shape)),
            "slices": ("uint8", (s, h, w)),
            "index": ("int64", (s,)),
        },
        "adaptor": {"window": ("uint8", (cfg.adaptor_window()[0], h, w))},
        "diff3d": {"z": ("bfloat16", tuple(m.latent_shape))},
        "refiner": {
            "z_sr": ("bfloat16", (c, *m.z_sr_shape[2:])),
            "z_hr": ("bfloat16", (c, *m.z_sr_shape[2:])),
        },
    }[stage]
    if condition is not None:
        grid = encoder_grid(cfg, condition, stage)
        classes = num_label_classes(condition, m.condition.layer_classes)
        cols["label"] = ("uint8", (classes, *(grid if stage == "diff3d" else grid[1:])))
    return {k: {"dtype": dt, "shape": list(shape)} for k, (dt, shape) in cols.items()}


def image_rows(
    stage: str, volume: np.ndarray, cfg: Config, draws: int, rng: np.random.Generator
) -> dict[str, list[bytes]]:
    """The rows of one normalised, resized volume for an image stage (column -> bytes)."""
    from caldm.data.preprocess import thumbnail

    q = quantize(volume)
    depth = q.shape[0]
    if stage == "ae2d":
        return {"image": [q[i].tobytes() for i in range(depth)]}
    if stage == "nhae":
        thumb = quantize(thumbnail(volume, cfg.model.thumbnail_shape)).tobytes()
        n = cfg.data.slices_per_volume
        rows: dict[str, list[bytes]] = {"thumbnail": [], "slices": [], "index": []}
        for _ in range(draws):
            index = np.sort(rng.choice(depth, size=n, replace=n > depth))
            rows["thumbnail"].append(thumb)
            rows["slices"].append(np.ascontiguousarray(q[index]).tobytes())
            rows["index"].append(index.astype(np.int64).tobytes())
        return rows
    if stage == "adaptor":
        n, _ = cfg.adaptor_window()  # a decode chunk and its halo, as SliceWindowDataset
        offsets = np.arange(n) - n // 2
        centres = rng.choice(depth, size=draws, replace=draws > depth)
        return {
            "window": [
                np.ascontiguousarray(q[np.clip(c + offsets, 0, depth - 1)]).tobytes()
                for c in centres
            ]
        }
    raise ValueError(f"{stage} is not an image stage")


def latent_rows(
    stage: str, latents: dict[str, np.ndarray], label: np.ndarray | None = None
) -> dict[str, list[bytes]]:
    """The rows of one volume's (or view's) cached latents for a diffusion stage; with
    ``label`` (the class fractions of :func:`~caldm.data.datasets.latent_label`) also a
    ``label`` column, fractions in 1/255 steps."""
    labels = None if label is None else np.round(np.asarray(label) * 255).astype(np.uint8)
    if stage == "diff3d":
        rows = {"z": [bf16_bytes(latents["z"])]}
        if labels is not None:
            rows["label"] = [labels.tobytes()]
        return rows
    if stage == "refiner":
        z_sr = torch.as_tensor(latents["z_sr"]).to(torch.bfloat16)
        z_hr = torch.as_tensor(latents["z_hr"]).to(torch.bfloat16)
        depth = z_sr.shape[1]
        rows = {
            "z_sr": [z_sr[:, i].contiguous().view(torch.int16).numpy().tobytes()
                     for i in range(depth)],
            "z_hr": [z_hr[:, i].contiguous().view(torch.int16).numpy().tobytes()
                     for i in range(depth)],
        }  # fmt: skip
        if labels is not None:  # slice i's label is row i of the refiner's grid
            rows["label"] = [np.ascontiguousarray(labels[:, i]).tobytes() for i in range(depth)]
        return rows
    raise ValueError(f"{stage} is not a latent stage")


def shard_url(root: str, stage: str, sample_id: str) -> str:
    """``<root>/<stage>/<id>.parquet``; a labelled stage's folder is ``diff3d-layers`` (no ``+``
    in object keys: some S3 clients read it as a space)."""
    return f"{root.rstrip('/')}/{stage.replace('+', '-')}/{sample_id}.parquet"


def write_shard(url: str, sample_id: str, rows: dict[str, list[bytes]]) -> int:
    """Write one volume's rows as a Parquet shard (atomically); returns the row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(next(iter(rows.values())))
    table = pa.table(
        {"id": pa.array([sample_id] * n), **{k: pa.array(v, pa.binary()) for k, v in rows.items()}}
    )
    buf = io.BytesIO()
    # uncompressed: image bytes barely compress, and decompression is what we moved off the
    # training CPUs (measured in benchmarks/input_throughput.py)
    pq.write_table(table, buf, row_group_size=ROW_GROUP, compression="none")
    write_bytes(url, buf.getvalue())
    return n


def read_manifest(root: str) -> dict[str, Any]:
    """The corpus manifest (``manifest.json``), checked: DataError naming it when missing or
    not a manifest."""
    url = f"{root.rstrip('/')}/{MANIFEST}"
    manifest = read_json(url)
    if manifest is None:
        raise DataError(url, "missing: write the corpus with jobs/prepare_corpus.py")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("stages"), dict):
        raise DataError(url, 'expected {"stages": {...}, ...}')
    return manifest


def check_shapes(root: str, cfg: Config, stages: tuple[str, ...]) -> dict[str, Any]:
    """The manifest at ``root`` (empty if none); DataError if it holds one of ``stages`` at
    other shapes than ``cfg``'s (a corpus is written for one preset)."""
    url = f"{root.rstrip('/')}/{MANIFEST}"
    manifest = read_manifest(root) if url_exists(url) else {"stages": {}}
    for stage in stages:
        have = manifest["stages"].get(stage)
        if have and have.get("columns") != columns(stage, cfg):
            raise DataError(url, f"{stage} items were written for other shapes; use a new --out")
    return manifest


def update_manifest(
    root: str,
    cfg: Config,
    stages: tuple[str, ...],
    ids: list[str],
    draws: dict[str, int],
    **sources: Any,
) -> dict[str, Any]:
    """Add ``ids`` of ``stages`` (at ``cfg``'s shapes) to ``<root>/corpus.json``; returns it."""
    url = f"{root.rstrip('/')}/{MANIFEST}"
    manifest = check_shapes(root, cfg, stages)
    for stage in stages:
        have = manifest["stages"].get(stage, {})
        manifest["stages"][stage] = {
            "columns": columns(stage, cfg),
            "ids": sorted(set(have.get("ids", [])) | set(ids)),
            **({"draws": draws[stage]} if stage in draws else {}),
        }
    manifest.update(image_shape=list(cfg.model.image_shape), **sources)
    write_bytes(url, json.dumps(manifest, indent=1).encode())
    return manifest


# ----------------------------------------------------------------------------- reading


class CorpusDataset(IterableDataset):
    """The infinite, shuffled stream of one stage's corpus items, sharded by rank.

    Each epoch every rank draws the same permutation of the shard files from ``(seed, epoch)``
    and takes every ``world_size``-th from ``rank`` on; loader workers split a rank's share the
    same way. ``open_shards`` shards are read at once, their row groups interleaved into a
    buffer of ``shuffle_buffer`` items from which items are drawn at random. ``ids`` (the
    volumes) may be narrowed, e.g. to hold some out: rows of other volumes are skipped.
    Items are the same dicts, dtypes and shapes as the old stage datasets'.
    """

    def __init__(
        self,
        root: str,
        stage: str,
        cfg: Config,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1024,
        open_shards: int = 4,
        cache_dir: str | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.root = root.rstrip("/")
        manifest = read_manifest(self.root)
        entry = manifest["stages"].get(stage)
        if entry is None:
            raise DataError(
                f"{self.root}/{MANIFEST}",
                f"no {stage} items (has {', '.join(manifest['stages']) or 'none'}); "
                f"rerun jobs/prepare_corpus.py --stages {stage}",
            )
        want = columns(stage, cfg)
        if entry["columns"] != want:
            raise DataError(
                f"{self.root}/{MANIFEST}",
                f"{stage} items were written for other shapes ({entry['columns']}); this "
                f"config needs {want}: rerun jobs/prepare_corpus.py with this preset",
            )
        self.stage = stage
        self.kind, self.condition = split_stage(stage)
        self.columns = want
        self.ids = sorted(entry["ids"])
        if len(self.ids) < world_size:
            raise DataError(self.root, f"{len(self.ids)} shards cannot be sharded over "
                                       f"{world_size} ranks")  # fmt: skip
        self.cfg = cfg
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.open_shards = max(1, open_shards)
        self.cache_dir = cache_dir or os.environ.get("CALDM_CORPUS_CACHE")

    def shard_ids(self, epoch: int) -> list[str]:
        """The volume shards this rank reads in ``epoch``, in reading order."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.ids))
        return [self.ids[i] for i in perm[self.rank :: self.world_size]]

    def _local(self, url: str) -> str:
        """A local path for ``url``: itself when local, else a cached copy (made once)."""
        from fsspec.implementations.local import LocalFileSystem

        fs, path = split_url(url)
        if isinstance(fs, LocalFileSystem):
            return path
        cache = self.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "caldm")
        key = hashlib.sha1(url.encode()).hexdigest()[:16]
        local = os.path.join(cache, "corpus", f"{key}.parquet")
        if not os.path.exists(local):
            os.makedirs(os.path.dirname(local), exist_ok=True)
            tmp = f"{local}.{os.getpid()}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(read_bytes(url))
            os.replace(tmp, local)
        return local

    def _row_groups(self, sample_id: str) -> Iterator[dict[str, list[bytes]]]:
        import pyarrow.parquet as pq

        url = shard_url(self.root, self.stage, sample_id)
        try:
            pf = pq.ParquetFile(self._local(url))
            for g in range(pf.num_row_groups):
                table = pf.read_row_group(g, columns=list(self.columns))
                yield {k: table.column(k).to_pylist() for k in self.columns}
        except DataError:
            raise
        except Exception as exc:
            raise DataError(url, f"not a readable corpus shard ({exc})") from None

    def _moved(self, item: Item, rng: np.random.Generator) -> Item:
        """``data.augment.ae_shift`` on an image item, as the volume streams apply it
        (``datasets._VolumeStream._moved``): every image of the item moved along depth by the
        same random fraction, edges replicated. The nhae thumbnail moves by whole thumbnail
        rows and its slices by the same fraction of their depth, so the two stay aligned."""
        frac = self.cfg.data.augment.ae_shift
        key = {"ae2d": "image", "nhae": "slices", "adaptor": "window"}.get(self.stage)
        if not frac or key is None:
            return item
        depth = item[key].shape[-2]
        if "thumbnail" in item:
            small = item["thumbnail"].shape[-2]
            most = int(round(frac * small))
            coarse = int(rng.integers(-most, most + 1))
            rows = int(round(coarse * depth / small))
            item["thumbnail"] = _shifted(item["thumbnail"], coarse)
        else:
            most = int(round(frac * depth))
            rows = int(rng.integers(-most, most + 1))
        item[key] = _shifted(item[key], rows)
        return item

    def _moved_latents(self, item: Item) -> Item:
        """``data.augment`` on a conditioned item (:func:`~caldm.data.datasets.augment_latents`,
        the latent cache's rule), from the dataset's own random stream."""
        from caldm.data.datasets import augment_latents

        arrays = {k: v.numpy() for k, v in item.items()}
        return augment_latents(arrays, self.cfg, self.condition, self.kind, self._augment_rng)

    def _decode(self, raw: dict[str, bytes]) -> Item:
        item: Item = {}
        for name, col in self.columns.items():
            t = torch.frombuffer(bytearray(raw[name]), dtype=DTYPES[col["dtype"]])
            t = t.view(col["shape"])
            if name == "label":
                t = t.float() / 255  # class fractions
            elif col["dtype"] == "uint8":
                t = dequantize(t)
            elif col["dtype"] == "bfloat16":
                t = t.float()
            item[name] = t
        if self.stage == "ae2d":
            item["image"] = item["image"][None]
        elif self.condition is not None:  # latents and label move together, as on the old path
            return self._moved_latents(item)
        elif self.stage == "nhae":
            item["thumbnail"] = item["thumbnail"][None]
            item["slices"] = item["slices"][:, None]
        elif self.stage == "adaptor":
            item["window"] = item["window"][:, None]
        return item

    def __iter__(self) -> Iterator[Item]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = 0
        while True:
            keep = set(self.ids)
            shards = [i for i in self.shard_ids(epoch)[worker::workers] if i in keep]
            if not shards:
                return  # more loader workers than shards: this worker has nothing to read
            rng = np.random.default_rng([self.seed, epoch, self.rank, worker])
            moves = np.random.default_rng([self.seed, epoch, self.rank, worker, 1])
            self._augment_rng = np.random.default_rng([self.seed, epoch, self.rank, worker, 2])
            buffer: list[dict[str, bytes]] = []
            streams = [self._row_groups(s) for s in shards[: self.open_shards]]
            pending = shards[self.open_shards :]
            while streams:
                for stream in list(streams):
                    group = next(stream, None)
                    if group is None:
                        streams.remove(stream)
                        if pending:
                            streams.append(self._row_groups(pending.pop(0)))
                        continue
                    names = list(group)
                    buffer.extend(dict(zip(names, row)) for row in zip(*group.values()))
                while len(buffer) >= self.shuffle_buffer:
                    yield self._moved(self._decode(_pop_random(buffer, rng)), moves)
            while buffer:
                yield self._moved(self._decode(_pop_random(buffer, rng)), moves)
            epoch += 1


def _shifted(t: torch.Tensor, rows: int) -> torch.Tensor:
    """:func:`~caldm.data.labels.shift_depth` of a tensor whose depth is its second-last axis."""
    if not rows:
        return t
    return torch.from_numpy(np.ascontiguousarray(shift_depth(t.numpy(), rows, axis=t.dim() - 2)))


def _pop_random(buffer: list[Any], rng: np.random.Generator) -> Any:
    """Remove and return a random element in O(1) (swap with the last)."""
    i = int(rng.integers(len(buffer)))
    buffer[i], buffer[-1] = buffer[-1], buffer[i]
    return buffer.pop()


def check_condition(root: str, stage: str, condition: str | None) -> None:
    """A conditioned fine-tune needs its ``<stage>+<condition>`` items: one ConfigError line
    naming the command that writes them when the corpus lacks them."""
    if condition is None:
        return
    key = stage_key(stage, condition)
    if key not in read_manifest(root)["stages"]:
        raise ConfigError(
            f"{root}: no {key} items (labelled latents); write them with jobs/prepare_corpus.py "
            f"--stages {stage} --condition {condition} --latents <latent cache>"
        )
