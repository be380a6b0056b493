"""Typed configuration for caldm: presets, YAML round trips and ``--set`` overrides.

A :class:`Config` holds everything one run needs: the model (shapes and widths of every
network), the diffusion process, sampling, training and data settings. Presets ``paper``,
``small`` and ``tiny`` are built by :func:`preset`; a YAML file or ``key=value`` overrides are
applied on top with :func:`load_config`. Unknown keys are errors that name the key and suggest
the closest valid one.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from caldm.errors import ConfigError

Shape3 = tuple[int, int, int]
PRESETS = ("paper", "small", "tiny")
STAGES = ("ae2d", "nhae", "adaptor", "diff3d", "refiner")
ConditionKind = Literal["layers", "vessels"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AE2DConfig(_Strict):
    """Enc2D/Dec2D: the LDM-style KL autoencoder on single B-scans (f = 2^(len(channels)-1))."""

    channels: list[int]
    num_res_blocks: int = 2
    norm_num_groups: int = 32
    attention: bool = True  # self-attention in the lowest-resolution middle block
    # Dec2D draws speckle from per-pixel noise inputs (caldm.nn.blocks.noise). Off by default
    # so that bundles written before the key load as trained; presets turn it on (with the
    # low-pass pixel term, model.loss.l1_lowpass_sigma, which lets it learn to).
    noise: bool = False


class Enc3DConfig(_Strict):
    """Enc3D: 3D conv encoder from the thumbnail to z; downsamples len(channels)-1 times."""

    channels: list[int]
    num_res_blocks: int = 1
    norm_num_groups: int = 16


class FSRConfig(_Strict):
    """f_sr: 3D residual blocks with uniaxial (slice axis) upsampling; one width per scale."""

    channels: list[int]
    num_res_blocks: int = 1
    norm_num_groups: int = 16


class AdaptorConfig(_Strict):
    """3D adaptors of DecM: Conv3d across the slice axis after each decoder residual block.

    ``form`` (caldm.nn.blocks.adaptor): ``mix`` is the paper's ``x + alpha (adapt(x) - x)``;
    ``residual`` is ``x + alpha conv(act(norm(x)))`` with a zero-initialised conv, the identity
    at the start like ``mix`` with alpha 0, but with gradients for the conv from step one. The
    default stays ``mix`` so that bundles written before the key decode as trained; presets
    choose ``residual`` (docs/design-notes.md: with mix and alpha 0 the adaptors never learned).
    """

    kernel_size: int = 3
    # In-plane extent of the conv (odd); 1 mixes slices only. Presets use 1 (measured in
    # benchmarks/results/recipe_cpu.md); 3 stays the default so older bundles load.
    in_plane: int = 3
    alpha_init: float = 0.0
    form: Literal["mix", "residual"] = "mix"
    levels: list[int] | None = None  # decoder levels that get adaptors; None = all

    @model_validator(mode="after")
    def _extents(self) -> AdaptorConfig:
        if self.in_plane < 1 or self.in_plane % 2 != 1:
            raise ValueError("in_plane must be odd and >= 1 (1: across slices only)")
        return self


class UNetConfig(_Strict):
    """A diffusion UNet (Diff3D or Diff_slice)."""

    channels: list[int]
    attention_levels: list[bool]
    num_res_blocks: int = 2
    num_head_channels: int = 64
    norm_num_groups: int = 32

    @model_validator(mode="after")
    def _lengths(self) -> UNetConfig:
        if len(self.attention_levels) != len(self.channels):
            raise ValueError("attention_levels must have one entry per channels entry")
        return self


class ConditionConfig(_Strict):
    """Condition encoders map a label to features on the latent grid."""

    channels: int = 16
    layer_classes: int = 9  # the phantom's 9; training sets it from the data (num_layer_classes)
    dropout: float = 0.1  # probability of dropping the condition in training


class DiscriminatorConfig(_Strict):
    channels: int = 64
    num_layers: int = 3


class LossConfig(_Strict):
    """The LDM hybrid loss for the autoencoder stages."""

    l1_weight: float = 1.0
    # L1 on Gaussian-blurred images (this sigma, px) when > 0: the pixel term keeps the low
    # frequencies (anatomy) and leaves the high ones (speckle) to the GAN and perceptual terms,
    # as frequency-separation super-resolution does; plain L1 pays for every drawn speckle.
    l1_lowpass_sigma: float = Field(default=0.0, ge=0.0)
    # The perceptual term (caldm.nn.losses.perceptual_kind): "auto" is VGG/LPIPS when
    # perceptual_weights_path is given, else "spectral" (Fourier amplitudes, no download).
    perceptual: Literal["auto", "vgg", "ssim", "spectral", "none"] = "auto"
    perceptual_weight: float = 0.3
    perceptual_weights_path: str | None = None  # VGG16 weights for "vgg" (never downloaded)
    # ae2d: pay for column texture drawn from the latent rather than the noise inputs and not
    # in the real slice (caldm.nn.losses.shared_column_texture; a second decode per step)
    column_weight: float = Field(default=0.0, ge=0.0)
    adv_weight: float = 0.05
    # LDM's adaptive weight: adv_weight x |grad rec| / |grad adv| (caldm.nn.losses.HybridLoss),
    # so the GAN term pulls as hard as the reconstruction terms whatever their scales.
    adv_adaptive: bool = False
    adv_start_step: int = 0
    kl_weight: float = 1e-6
    latent_weight: float = 1.0  # nhae: L1 between z_sr_i and Enc2D(x_i)


class ModelConfig(_Strict):
    image_shape: Shape3
    thumbnail_shape: Shape3
    latent_channels: int = 4
    k: int = 5
    ae2d: AE2DConfig
    enc3d: Enc3DConfig
    f_sr: FSRConfig
    adaptor: AdaptorConfig = AdaptorConfig()
    diff3d: UNetConfig
    refiner: UNetConfig
    condition: ConditionConfig = ConditionConfig()
    discriminator: DiscriminatorConfig = DiscriminatorConfig()
    loss: LossConfig = LossConfig()

    @property
    def slice_factor(self) -> int:
        """Downsampling factor of the slice autoencoder (f)."""
        return 2 ** (len(self.ae2d.channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(c, D', H', W'): the shape of z."""
        f3 = 2 ** (len(self.enc3d.channels) - 1)
        d, h, w = self.thumbnail_shape
        return (self.latent_channels, d // f3, h // f3, w // f3)

    @property
    def slice_latent_shape(self) -> tuple[int, int, int]:
        """(c, H', W'): one latent slice."""
        _, h, w = self.image_shape
        f = self.slice_factor
        return (self.latent_channels, h // f, w // f)

    @property
    def z_sr_shape(self) -> tuple[int, int, int, int]:
        """(c, D, H', W'): z after uniaxial super-resolution."""
        c, h, w = self.slice_latent_shape
        return (c, self.image_shape[0], h, w)

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        c, dl, hl, wl = self.latent_shape
        _, hs, ws = self.slice_latent_shape
        d = self.image_shape[0]
        f3 = 2 ** (len(self.enc3d.channels) - 1)
        if any(t % f3 for t in self.thumbnail_shape):
            raise ValueError(f"thumbnail_shape {self.thumbnail_shape} is not divisible by {f3}")
        if (hl, wl) != (hs, ws):
            raise ValueError(
                f"Enc3D latent H'xW' {hl}x{wl} differs from the slice latent {hs}x{ws}: "
                "thumbnail_shape and the encoder depths do not fit image_shape"
            )
        up = d // dl
        if up * dl != d or up & (up - 1) or 2 ** (len(self.f_sr.channels) - 1) != up:
            raise ValueError(
                f"f_sr must upsample D' = {dl} to D = {d} by a power of two with "
                f"len(f_sr.channels) - 1 = log2({d}/{dl}) stages"
            )
        if self.k % 2 != 1:
            raise ValueError("k must be odd (a center slice with k//2 neighbours each side)")
        top = len(self.ae2d.channels) - 1  # Dec2D's levels: 0 (lowest resolution) .. top
        missing = sorted(set(self.adaptor.levels or ()) - set(range(top + 1)))
        if missing:
            raise ValueError(f"adaptor.levels {missing} do not exist: Dec2D has levels 0..{top}")
        return self


class DiffusionConfig(_Strict):
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "cosine"] = "linear"
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    loss: Literal["mse", "l1"] = "mse"  # distance to the target; l1 is the released code's


class SamplingConfig(_Strict):
    sampler: Literal["ddim", "dpm++", "ddpm"] = "ddim"  # ddpm: ancestral (DDIM with eta 1)
    steps: int = 200
    refiner_sampler: Literal["ddim", "dpm++", "ddpm"] | None = None  # None: same as sampler
    refiner_steps: int | None = None  # None: same as steps
    eta: float = 0.0
    # chunked: ~3x fewer decoder FLOPs than exact (Eq. 1); benchmarks/sampling_speed.py
    decode: Literal["exact", "chunked"] = "chunked"
    slice_batch: int = 64  # latent slices refined together at each denoising step
    decode_chunk: int = 16  # output slices decoded together (chunk + k-1 latent slices in)
    guidance_scale: float = 1.0  # classifier-free guidance for label-guided sampling


class TrainConfig(_Strict):
    lr: float = 1e-4
    disc_lr: float = 1e-4
    warmup_steps: int = 0  # linear learning-rate warm-up from 0 (both optimizers); 0 = none
    weight_decay: float = 0.0
    micro_batch: int = 1
    grad_accum: int = 1
    grad_clip: float = 1.0
    precision: Literal["fp32", "bf16"] = "bf16"
    activation_checkpointing: bool = True
    zero_stage: Literal[1, 2, 3] = 2
    max_steps: int = 100_000
    checkpoint_every: int = 1000
    log_every: int = 10
    preview_every: int = 500
    ema_decay: float = 0.9999
    max_failures: int = 3
    seed: int = 0


class AugmentConfig(_Strict):
    """Joint latent + label augmentation of the label-conditioned diffusion fine-tunes, so that
    the label, not the training set's typical anatomy, decides where the retina lies. Latents
    move by whole latent pixels (convolutions are shift-equivariant: a latent moved by one
    pixel is the latent of the image moved by one latent pixel's worth), the label by the same
    full-resolution distance; the offsets between whole latent pixels come from the latent
    cache's shifted views (``views``: volumes moved before encoding, their labels with them).
    Flips are off: the trained autoencoders are not mirror-symmetric, so a mirrored latent is
    not the latent of the mirrored image."""

    shift: float = 0.15  # largest shift along depth (H'), as a fraction of the depth; 0 = off
    # shifted views per volume in the latent cache: the volume moved by k/(views+1) of a
    # latent pixel before encoding (caldm.data.latents.view_shifts); 0 = none
    views: int = 3
    # autoencoder stages (ae2d, nhae, adaptor): volumes moved along depth by up to this
    # fraction, image only, so the latent space can express a moved retina; 0 = off
    ae_shift: float = 0.15
    flip_w: bool = False  # mirror along W
    flip_d: bool = False  # mirror along D (diff3d only: the refiner sees single slices)


class DataConfig(_Strict):
    slices_per_volume: int = 1  # nhae: full-resolution slices reconstructed per volume
    skip_bad_volumes: bool = True  # log and skip unreadable volumes during training
    num_workers: int = 2  # per-worker loader processes
    augment: AugmentConfig = AugmentConfig()  # depth shifts: autoencoders, latent views, fine-tunes


class Config(_Strict):
    preset: str = "custom"
    stage: Literal["ae2d", "nhae", "adaptor", "diff3d", "refiner"] | None = None  # set by training
    model: ModelConfig
    diffusion: DiffusionConfig = DiffusionConfig()
    sampling: SamplingConfig = SamplingConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()

    def adaptor_window(self) -> tuple[int, int]:
        """(slices, halo) of an adaptor training window: a decode chunk with its halo each
        side, as chunked decoding feeds DecM (the loss is on the chunk's slices)."""
        halo = self.model.k // 2
        return self.sampling.decode_chunk + 2 * halo, halo

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Dotted keys to leaf values, e.g. ``{"train.lr": 1e-4, ...}`` (for MLflow params)."""
        out: dict[str, Any] = {}

        def walk(prefix: str, node: Any) -> None:
            if isinstance(node, dict):
                for key, value in node.items():
                    walk(f"{prefix}.{key}" if prefix else key, value)
            else:
                out[prefix] = node

        walk("", self.to_dict())
        return out


# Every preset: LDM's adaptive GAN weight at 0.5 (the released recipe), chosen by measurement
# (benchmarks/results/recipe_cpu.md: 3 seeds of ae2d at the tiny preset, vessel contrast
# 0.79 -> 0.90, layer Dice 0.849 -> 0.863). The pixel term on low frequencies only (sigma 1 px)
# with Dec2D's noise inputs and the spectral term: speckle drawn, not averaged away (2 seeds:
# TV ratio 0.56 -> 0.96, layer Dice 0.833 -> 0.872, vessel contrast 0.93 -> 1.34). The column
# term at 0.1 pays for column texture drawn from the latent (the en-face strip grid): 2 ae2d
# seeds, strips W 2.57x -> 0.42x real, column persistence 0.52 -> 0.09, vessel contrast 1.37 ->
# 1.77, Dice 0.872 -> 0.877, TV 0.96 -> 1.09 (0.3 and 1.0 cost texture; recipe_cpu.md).
_LOSS = {"adv_adaptive": True, "adv_weight": 0.5, "l1_lowpass_sigma": 1.0, "column_weight": 0.1}
_AE2D = {"noise": True}
# Adaptors that mix slices only (in_plane 1): border strips, texture and vessel contrast no
# worse than with a 3x3 in-plane kernel in 3 runs, at a ninth of the conv's weights.
_ADAPTOR = {"form": "residual", "alpha_init": 1.0, "in_plane": 1}
# Every preset: LDM's scaled-linear betas from 0.0015 to 0.0195 (the released code's), chosen by
# measurement (benchmarks/results/recipe_cpu.md): the main job's label fidelity 0.896x -> 0.908x
# (linear 1e-4..0.02 against scaled-linear, 2 seeds each) and the moved-label test's
# boundary MAD 1.84/1.75 -> 1.78/1.72 px. The released code's L1 loss raised fidelity too but
# moved the test's boundaries to 2.06/2.01 px (> 2): MSE stays. The class defaults keep the old
# betas so that bundles written before sample with the schedule they were trained on.
_DIFFUSION = {"beta_schedule": "scaled_linear", "beta_start": 0.0015, "beta_end": 0.0195}


def _paper() -> dict[str, Any]:
    return {
        "preset": "paper",
        "model": {
            "image_shape": (512, 512, 512),
            "thumbnail_shape": (256, 256, 256),
            "ae2d": {"channels": [128, 256, 512, 512], "num_res_blocks": 2, **_AE2D},
            "enc3d": {"channels": [32, 64, 128], "num_res_blocks": 1},
            "f_sr": {"channels": [128, 128, 64, 64], "num_res_blocks": 1},
            "diff3d": {
                "channels": [128, 256, 512, 1024],
                "attention_levels": [False, False, True, True],
                "num_res_blocks": 2,
            },
            "refiner": {
                "channels": [192, 384, 768, 768],
                "attention_levels": [False, True, True, True],
                "num_res_blocks": 2,
            },
            "adaptor": dict(_ADAPTOR),
            "condition": {"channels": 32},
            "discriminator": {"channels": 64, "num_layers": 3},
            "loss": dict(_LOSS),
        },
        "diffusion": dict(_DIFFUSION),
        "sampling": {"steps": 200, "slice_batch": 32, "decode_chunk": 8},
        "train": {"precision": "bf16", "activation_checkpointing": True, "micro_batch": 1},
    }


def _small() -> dict[str, Any]:
    return {
        "preset": "small",
        "model": {
            "image_shape": (128, 128, 128),
            "thumbnail_shape": (64, 64, 64),
            "ae2d": {"channels": [64, 128, 128, 256], "num_res_blocks": 1, **_AE2D},
            "enc3d": {"channels": [16, 32, 64], "num_res_blocks": 1},
            "f_sr": {"channels": [64, 64, 32, 32], "num_res_blocks": 1},
            "diff3d": {
                "channels": [64, 128, 256],
                "attention_levels": [False, True, True],
                "num_res_blocks": 1,
                "num_head_channels": 32,
            },
            "refiner": {
                "channels": [64, 128, 256],
                "attention_levels": [False, True, True],
                "num_res_blocks": 1,
                "num_head_channels": 32,
            },
            "adaptor": dict(_ADAPTOR),
            "condition": {"channels": 16},
            "discriminator": {"channels": 32, "num_layers": 3},
            "loss": dict(_LOSS),
        },
        "diffusion": dict(_DIFFUSION),
        "sampling": {"steps": 50, "slice_batch": 32, "decode_chunk": 16},
        "train": {"precision": "bf16", "activation_checkpointing": False, "micro_batch": 2},
    }


def _tiny() -> dict[str, Any]:
    return {
        "preset": "tiny",
        "model": {
            "image_shape": (32, 64, 64),
            "thumbnail_shape": (16, 32, 32),
            # A 4x slice latent (the paper's is 8x): at 64 px the phantom's layers (1.6-5 px)
            # and vessels (2-3 px) sit under one 8 px cell, where an 8x latent lost them
            # (benchmarks/results/label_fidelity_cpu.md: the main job's label fidelity 0.91x ->
            # 0.94x, inter-slice/in-plane 0.90 -> 0.99); Enc3D and f_sr one level less to fit.
            "ae2d": {
                **_AE2D,
                "channels": [16, 32, 32],
                "num_res_blocks": 1,
                "norm_num_groups": 8,
                "attention": False,
            },
            "enc3d": {"channels": [8, 16], "num_res_blocks": 1, "norm_num_groups": 8},
            "f_sr": {"channels": [16, 16, 8], "num_res_blocks": 1, "norm_num_groups": 8},
            "diff3d": {
                "channels": [16, 32],
                "attention_levels": [False, True],
                "num_res_blocks": 1,
                "num_head_channels": 16,
                "norm_num_groups": 8,
            },
            "refiner": {
                "channels": [16, 32],
                "attention_levels": [False, True],
                "num_res_blocks": 1,
                "num_head_channels": 16,
                "norm_num_groups": 8,
            },
            "adaptor": dict(_ADAPTOR),
            "condition": {"channels": 8},
            "discriminator": {"channels": 8, "num_layers": 2},
            "loss": {"adv_start_step": 50, **_LOSS},
        },
        # v-prediction: an eps-predicting refiner trained for minutes diverges at high noise
        # (x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) amplifies its error 100-fold there)
        "diffusion": {**_DIFFUSION, "prediction_type": "v_prediction"},
        "sampling": {"steps": 20, "slice_batch": 32, "decode_chunk": 8},
        "train": {
            "lr": 1e-3,
            "disc_lr": 1e-3,
            "precision": "fp32",
            "activation_checkpointing": False,
            "micro_batch": 2,
            "checkpoint_every": 2,
            "log_every": 1,
            "preview_every": 50,
            "ema_decay": 0.99,
        },
        "data": {"slices_per_volume": 2, "num_workers": 0},
    }


_PRESET_BUILDERS = {"paper": _paper, "small": _small, "tiny": _tiny}


def preset_dict(name: str) -> dict[str, Any]:
    """The raw nested dict of a preset (before validation)."""
    if name not in _PRESET_BUILDERS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return _PRESET_BUILDERS[name]()


def preset(name: str) -> Config:
    """A validated preset config: ``paper`` (512^3), ``small`` (128^3) or ``tiny``."""
    return Config.model_validate(preset_dict(name))


# ---------------------------------------------------------------- overrides and validation


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys: list[str] = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_valid_keys(ann, dotted + "."))
    return keys


def valid_keys() -> list[str]:
    """Every dotted config key, e.g. ``train.lr`` or ``model.adaptor.kernel_size``."""
    return _valid_keys(Config)


def _suggest(key: str) -> str:
    keys = valid_keys()
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not close:  # a right leaf under the wrong section: train.kernel_size -> model.adaptor...
        leaf = key.rsplit(".", 1)[-1]
        leaves = difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1] for k in keys], n=1)
        close = [k for k in keys if leaves and k.rsplit(".", 1)[-1] == leaves[0]][:1]
    return f"; did you mean {close[0]!r}?" if close else ""


def _merge(base: dict[str, Any], update: dict[str, Any], path: str = "") -> None:
    for key, value in update.items():
        dotted = f"{path}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, dotted + ".")
        else:
            base[key] = value


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"config key {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def add_overrides_argument(parser: Any, help_text: str) -> None:
    """A job's repeatable ``--set KEY=VALUE`` (into ``args.overrides``; read by
    :func:`parse_override`), with the job's own ``help_text``."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=help_text,
    )


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=c"`` -> ``("a.b", parsed c)``; values are parsed as YAML (numbers, lists, bools)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if key not in valid_keys():
        raise ConfigError(f"unknown config key {key!r}{_suggest(key)}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {exc}") from exc
    return key, value


