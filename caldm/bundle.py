"""Model bundles: what training exports and what sampling loads (DESIGN.md layout).

```
<bundle>/config.yaml                 resolved config
<bundle>/<module>.safetensors        enc2d, dec2d, enc3d, f_sr, adaptors, diff3d, refiner, cond_*
<bundle>/bundle.json                 {"condition": null|"layers"|"vessels", "num_classes": n,
                                      "modules": [...], "sha256": {module: digest}}
```
Any fsspec URL works (local path, ``s3://``). Each file is written whole in one call, so a
reader never sees half a module.
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
from caldm.errors import BundleError, ConfigError
from caldm.nn.factory import COND_MODULES, MODULES, build


def _join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def _write_bytes(url: str, data: bytes) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if "file" in fs.protocol:  # local: write aside, then rename into place
        tmp = path + ".tmp"
        with fs.open(tmp, "wb") as fh:
            fh.write(data)
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, data)


def _read_bytes(url: str) -> bytes:
    with fsspec.open(url, "rb") as fh:
        return fh.read()


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
    return sorted(
        p.rsplit("/", 1)[-1].removesuffix(".safetensors")
        for p in fs.ls(path, detail=False)
        if p.endswith(".safetensors")
    )


def read_meta(url: str) -> dict[str, Any]:
    try:
        return json.loads(_read_bytes(_join(url, "bundle.json")))
    except FileNotFoundError:
        return {}


def read_bundle_config(url: str) -> Config:
    try:
        return load_config(None, _join(url, "config.yaml"))
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
    file = _join(url, f"{name}.safetensors")
    try:
        state = st_load(_read_bytes(file))
    except FileNotFoundError:
        raise BundleError(f"{file}: module {name} not in bundle") from None
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
        _write_bytes(_join(url, f"{name}.safetensors"), data)
        meta.setdefault("sha256", {})[name] = hashlib.sha256(data).hexdigest()
    present = set(meta.get("modules", [])) | set(modules)
    meta["modules"] = sorted(present)
    if condition is not None:
        meta["condition"] = condition
        meta["num_classes"] = num_classes
    meta.setdefault("condition", None)
    if conditioned:
        meta["conditioned"] = sorted(set(meta.get("conditioned", [])) | set(conditioned))
    _write_bytes(_join(url, "config.yaml"), cfg.to_yaml().encode())
    _write_bytes(_join(url, "bundle.json"), json.dumps(meta, indent=1).encode())


def bundle_hash(url: str) -> str:
    """A content hash of a bundle (over its modules' digests and config)."""
    meta = read_meta(url)
    h = hashlib.sha256(_read_bytes(_join(url, "config.yaml")))
    for name, digest in sorted(meta.get("sha256", {}).items()):
        h.update(f"{name}:{digest}".encode())
    return h.hexdigest()


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
