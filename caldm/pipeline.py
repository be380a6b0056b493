"""Streaming CA-LDM sampling from a model bundle (DESIGN.md "Sampling").

z ~ Diff3D -> z_sr = f_sr(z) -> z_hr_i ~ Diff_slice(. | z_sr_i) for every slice, ``slice_batch``
slices per network call -> x_i = DecM(z_hr around i) -> a sink. The latent stages hold the
whole latent (c, D', H', W') and z_sr (c, D, H', W'); after them only a window of slices is on
the device: a batch of slices is refined through all its denoising steps, its latents go to the
streaming decoder (:mod:`caldm.nn.inferers`), which decodes whatever it can and hands image
slices to the sink on the host. Peak memory therefore does not grow with D beyond the latents.

Randomness: the Diff3D noise comes from ``(seed, 0)``, the noise of refined slice i from
``(seed, 1, i)`` (CPU generators), so a volume does not depend on ``slice_batch`` or
``decode_chunk`` and the same seed gives the same volume on the same device.

Ablations (the rows of the paper's Table 1): ``full`` is the path above; ``nhae_diff3d_refiner``
decodes the refined slices with Dec2D alone (no adaptors); ``nhae_diff3d`` also skips the
refiner and decodes f_sr(z) slice by slice with Dec2D. A bundle that lacks the refiner or the
adaptors can be sampled with the ablation that does not need them.

Label guidance: a bundle trained with ``--condition layers|vessels`` has condition encoders
(``cond_diff3d``, ``cond_refiner``) whose features are concatenated to the diffusion inputs.
Labels of any size are reduced from their own resolution to class fractions on the encoders'
grids (:func:`caldm.data.labels.prepare_labels`), as training labels are. Without labels a
conditioned bundle samples unconditionally (zero condition features, the case condition
dropout trained). ``guidance_scale > 1`` adds classifier-free guidance.

:func:`caldm.bench.sampling.account_sampling` runs this same code on the meta device to count
peak memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from caldm.config import Config
from caldm.data.labels import PreparedLabels, prepare_labels
from caldm.data.preprocess import from_unit_range
from caldm.data.sinks import ArraySink, Sink
from caldm.diffusion.samplers import make_sampler, sample_loop
from caldm.diffusion.schedule import NoiseSchedule
from caldm.errors import BundleError, CaldmError
from caldm.nn.inferers import DecodeMode, SliceDecoder
from caldm.nn.nets.dec_m import DecM
from caldm.stages import STAGES, guide_input

if TYPE_CHECKING:
    from caldm.bundle import Bundle

SAMPLING_MODULES = ("diff3d", "f_sr", "refiner", "dec2d", "adaptors")
Ablation = Literal["full", "nhae_diff3d_refiner", "nhae_diff3d"]
ABLATIONS: dict[str, tuple[str, ...]] = {  # the modules each ablation samples with
    "full": SAMPLING_MODULES,
    "nhae_diff3d_refiner": ("diff3d", "f_sr", "refiner", "dec2d"),
    "nhae_diff3d": ("diff3d", "f_sr", "dec2d"),
}
# The two stages never need each other's weights: with offloading only one set is on the device.
LATENT_MODULES = ("diff3d", "cond_diff3d", "f_sr")
SLICE_MODULES = ("refiner", "cond_refiner", "dec2d", "adaptors")
Output = Literal["uint8", "float"]
_DIFF3D_STREAM, _REFINER_STREAM = 0, 1


def _generator(seed: int, *path: int) -> torch.Generator:
    """A CPU generator for one random stream of a volume: ``(seed, stream[, slice])``."""
    state = np.random.SeedSequence([seed, *path]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class CALDMPipeline:
    """CA-LDM sampling with the networks of one bundle.

    Args:
        cfg: the bundle's config (shapes and sampling settings).
        modules: ``diff3d``, ``f_sr``, ``refiner``, ``dec2d``, ``adaptors``, plus
            ``cond_diff3d`` / ``cond_refiner`` for the conditioned diffusion models.
        condition: the bundle's label kind (``layers``, ``vessels``) or None.
        latent_scale: per diffusion model, the factor its latents were multiplied by in
            training (bundle meta ``latent_scale``; default 1).
        device: where the networks run (``meta`` for memory accounting).
        dtype: weight and activation dtype; bf16 autocast is used on CUDA.
        halo: context slices each side of a chunk in ``chunked`` decoding (default: k // 2,
            the context DecM's adaptors were trained with).
        ablation: which of Table 1's rows to sample (module docstring); ``modules`` need
            only hold what it uses.
        offload: keep the weights on the host and move each stage's modules (latent:
            Diff3D, f_sr; slices: Diff_slice, DecM) to the device only while it runs. Default:
            on for CUDA, where it lowers the peak by the other stage's weights (1.2 GiB of
            Diff3D at the paper preset) for about a second of copies per volume.
    """

    def __init__(
        self,
        cfg: Config,
        modules: Mapping[str, nn.Module],
        condition: str | None = None,
        latent_scale: Mapping[str, float] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        halo: int | None = None,
        offload: bool | None = None,
        ablation: Ablation = "full",
    ) -> None:
        if ablation not in ABLATIONS:
            raise CaldmError(f"ablation {ablation!r}: expected one of {', '.join(ABLATIONS)}")
        missing = [n for n in ABLATIONS[ablation] if n not in modules]
        if missing:
            raise ValueError(f"sampling ({ablation}) needs modules {', '.join(missing)}")
        self.ablation = ablation
        self.cfg = cfg
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.offload = self.device.type == "cuda" if offload is None else offload
        home = "cpu" if self.offload else self.device
        used = {*ABLATIONS[ablation]}
        used |= {STAGES[n].condition_encoder for n in ("diff3d", "refiner") if n in used}
        self.modules = {
            n: m.to(home, self.dtype).eval() for n, m in modules.items() if n in used
        }
        self.condition = condition
        scale = dict(latent_scale or {})
        self.scale = {n: float(scale.get(n, 1.0)) for n in ("diff3d", "refiner")}
        self.decm = DecM(self.modules["dec2d"], self.modules.get("adaptors"))
        # Without adaptors every slice decodes alone: context would only cost time.
        default_halo = cfg.model.k // 2 if "adaptors" in self.modules else 0
        self.halo = default_halo if halo is None else halo
        self.schedule = NoiseSchedule.from_config(cfg.diffusion)

    @classmethod
    def from_bundle(
        cls,
        bundle: str | Bundle,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        halo: int | None = None,
        offload: bool | None = None,
        ablation: Ablation = "full",
    ) -> CALDMPipeline:
        """Load the modules ``ablation`` samples with from ``bundle`` (an opened
        :class:`~caldm.bundle.Bundle`, or its URL: a local path or ``s3://``); a bundle that
        lacks some is named in one line with the ablations it allows."""
        from caldm.bundle import open_bundle

        if ablation not in ABLATIONS:
            raise CaldmError(f"ablation {ablation!r}: expected one of {', '.join(ABLATIONS)}")
        source = open_bundle(bundle)  # "not a model bundle" before anything else
        names = ABLATIONS[ablation]
        have = set(source.names)
        missing = [n for n in names if n not in have]
        if missing:
            allowed = [a for a, need in ABLATIONS.items() if have.issuperset(need)]
            raise BundleError(
                f"{source.url}: bundle lacks {', '.join(missing)} needed for --ablation "
                f"{ablation}"
                + (f"; it can sample --ablation {' or '.join(allowed)}" if allowed else "")
            )
        # The condition encoders of the sampled diffusion models that were trained with one.
        conds = [
            STAGES[n].condition_encoder for n in source.meta.get("conditioned", []) if n in names
        ]
        return cls(
            source.cfg,
            source.load([*names, *conds], device="cpu"),
            condition=source.condition,
            latent_scale=source.meta.get("latent_scale"),
            device=device,
            dtype=dtype,
            halo=halo,
            offload=offload,
            ablation=ablation,
        )

    def prepare_labels(self, labels: np.ndarray, source: str = "labels") -> PreparedLabels:
        """:func:`prepare_labels` for this bundle's condition kind and class count."""
        if self.condition is None:
            raise CaldmError(f"{source}: labels given, but the bundle has no condition encoders")
        encoder = self.modules.get("cond_diff3d") or self.modules.get("cond_refiner")
        classes = getattr(encoder, "num_classes", None)
        return prepare_labels(labels, self.condition, self.cfg, source, classes)

    # ------------------------------------------------------------------ sampling

    def sample(
        self,
        seed: int,
        labels: np.ndarray | PreparedLabels | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        refiner_sampler: str | None = None,
        refiner_steps: int | None = None,
        decode: DecodeMode | None = None,
        sink: Sink | None = None,
        output: Output = "uint8",
        progress: bool = False,
    ) -> np.ndarray | None:
        """Sample one volume ``(D, H, W)``.

        Settings left as None come from ``cfg.sampling`` (the refiner's from the Diff3D ones
        when unset there too). Decoded slices go to ``sink(start_index, slices)`` as host
        arrays (uint8 via :func:`from_unit_range`, or float32 in [-1, 1]); without a sink the
        assembled volume is returned. On the meta device nothing is returned or sunk.
        """
        s = self.cfg.sampling
        sampler = sampler or s.sampler
        steps = steps or s.steps
        refiner_sampler = refiner_sampler or s.refiner_sampler or sampler
        refiner_steps = refiner_steps or s.refiner_steps or steps
        if labels is not None and not isinstance(labels, PreparedLabels):
            labels = self.prepare_labels(labels)

        on_meta = self.device.type == "meta"
        shape = self.cfg.model.image_shape
        collect = ArraySink(shape, np.uint8 if output == "uint8" else np.float32)
        out_sink = sink or collect
        d = self.cfg.model.image_shape[0]
        n_batches = -(-d // s.slice_batch) if "refiner" in self.modules else 0
        bar = tqdm(
            total=steps + n_batches * refiner_steps,
            desc="sample",
            unit="step",
            disable=not progress,
        )

        def emit(start: int, decoded: torch.Tensor) -> None:
            x = decoded[:, 0].float()
            if not on_meta:  # meta tensors have no data to hand over
                x = x.cpu()
                out_sink(start, from_unit_range(x) if output == "uint8" else x.numpy())

        with torch.inference_mode(), self._autocast():
            with self._resident(LATENT_MODULES):
                z_sr = self.sample_latents(seed, labels, sampler, steps, bar.update)
            with self._resident(SLICE_MODULES):
                self.refine_and_decode(
                    z_sr, seed, labels, refiner_sampler, refiner_steps, decode, emit, bar.update
                )
        bar.close()
        if on_meta or sink is not None:
            return None
        return collect.result()

    def sample_latents(
        self,
        seed: int,
        labels: PreparedLabels | None,
        sampler: str,
        steps: int,
        on_step: Callable[[int], object] | None = None,
    ) -> torch.Tensor:
        """The latent stages: z ~ Diff3D, then z_sr = f_sr(z), ``(c, D, H', W')`` float32."""
        shape = (1, *self.cfg.model.latent_shape)
        gen = _generator(seed, _DIFF3D_STREAM)
        x = torch.randn(shape, generator=gen).to(self.device)
        cond = self._cond_features("diff3d", labels, lambda lab: lab[None])
        z = self._denoise("diff3d", sampler, steps, x, None, cond, [gen], on_step)
        z = z / self.scale["diff3d"]
        return self.modules["f_sr"](z.to(self.dtype)).float()[0]

    def refine_and_decode(
        self,
        z_sr: torch.Tensor,
        seed: int,
        labels: PreparedLabels | None,
        sampler: str,
        steps: int,
        decode: DecodeMode | None,
        emit: Callable[[int, torch.Tensor], None],
        on_step: Callable[[int], object] | None = None,
        refine: bool = True,
    ) -> None:
        """Refine the slices of ``z_sr`` batch by batch and stream them through DecM.

        ``emit(start, decoded)`` receives each decoded group ``(n, 1, H, W)`` on the device.
        With ``refine=False`` (or without a refiner) the given latents are decoded as they are.
        """
        s = self.cfg.sampling
        d = z_sr.shape[1]
        decoder = SliceDecoder(
            self.decm,
            d,
            decode or s.decode,
            self.cfg.model.k,
            s.decode_chunk,
            self.halo,
            emit,
            self.dtype,
        )
        for start in range(0, d, s.slice_batch):
            stop = min(start + s.slice_batch, d)
            if refine and "refiner" in self.modules:
                z = self.refine(z_sr, start, stop, seed, labels, sampler, steps, on_step)
            else:  # nhae_diff3d: Dec2D on f_sr(z) itself
                z = z_sr[:, start:stop].movedim(1, 0)
            decoder.push(z)
        decoder.close()

    def refine(
        self,
        z_sr: torch.Tensor,
        start: int,
        stop: int,
        seed: int,
        labels: PreparedLabels | None,
        sampler: str,
        steps: int,
        on_step: Callable[[int], object] | None = None,
    ) -> torch.Tensor:
        """z_hr_i ~ Diff_slice(. | z_sr_i) for slices ``start .. stop - 1``: ``(n, c, H', W')``."""
        scale = self.scale["refiner"]
        gens = [_generator(seed, _REFINER_STREAM, i) for i in range(start, stop)]
        noise = [torch.randn(z_sr.shape[0], *z_sr.shape[2:], generator=g) for g in gens]
        x = torch.stack(noise).to(self.device)
        z_sr_batch = z_sr[:, start:stop].movedim(1, 0) * scale
        cond = self._cond_features("refiner", labels, lambda lab: lab[start:stop])
        z_hr = self._denoise("refiner", sampler, steps, x, z_sr_batch, cond, gens, on_step)
        return z_hr / scale

    # ------------------------------------------------------------------ internals

    @contextlib.contextmanager
    def _resident(self, names: tuple[str, ...]) -> Iterator[None]:
        """With offloading, ``names`` live on the device for the duration of the block."""
        present = [self.modules[n] for n in names if n in self.modules]
        if not self.offload:
            yield
            return
        for module in present:
            module.to(self.device)
        try:
            yield
        finally:
            for module in present:
                module.to("cpu")

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda" and self.dtype == torch.bfloat16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _cond_features(
        self,
        name: str,
        labels: PreparedLabels | None,
        pick: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor | None:
        """Condition features for ``name``'s input; None without an encoder or labels."""
        encoder = self.modules.get(f"cond_{name}")
        if encoder is None or labels is None:
            return None
        # pick on the host: the refiner's rows for all D slices stay off the device
        label = pick(torch.from_numpy(getattr(labels, name)))
        return encoder(label.to(self.device))

    def _denoise(
        self,
        name: str,
        sampler_name: str,
        steps: int,
        x: torch.Tensor,
        extra: torch.Tensor | None,
        cond: torch.Tensor | None,
        generators: list[torch.Generator],
        on_step: Callable[[int], object] | None,
    ) -> torch.Tensor:
        """Run the reverse process of ``name`` from ``x`` (float32).

        ``extra`` (z_sr for the refiner) and then the condition features ``cond`` are
        concatenated to the input. A conditioned model without labels gets zero features,
        the unconditional case that condition dropout trained; with labels and
        ``guidance_scale != 1`` it also runs on zero features (classifier-free guidance), in a
        second call rather than a doubled batch, so guidance costs time but no memory.
        """
        model = self.modules[name]
        sampler = make_sampler(sampler_name, self.schedule, self.cfg.sampling.eta)
        guide, unguided = guide_input(extra, None), None
        scale = self.cfg.sampling.guidance_scale
        if f"cond_{name}" in self.modules:
            width = self.cfg.model.condition.channels
            zero = x.new_zeros(x.shape[0], width, *x.shape[2:])
            guide = guide_input(extra, zero if cond is None else cond.float())
            if cond is not None and scale != 1.0:
                unguided = guide_input(extra, zero)

        def predict(x_t: torch.Tensor, t_batch: torch.Tensor) -> torch.Tensor:
            out = model(x_t.to(self.dtype), t_batch, guide).float()
            if unguided is not None:
                base = model(x_t.to(self.dtype), t_batch, unguided).float()
                out = base + scale * (out - base)
            return out

        def fresh_noise() -> torch.Tensor:  # per item, from its own stream: batch-independent
            return torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators])

        return sample_loop(predict, sampler, x, steps, noise=fresh_noise, on_step=on_step)
