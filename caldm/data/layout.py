"""The dataset layout: where a sample's image and labels live under a root URL.

```
<root>/images/<id>.nii.gz             float or uint8 volume, D x H x W
<root>/labels/layers/<id>.nii.gz      optional: uint8 layer class per voxel, same shape
<root>/labels/vessels/<id>.nii.gz     optional: uint8 en-face artery/vein map, D x W
<root>/manifest.jsonl                 optional: one JSON object per sample
```
A sample's id is its file stem; ``.nii`` and ``.nii.gz`` are both accepted. Listing is one
request per folder (no downloads), done once per :class:`DatasetLayout` and cached.
"""

from __future__ import annotations

import json
from typing import Any

from caldm.data.io import LabelKind, list_dir, nifti_stem, read_bytes, url_exists, write_bytes
from caldm.errors import DataError

LABEL_KINDS: tuple[LabelKind, ...] = ("layers", "vessels")


class DatasetLayout:
    """Paths of one dataset. ``root`` is a local path or fsspec URL."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/") or "/"
        self._listings: dict[str, dict[str, str]] = {}

    def _dir(self, sub: str) -> str:
        return f"{self.root}/{sub}"

    def _listing(self, sub: str) -> dict[str, str]:
        """id -> file name for the NIfTI files in ``sub`` (listed once)."""
        if sub not in self._listings:
            found: dict[str, str] = {}
            for name in list_dir(self._dir(sub)):
                stem = nifti_stem(name)
                if stem is None:
                    continue
                if stem in found:
                    raise DataError(
                        self._dir(sub), f"two files for id {stem!r}: {found[stem]} and {name}"
                    )
                found[stem] = name
            self._listings[sub] = found
        return self._listings[sub]

    def _url(self, sub: str, sample_id: str) -> str:
        name = self._listing(sub).get(sample_id, f"{sample_id}.nii.gz")
        return f"{self._dir(sub)}/{name}"

    def image_url(self, sample_id: str) -> str:
        """URL of a sample's image (the existing file, else ``<id>.nii.gz`` for writing)."""
        return self._url("images", sample_id)

    def label_url(self, kind: LabelKind, sample_id: str) -> str:
        """URL of a sample's ``layers`` or ``vessels`` label (existing file or the default)."""
        if kind not in LABEL_KINDS:
            raise DataError(self.root, f"unknown label kind {kind!r}; expected layers or vessels")
        return self._url(f"labels/{kind}", sample_id)

    def ids(self) -> list[str]:
        """Sorted sample ids of ``images/``; DataError naming the root when there are none."""
        ids = sorted(self._listing("images"))
        if not ids:
            raise DataError(self.root, "empty dataset: no images/<id>.nii(.gz) files")
        return ids

    def label_ids(self, kind: LabelKind) -> list[str]:
        """Sorted ids that have a label of ``kind`` (possibly none)."""
        if kind not in LABEL_KINDS:
            raise DataError(self.root, f"unknown label kind {kind!r}; expected layers or vessels")
        return sorted(self._listing(f"labels/{kind}"))

    @property
    def manifest_url(self) -> str:
        return f"{self.root}/manifest.jsonl"

    def read_manifest(self) -> list[dict[str, Any]]:
        """The manifest's records, or [] when the dataset has none."""
        url = self.manifest_url
        if not url_exists(url):
            return []
        records = []
        for n, line in enumerate(read_bytes(url).decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(url, f"line {n}: not JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise DataError(url, f"line {n}: expected a JSON object")
            records.append(record)
        return records

    def write_manifest(self, records: list[dict[str, Any]]) -> None:
        """Replace the manifest with ``records`` (atomic)."""
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
        write_bytes(self.manifest_url, text.encode("utf-8"))

    @property
    def split_url(self) -> str:
        return f"{self.root}/split.json"

    def write_split(
        self, ids: list[str], test_fraction: float = 1 / 3, seed: int = 0
    ) -> dict[str, Any]:
        """Write ``split.json``: a seeded train/test split of ``ids`` (the paper's 2/3 : 1/3;
        its own ids are not published). Returns it."""
        if not 0 < test_fraction < 1:
            raise DataError(self.split_url, f"test fraction {test_fraction} is not in (0, 1)")
        import numpy as np

        ordered = sorted(ids)
        perm = np.random.default_rng(seed).permutation(len(ordered))
        n_test = int(round(len(ordered) * test_fraction))
        test = sorted(ordered[i] for i in perm[:n_test])
        split = {
            "train": [i for i in ordered if i not in set(test)],
            "test": test,
            "seed": seed,
            "test_fraction": test_fraction,
            "source": "seeded (the paper's split ids are not published)",
        }
        write_bytes(self.split_url, json.dumps(split, indent=1).encode("utf-8"))
        return split


def parse_ids(spec: str | None) -> list[str] | None:
    """Volume ids from a command line: ``a,b,c``, or a split file ``URL/split.json:train``
    (``:test``; a plain ``.json`` URL holds a JSON list). None for None."""
    if spec is None:
        return None
    path, _, key = spec.rpartition(":") if spec.endswith((":train", ":test")) else (spec, "", "")
    if not path.endswith(".json"):
        return [s for s in (p.strip() for p in spec.split(",")) if s]
    try:
        data = json.loads(read_bytes(path))
    except json.JSONDecodeError as exc:
        raise DataError(path, f"not JSON ({exc.msg})") from None
    ids = data.get(key) if key and isinstance(data, dict) else data
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise DataError(path, f"expected a list of ids{f' under {key!r}' if key else ''}")
    return ids


def select_ids(
    ids: list[str], keep: list[str] | None = None, exclude: list[str] | None = None, what: str = ""
) -> list[str]:
    """``ids`` narrowed to ``keep`` (all of which must exist) minus ``exclude``."""
    if keep is not None:
        missing = sorted(set(keep) - set(ids))
        if missing:
            raise DataError(what or "--ids", f"{missing[0]} is not among the {len(ids)} volumes "
                                              f"({len(missing)} missing in all)")  # fmt: skip
        ids = [i for i in ids if i in set(keep)]
    drop = set(exclude or ())
    return [i for i in ids if i not in drop]
