"""Model bundles: what training exports and what sampling loads (DESIGN.md layout).

```
<bundle>/config.yaml                 resolved config
<bundle>/<module>.safetensors        enc2d, dec2d, enc3d, f_sr, adaptors, diff3d, refiner, cond_*
<bundle>/bundle.json                 {"condition": null|"layers"|"vessels", "num_classes": n,
                                      "modules": [...], "sha256": {module: digest}}
```
Any fsspec URL works (local path, ``s3://``). Each file is written atomically by
:func:`caldm.data.io.write_bytes` (a unique temp name renamed into place locally, one upload
on S3), so a reader never sees half a module and concurrent writers never share a temp file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from caldm.config import Config, config_from_yaml, preset
from caldm.data.io import join_url, read_bytes, read_json, write_bytes
from caldm.errors import BundleError, DataError
from caldm.nn.factory import COND_MODULES, MODULES, NHAE_MODULES, build


@dataclass
class Bundle:
    """An opened bundle (:func:`open_bundle`): its config and bundle.json, read once, and the
    modules asked for, loaded on demand and kept.

    Pickled (to a Ray worker or actor) it carries its URL, config and meta data but none of
    its loaded modules: the receiver loads what it needs itself, from storage.
    """

    url: str
    cfg: Config
    meta: dict[str, Any]
    #: config.yaml as stored: its bytes are part of :attr:`hash`
    config_bytes: bytes = field(default=b"", repr=False)
    modules: dict[str, nn.Module] = field(default_factory=dict, repr=False)

    @property
    def condition(self) -> str | None:
        return self.meta.get("condition")

    @property
    def names(self) -> list[str]:
        """Names of the modules the bundle holds (from bundle.json, else by listing)."""
        if "modules" in self.meta:
            return list(self.meta["modules"])
        fs, path = fsspec.core.url_to_fs(self.url)
        return sorted(
            p.rsplit("/", 1)[-1].removesuffix(".safetensors")
            for p in fs.ls(path, detail=False)
            if p.endswith(".safetensors")
        )

    @property
    def hash(self) -> str:
        """A content hash of the bundle (over its config and its modules' digests): the
        provenance written into generated manifests."""
        h = hashlib.sha256(self.config_bytes)
        for name, digest in sorted(self.meta.get("sha256", {}).items()):
            h.update(f"{name}:{digest}".encode())
        return h.hexdigest()

    def require(self, names: list[str] | tuple[str, ...], purpose: str) -> None:
        """Raise one clear :class:`BundleError` when the bundle lacks any of ``names``."""
        have = set(self.names)
        missing = [n for n in names if n not in have]
        if missing:
            raise BundleError(
                f"{self.url}: bundle lacks {', '.join(missing)} needed for {purpose} "
                f"(it has: {', '.join(sorted(have)) or 'nothing'})"
            )

    def module(self, name: str, device: str | torch.device | None = None) -> nn.Module:
        """Module ``name`` in eval mode, loaded (on the CPU) on first use and kept; moved to
        ``device`` when one is given."""
        if name not in self.modules:
            self.modules[name] = self.fresh(name).eval()
        return self.modules[name] if device is None else self.modules[name].to(device)

    def load(
        self, names: list[str] | tuple[str, ...] | None = None, device: str | torch.device = "cpu"
    ) -> dict[str, nn.Module]:
        """:meth:`module` of each of ``names`` (default: every module the bundle holds), after
        checking that the bundle has them all."""
        names = list(names) if names is not None else self.names
        self.require(names, "loading")
        return {name: self.module(name, device) for name in names}

    def fresh(self, name: str, cfg: Config | None = None) -> nn.Module:
        """A new copy of module ``name`` built for ``cfg`` (default: the bundle's own) with
        the bundle's weights, not kept: for a trainer, which changes what it holds."""
        return load_module(self.url, name, cfg or self.cfg, self.meta)

    def __getitem__(self, name: str) -> nn.Module:
        return self.module(name)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "modules": {}}  # weights travel through storage, not pickles


def open_bundle(url: str | Bundle) -> Bundle:
    """The bundle at ``url`` with its config.yaml and bundle.json read (once; a
    :class:`Bundle` is returned as it is). BundleError when ``url`` holds no bundle."""
    if isinstance(url, Bundle):
        return url
    file = join_url(url, "config.yaml")
    try:
        text = read_bytes(file)
    except DataError as exc:
        if exc.problem == "file not found":
            raise BundleError(f"{url}: not a model bundle (no config.yaml)") from None
        raise
    return Bundle(url, config_from_yaml(text, file), read_meta(url), text)


def read_meta(url: str) -> dict[str, Any]:
    """The bundle's bundle.json (empty when it has none)."""
    return read_json(join_url(url, "bundle.json")) or {}


def load_bundle(
    url: str | Bundle,
    names: list[str] | tuple[str, ...] | None = None,
    device: str | torch.device = "cpu",
) -> Bundle:
    """The bundle with ``names`` (default: every module present) loaded onto ``device`` in
    eval mode."""
    bundle = open_bundle(url)
    bundle.load(names, device)
    return bundle


def load_module(url: str, name: str, cfg: Config, meta: dict[str, Any] | None = None) -> nn.Module:
    """Build module ``name`` for ``cfg`` and load its weights strictly."""
    meta = meta if meta is not None else read_meta(url)
    cond = meta.get("condition") if name in ("diff3d", "refiner", *COND_MODULES) else None
    if name in ("diff3d", "refiner") and name not in meta.get("conditioned", []):
        cond = None
    module = build(name, cfg, condition=cond, num_classes=meta.get("num_classes"))
    file = join_url(url, f"{name}.safetensors")
    try:
        state = st_load(read_bytes(file))
    except DataError as exc:
        if exc.problem == "file not found":
            raise BundleError(f"{file}: module {name} not in bundle") from None
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise BundleError(f"{file}: unreadable weights ({exc})") from None
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or misshaped:
        parts = [
            f"{what} {len(keys)} ({', '.join(keys[:2])}{', ...' if len(keys) > 2 else ''})"
            for what, keys in (("missing", missing), ("unexpected", unexpected),
                               ("of another shape", misshaped))
            if keys
        ]
        raise BundleError(
            f"{file}: weights do not fit {name} of preset {cfg.preset!r}: tensors "
            + "; ".join(parts)
            + " (a model key of config.yaml changed since it was written?)"
        )
    module.load_state_dict(state, strict=True)
    return module


def save_bundle(
    url: str,
    cfg: Config,
    modules: dict[str, nn.Module],
    condition: str | None = None,
    num_classes: int | None = None,
    conditioned: list[str] | None = None,
    meta_update: dict[str, Any] | None = None,
) -> None:
    """Write (or add to) a bundle. Existing modules not in ``modules`` are kept.

    ``conditioned`` names the diffusion modules whose input was widened for ``condition``;
    ``meta_update`` is merged into bundle.json (e.g. ``{"latent_scale": {"diff3d": s}}``,
    merged one level deep).
    """
    meta = read_meta(url)
    for key, value in (meta_update or {}).items():
        if isinstance(value, dict) and isinstance(meta.get(key), dict):
            meta[key].update(value)
        else:
            meta[key] = value
    for name, module in modules.items():
        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        data = st_save(state)
        write_bytes(join_url(url, f"{name}.safetensors"), data)
        meta.setdefault("sha256", {})[name] = hashlib.sha256(data).hexdigest()
    present = set(meta.get("modules", [])) | set(modules)
    meta["modules"] = sorted(present)
    if condition is not None:
        meta["condition"] = condition
        meta["num_classes"] = num_classes
    meta.setdefault("condition", None)
    if conditioned:
        meta["conditioned"] = sorted(set(meta.get("conditioned", [])) | set(conditioned))
    write_bytes(join_url(url, "config.yaml"), cfg.to_yaml().encode())
    write_bytes(join_url(url, "bundle.json"), json.dumps(meta, indent=1).encode())


def nhae_hash(url: str | Bundle) -> str:
    """A content hash of the bundle's latent encoders (:data:`NHAE_MODULES`): equal for every
    bundle of one training chain that carries the same NHAE, whatever else it holds."""
    bundle = open_bundle(url)
    digests = bundle.meta.get("sha256", {})
    missing = [n for n in NHAE_MODULES if n not in digests]
    if missing:
        raise BundleError(f"{bundle.url}: bundle.json has no digest of {', '.join(missing)}")
    return hashlib.sha256("".join(f"{n}:{digests[n]};" for n in NHAE_MODULES).encode()).hexdigest()


def init_bundle(
    preset_name: str,
    out: str,
    condition: str | None = None,
    seed: int = 0,
    cfg: Config | None = None,
) -> None:
    """A bundle of randomly initialised weights (for tests and benchmarks).

    Adaptor mixing factors are set to 0.5 so that a random DecM differs from Dec2D.
    """
    cfg = cfg or preset(preset_name)
    torch.manual_seed(seed)
    modules = {name: build(name, cfg) for name in MODULES}
    for adaptor in modules["adaptors"].adaptors.values():
        adaptor.alpha.data.fill_(0.5)
    conditioned: list[str] = []
    if condition:
        for name in ("diff3d", "refiner"):
            modules[name] = build(name, cfg, condition=condition)
            modules[f"cond_{name}"] = build(f"cond_{name}", cfg, condition=condition)
            conditioned.append(name)
    save_bundle(
        out,
        cfg,
        modules,
        condition=condition,
        num_classes=cfg.model.condition.layer_classes if condition == "layers" else None,
        conditioned=conditioned,
    )
