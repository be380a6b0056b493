"""The FID Inception-v3: the network FID tools use, with the TF 2015-12-05 weights' structure.

This is the Inception-v3 variant that TensorFlow's FID reference and pytorch-fid compute
features with. It differs from the usual Inception-v3 in three places, all reproduced here:
the average pools inside the A, C and first E blocks ignore padded zeros
(``count_include_pad=False``), the last E block pools its ``branch_pool`` with a max pool, and
the classifier has 1008 outputs. Module and parameter names are chosen so that the published
``pt_inception-2015-12-05-*.pth`` state dict loads with ``load_state_dict(strict=True)``.

Features are the 2048-d output of the final global average pool ("pool3"). Inputs are
(B, 1 or 3, H, W) in [0, 1]; grayscale is repeated to 3 channels, the image is resized
bilinearly to 299 x 299 and scaled to [-1, 1], as in the FID reference.

Weights are never downloaded: :func:`build_fid_inception` loads them from a path or URL the
user gives, or, without one, builds the documented default extractor (a fixed-seed random
initialisation, see :data:`RANDOM_EXTRACTOR`), whose FID values are only comparable with
each other.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import PurePosixPath

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from caldm.errors import DataError

FEATURE_DIM = 2048
INPUT_SIZE = 299
NUM_CLASSES = 1008  # the TF graph's 1001 ImageNet classes padded to 1008
RANDOM_SEED = 0
# pytorch-fid's file is pt_inception-2015-12-05-6726825d.pth; torch hub names files after the
# first hex digits of their sha256.
PUBLISHED_SHA256_PREFIX = "6726825d"
RANDOM_EXTRACTOR = (
    f"inception-v3-fid random init (seed {RANDOM_SEED}, no pretrained weights); "
    "not comparable with published FID values"
)


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3, as in the TF graph) + ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_same(x: Tensor) -> Tensor:
    # TF's SAME average pool divides by the number of real (unpadded) pixels.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """35 x 35 block: 1x1, 5x5, double 3x3 and pooled branches."""

    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_same(x))
        return torch.cat([self.branch1x1(x), b5, b3, bp], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 ("Mixed_6a")."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([self.branch3x3(x), b3, bp], 1)


class FIDInceptionC(nn.Module):
    """17 x 17 block with factorised 7x7 convolutions."""

    def __init__(self, cin: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        bp = self.branch_pool(_avg_pool_same(x))
        return torch.cat([self.branch1x1(x), b7, bd, bp], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 ("Mixed_7a")."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class FIDInceptionE(nn.Module):
    """8 x 8 block with expanded filter banks; ``max_pool`` marks the FID graph's last block."""

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.max_pool:
            # The 2015-12-05 graph max-pools here (pytorch-fid's "FIDInceptionE_2").
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _avg_pool_same(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 as in the FID reference; :meth:`features` gives the 2048-d pool features."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        # Unused by FID; kept so that the published state dict loads strictly.
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        """(B, 1|3, H, W) images in [0, 1] -> (B, 2048) pool3 features."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(
                x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False
            )
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (1008); FID uses :meth:`features`."""
        return self.fc(self.features(x))


def _random_init(model: FIDInceptionV3, seed: int) -> None:
    # He-normal convolutions keep activations at unit scale through ~90 conv+BN(eval)+ReLU
    # layers, so random pool3 features neither vanish nor saturate and still respond to
    # texture and structure (torch's default init shrinks them by ~1/6 per layer).
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            fan_in = module.weight[0].numel()
            with torch.no_grad():
                module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=gen)
    with torch.no_grad():
        model.fc.weight.normal_(0.0, FEATURE_DIM**-0.5, generator=gen)
        model.fc.bias.zero_()


def load_state_dict_from_url(url: str) -> tuple[dict[str, Tensor], str]:
    """Read a state dict from a local path or fsspec URL (``.safetensors`` or a torch file).

    Returns the state dict and the file's sha256 (hex). Torch files are read with
    ``weights_only=True``. Raises :class:`DataError` naming ``url``.
    """
    import fsspec

    try:
        with fsspec.open(url, "rb") as f:
            blob = f.read()
    except Exception as exc:  # local OSErrors, botocore/aiohttp errors for object stores
        raise DataError(
            url, f"cannot read Inception weights ({type(exc).__name__}: {exc})"
        ) from None
    try:
        if PurePosixPath(url.split("?")[0]).suffix == ".safetensors":
            from safetensors.torch import load as load_safetensors

            state = load_safetensors(blob)
        else:
            state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign files raise many different types
        raise DataError(url, f"not a readable state dict ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise DataError(url, f"expected a state dict, found {type(state).__name__}")
    return state, hashlib.sha256(blob).hexdigest()


def build_fid_inception(weights: str | None = None) -> tuple[FIDInceptionV3, str]:
    """The FID Inception in eval mode and a name for reports.

    With ``weights`` (path or URL of the pytorch-fid ``pt_inception-2015-12-05`` file or any
    state dict of this architecture) they are loaded strictly; a mismatch raises
    :class:`DataError`. The name gives the file's sha256 prefix and says whether it is the
    published file. Without weights, the default extractor :data:`RANDOM_EXTRACTOR` is built.
    """
    model = FIDInceptionV3()
    if weights is None:
        _random_init(model, RANDOM_SEED)
        name = RANDOM_EXTRACTOR
    else:
        state, sha256 = load_state_dict_from_url(weights)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
            raise DataError(weights, f"not FID Inception-v3 weights: {first}") from None
        name = f"inception-v3-fid weights {PurePosixPath(weights).name} (sha256 {sha256[:12]})"
        if sha256.startswith(PUBLISHED_SHA256_PREFIX):
            name += ": the published 2015-12-05 FID weights"
    model.requires_grad_(False)
    return model.eval(), name
