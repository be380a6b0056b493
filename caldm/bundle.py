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

from caldm.config import Config, load_config, preset
from caldm.data.io import join_url, read_bytes, read_json, write_bytes
from caldm.errors import BundleError, ConfigError, DataError
from caldm.nn.factory import COND_MODULES, MODULES, build


@dataclass
class Bundle:
    """A loaded bundle: its config, meta data and the modules that were asked for."""

    url: str
    cfg: Config
    meta: dict[str, Any]
    modules: dict[str, nn.Module] = field(default_factory=dict)

    @property
    def condition(self) -> str | None:
        return self.meta.get("condition")

    def __getitem__(self, name: str) -> nn.Module:
        return self.modules[name]


def bundle_modules(url: str) -> list[str]:
    """Names of the modules a bundle holds (from bundle.json, else by listing)."""
    meta = read_meta(url)
    if "modules" in meta:
        return list(meta["modules"])
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.isdir(path):
        raise BundleError(f"{url}: not a model bundle (no config.yaml)")
    return sorted(
        p.rsplit("/", 1)[-1].removesuffix(".safetensors")
        for p in fs.ls(path, detail=False)
        if p.endswith(".safetensors")
    )


def read_meta(url: str) -> dict[str, Any]:
    return read_json(join_url(url, "bundle.json")) or {}


def read_bundle_config(url: str) -> Config:
    try:
        return load_config(None, join_url(url, "config.yaml"))
    except ConfigError as exc:
        if "not found" in str(exc):
            raise BundleError(f"{url}: not a model bundle (no config.yaml)") from None
        raise


def require(url: str, names: list[str] | tuple[str, ...], purpose: str) -> None:
    """Raise one clear :class:`BundleError` when the bundle lacks any of ``names``."""
    have = set(bundle_modules(url))
    missing = [n for n in names if n not in have]
    if missing:
        raise BundleError(
            f"{url}: bundle lacks {', '.join(missing)} needed for {purpose} "
            f"(it has: {', '.join(sorted(have)) or 'nothing'})"
        )


def load_bundle(
    url: str,
    names: list[str] | tuple[str, ...] | None = None,
    device: str | torch.device = "cpu",
    cfg: Config | None = None,
) -> Bundle:
    """Load ``names`` (default: every module present) onto ``device`` in eval mode."""
    cfg = cfg or read_bundle_config(url)
    meta = read_meta(url)
    names = list(names) if names is not None else bundle_modules(url)
    require(url, names, "loading")
    bundle = Bundle(url, cfg, meta)
    for name in names:
        bundle.modules[name] = load_module(url, name, cfg, meta).to(device).eval()
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
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise BundleError(
            f"{file}: weights do not fit {name} of preset {cfg.preset!r} ({first})"
        ) from None
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


def bundle_hash(url: str) -> str:
    """A content hash of a bundle (over its modules' digests and config)."""
    meta = read_meta(url)
    h = hashlib.sha256(read_bytes(join_url(url, "config.yaml")))
    for name, digest in sorted(meta.get("sha256", {}).items()):
        h.update(f"{name}:{digest}".encode())
    return h.hexdigest()


#: The modules that write the latent cache (Enc3D -> z, f_sr -> z_sr, Enc2D -> z_hr).
NHAE_MODULES = ("enc3d", "f_sr", "enc2d")


def nhae_hash(url: str) -> str:
    """A content hash of the bundle's latent encoders (:data:`NHAE_MODULES`): equal for every
    bundle of one training chain that carries the same NHAE, whatever else it holds."""
    digests = read_meta(url).get("sha256", {})
    missing = [n for n in NHAE_MODULES if n not in digests]
    if missing:
        raise BundleError(f"{url}: bundle.json has no digest of {', '.join(missing)}")
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
