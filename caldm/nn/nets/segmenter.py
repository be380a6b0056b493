"""The downstream segmentation network: label fidelity (``jobs/evaluate.py``) and Table 2
(``jobs/downstream.py``) both train and apply this one model.

Two tasks, both 2D, as the labels are defined:

- ``layers``: B-scans ``volume[d]`` (H x W) -> a layer class per pixel; the class count comes
  from the data (any number, background 0 included).
- ``vessels``: the en-face mean projection over depth ``volume.mean(axis=1)`` (D x W) ->
  0 background, 1 artery, 2 vein (the vessel label's own definition).

The network is MONAI's 2D ``UNet`` (residual units, strided convolutions). Planes are z-scored
one by one (so that datasets stored as uint8, [0, 1] or [-1, 1] look alike) and resized to the
segmenter's ``plane_shape`` (bilinear images, nearest labels) for training; predictions are
made at ``plane_shape`` and their logits upsampled (bilinear) to the label's grid, so metrics
are counted in the label's own pixels.

:func:`train_segmenter` is the one training path: called as is it trains locally; inside a Ray
Train worker pass ``prepare=ray.train.torch.prepare_model`` with the worker's rank and world
size (each rank draws its own batches; DDP averages the gradients).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Task = Literal["layers", "vessels"]
TASKS: tuple[Task, ...] = ("layers", "vessels")
VESSEL_CLASSES = 3  # background, artery, vein
MAX_PLANE_SIDE = 256  # larger planes are trained and segmented at this size
_METADATA_KEY = "caldm_segmenter"


@dataclass(frozen=True)
class SegmenterConfig:
    """What a segmenter is: its task, class count and input plane size (saved with it)."""

    task: Task
    num_classes: int
    plane_shape: tuple[int, int]
    channels: tuple[int, ...] = (16, 32, 64, 128)
    num_res_units: int = 1

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown segmentation task {self.task!r}; expected layers|vessels")
        if self.num_classes < 2:
            raise ValueError(f"a segmenter needs >= 2 classes, got {self.num_classes}")
        m = self.divisor
        if any(s % m for s in self.plane_shape):
            raise ValueError(f"plane_shape {self.plane_shape} must be divisible by {m}")

    @property
    def divisor(self) -> int:
        """Plane sides must be multiples of this (one halving per level below the top)."""
        return 2 ** (len(self.channels) - 1)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SegmenterConfig:
        d = json.loads(text)
        return cls(
            task=d["task"],
            num_classes=int(d["num_classes"]),
            plane_shape=tuple(d["plane_shape"]),
            channels=tuple(d["channels"]),
            num_res_units=int(d["num_res_units"]),
        )


def plane_shape_for(volume_shape: tuple[int, int, int], task: Task, divisor: int = 8) -> tuple:
    """The segmenter input size for volumes of ``volume_shape`` (D, H, W): the task's plane
    (H x W B-scans, D x W en-face) capped at MAX_PLANE_SIDE and rounded up to ``divisor``."""
    d, h, w = volume_shape
    plane = (h, w) if task == "layers" else (d, w)
    return tuple(-(-min(s, MAX_PLANE_SIDE) // divisor) * divisor for s in plane)


def build_segmenter(cfg: SegmenterConfig) -> nn.Module:
    """A fresh MONAI 2D UNet: 1 input channel -> ``cfg.num_classes`` logits."""
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=cfg.num_classes,
        channels=cfg.channels,
        strides=(2,) * (len(cfg.channels) - 1),
        num_res_units=cfg.num_res_units,
    )


# ------------------------------------------------------------------------------ planes


def image_planes(volume: np.ndarray, task: Task) -> np.ndarray:
    """The planes the task segments, z-scored one by one: (N, h, w) float32.

    ``layers``: the D B-scans (H x W); ``vessels``: one en-face mean projection (D x W).
    """
    v = np.asarray(volume, np.float32)
    if v.ndim != 3:
        raise ValueError(f"expected a D x H x W volume, got shape {v.shape}")
    planes = v if task == "layers" else v.mean(axis=1)[None]
    mean = planes.mean(axis=(1, 2), keepdims=True)
    std = planes.std(axis=(1, 2), keepdims=True)
    return (planes - mean) / np.maximum(std, 1e-6)


def label_planes(label: np.ndarray, task: Task) -> np.ndarray:
    """The label planes matching :func:`image_planes`: (N, h, w) uint8."""
    lab = np.asarray(label)
    return lab if task == "layers" else lab[None]


def resize_images(planes: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) -> (N, 1, *shape) float, bilinear."""
    x = planes.float()[:, None]
    if tuple(x.shape[-2:]) == tuple(shape):
        return x
    return F.interpolate(x, size=tuple(shape), mode="bilinear", align_corners=False)