def _validate(tree: dict[str, Any], source: str) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            raise ConfigError(f"{source}: unknown config key {key!r}{_suggest(key)}") from None
        raise ConfigError(f"{source}: config key {key!r}: {err['msg']}") from None


def read_yaml(url: str) -> dict[str, Any]:
    """Read a YAML mapping from a local path or fsspec URL."""
    import fsspec

    try:
        with fsspec.open(url, "r") as fh:
            return _yaml_mapping(fh, url)
    except FileNotFoundError:
        raise ConfigError(f"{url}: config file not found") from None


def _yaml_mapping(text: Any, source: str) -> dict[str, Any]:
    """The YAML mapping in ``text`` (a string, bytes or an open file) read from ``source``."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of config keys at the top level")
    return data


def load_config(
    preset_name: str | None = "tiny",
    file: str | Path | None = None,
    overrides: list[str] | None = None,
) -> Config:
    """Build a config: a preset, then a YAML file on top, then ``key=value`` overrides.

    A file that names a ``preset`` key starts from that preset unless one is given here.
    Errors are :class:`ConfigError` with one line naming the file or key.
    """
    file_tree = read_yaml(str(file)) if file is not None else {}
    return _build(preset_name, file_tree, str(file) if file else "config", overrides)


def config_from_yaml(text: str | bytes, source: str) -> Config:
    """A resolved config (a bundle's config.yaml: every key it had was written) read from
    ``source``, for a caller that has its bytes already.

    Keys it lacks were added after it was written, so they take the class defaults, which keep
    what such a bundle was trained with (``model.ae2d.noise`` off, ``model.adaptor.in_plane``
    3, ...), not the values the named preset has today.
    """
    return _build("custom", _yaml_mapping(text, source), source, None)


def _build(
    preset_name: str | None,
    file_tree: dict[str, Any],
    source: str,
    overrides: list[str] | None,
) -> Config:
    tree: dict[str, Any] = {}
    base = preset_name or file_tree.get("preset")
    if base in _PRESET_BUILDERS:
        tree = preset_dict(base)
    elif base is not None and base != "custom":
        raise ConfigError(f"unknown preset {base!r}; choose one of {', '.join(PRESETS)}")
    if file_tree:
        _validate_keys(file_tree, source)
        _merge(tree, file_tree)
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return _validate(tree, source)


def _validate_keys(tree: dict[str, Any], source: str, prefix: str = "") -> None:
    keys = valid_keys()
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if dotted not in keys:
            raise ConfigError(f"{source}: unknown config key {dotted!r}{_suggest(dotted)}")
        if isinstance(value, dict) and any(k.startswith(dotted + ".") for k in keys):
            _validate_keys(value, source, dotted + ".")


def save_config(cfg: Config, url: str) -> None:
    """Write a config as YAML to a local path or fsspec URL."""
    import fsspec

    with fsspec.open(url, "w") as fh:
        fh.write(cfg.to_yaml())