def resize_labels(labels: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) integer labels -> (N, 1, *shape) long, nearest."""
    y = labels.long()[:, None]
    if tuple(y.shape[-2:]) == tuple(shape):
        return y
    return F.interpolate(y.float(), size=tuple(shape), mode="nearest-exact").long()


# ---------------------------------------------------------------------------- training


def train_segmenter(
    images: np.ndarray,
    labels: np.ndarray,
    cfg: SegmenterConfig,
    steps: int,
    seed: int = 0,
    batch_size: int = 8,
    lr: float = 2e-3,
    device: torch.device | str | None = None,
    prepare: Callable[[nn.Module], nn.Module] | None = None,
    rank: int = 0,
    world_size: int = 1,
    log: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """Train a fresh segmenter for ``steps`` steps on (image, label) planes; returns it in
    eval mode (unwrapped from DDP).

    ``images``: (N, h, w) float32 from :func:`image_planes`; ``labels``: (N, h, w) integers
    below ``cfg.num_classes`` (checked). Planes are resized to ``cfg.plane_shape`` once, up
    front. Each step draws ``batch_size`` planes (per rank) with replacement from a generator
    seeded by ``(seed, rank)``, flips each left-right with probability 1/2, and takes one Adam
    step on MONAI's Dice + cross-entropy loss. The same ``seed`` gives the same weights (on one
    device). ``log(step, loss)`` is called every 50 steps and at the end.
    """
    from monai.losses import DiceCELoss

    if len(images) == 0 or len(images) != len(labels):
        raise ValueError(f"need matching, non-empty planes; got {len(images)} and {len(labels)}")
    top = int(np.max(labels))
    if top >= cfg.num_classes:
        raise ValueError(f"label class {top} >= the segmenter's {cfg.num_classes} classes")
    device = torch.device(device or "cpu")
    torch.manual_seed(seed)  # the same initial weights on every rank
    model = build_segmenter(cfg).to(device)
    trained = prepare(model) if prepare is not None else model
    x_all = resize_images(torch.from_numpy(np.asarray(images, np.float32)), cfg.plane_shape)
    y_all = resize_labels(torch.from_numpy(np.asarray(labels, np.int64)), cfg.plane_shape)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(trained.parameters(), lr=lr)
    rng = np.random.default_rng([seed, rank, world_size])
    trained.train()
    for step in range(1, steps + 1):
        idx = torch.from_numpy(rng.integers(0, len(x_all), batch_size))
        flip = torch.from_numpy(rng.random(batch_size) < 0.5)
        x, y = x_all[idx], y_all[idx]
        x = torch.where(flip[:, None, None, None], x.flip(-1), x).to(device)
        y = torch.where(flip[:, None, None, None], y.flip(-1), y).to(device)
        loss = loss_fn(trained(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log is not None and (step % 50 == 0 or step == steps):
            log(step, float(loss))
    model.eval()
    return model


@torch.no_grad()
def segment_planes(
    model: nn.Module, cfg: SegmenterConfig, planes: np.ndarray, batch_size: int = 32
) -> np.ndarray:
    """Class maps (N, h, w) uint8 of planes (N, h, w) from :func:`image_planes`, at their own
    size: logits at ``cfg.plane_shape`` are upsampled bilinearly before the argmax."""
    device = next(model.parameters()).device
    out = np.empty(planes.shape, np.uint8)
    size = tuple(planes.shape[-2:])
    for s in range(0, len(planes), batch_size):
        x = resize_images(torch.from_numpy(np.asarray(planes[s : s + batch_size])), cfg.plane_shape)
        logits = model(x.to(device)).float()
        if tuple(logits.shape[-2:]) != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        out[s : s + batch_size] = logits.argmax(1).cpu().numpy().astype(np.uint8)
    return out


def segment_volume(model: nn.Module, cfg: SegmenterConfig, volume: np.ndarray) -> np.ndarray:
    """The task's label of a D x H x W volume: layers (D, H, W), vessels (D, W); uint8."""
    pred = segment_planes(model, cfg, image_planes(volume, cfg.task))
    return pred if cfg.task == "layers" else pred[0]


# --------------------------------------------------------------------------- save/load


def segmenter_bytes(model: nn.Module, cfg: SegmenterConfig) -> bytes:
    """One safetensors file: the weights, with the config in its metadata."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return save(state, metadata={_METADATA_KEY: cfg.to_json()})


def segmenter_from_bytes(data: bytes, name: str = "segmenter") -> tuple[nn.Module, SegmenterConfig]:
    """Rebuild a segmenter from :func:`segmenter_bytes`; ValueError naming ``name`` if the
    bytes are not one."""
    from safetensors.torch import load

    try:
        # The safetensors header: 8-byte little-endian length, then JSON with __metadata__.
        n = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
        cfg = SegmenterConfig.from_json(meta[_METADATA_KEY])
        model = build_segmenter(cfg)
        model.load_state_dict(load(data))
    except Exception as exc:
        raise ValueError(f"{name}: not a caldm segmenter ({type(exc).__name__}: {exc})") from None
    model.eval()
    return model, cfg
