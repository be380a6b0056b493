"""Peak memory of sampling one volume, counted by running :mod:`caldm.pipeline` on meta."""

from __future__ import annotations

import numpy as np
import torch

from caldm.bench.meta import PeakMemory, module_bytes, tensor_bytes
from caldm.config import Config
from caldm.nn.inferers import DecodeMode
from caldm.pipeline import LATENT_MODULES, SAMPLING_MODULES, SLICE_MODULES, CALDMPipeline


def sampling_memory(
    cfg: Config,
    decode: DecodeMode | None = None,
    condition: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    offload: bool = True,
) -> dict[str, int]:
    """Peak bytes of sampling one volume, counted by running the pipeline on the meta device.

    The modules are built on meta in ``dtype`` (bf16, as sampling runs on a GPU); each
    diffusion process takes one denoising step (every step has the same footprint). With
    ``offload`` (the GPU default) a stage's baseline holds only its own modules' weights.
    Returns ``weights`` (all modules); ``latent``, the peak of the latent stages (Diff3D,
    f_sr); ``z_sr``, the latent they hand on; ``slices``, the peak of refining and decoding
    above its weights and z_sr, the part that streams and must not grow with D; ``peak``.
    """
    from caldm.nn.factory import build

    names = list(SAMPLING_MODULES)
    if condition:
        names += ["cond_diff3d", "cond_refiner"]
    with torch.device("meta"):
        modules = {n: build(n, cfg, condition=condition) for n in names}
    pipe = CALDMPipeline(cfg, modules, condition=condition, device="meta", dtype=dtype)
    weights = module_bytes(*pipe.modules.values())

    def resident(names: tuple[str, ...]) -> int:
        if not offload:
            return weights
        return module_bytes(*(pipe.modules[n] for n in names if n in pipe.modules))

    labels = None
    if condition:  # what prepare_labels hands over, without reducing a full-size label on meta
        from caldm.data.labels import PreparedLabels, encoder_grid, num_label_classes

        classes = num_label_classes(condition, cfg.model.condition.layer_classes)
        rows = encoder_grid(cfg, condition, "refiner")
        labels = PreparedLabels(
            np.zeros((classes, *encoder_grid(cfg, condition, "diff3d")), np.float32),
            np.zeros((rows[0], classes, *rows[1:]), np.float32),
        )
    s = cfg.sampling
    with torch.inference_mode():
        with PeakMemory(resident(LATENT_MODULES)) as latent:
            z_sr = pipe.sample_latents(0, labels, s.sampler, 1)
        z_bytes = tensor_bytes([z_sr])
        base = resident(SLICE_MODULES) + z_bytes
        with PeakMemory(base) as slices:
            pipe.refine_and_decode(
                z_sr,
                0,
                labels,
                s.refiner_sampler or s.sampler,
                1,
                decode,
                lambda _, decoded: decoded[:, 0].float(),  # the host hand-over's staging copy
            )
    streaming = slices.peak - base
    return {
        "weights": weights,
        "latent": latent.peak,
        "z_sr": z_bytes,
        "slices": streaming,
        "peak": max(latent.peak, slices.peak),
    }


def account_sampling(cfg: Config, decode: DecodeMode | None = None) -> int:
    """Peak bytes of sampling one volume of ``cfg`` on a GPU (see :func:`sampling_memory`)."""
    return sampling_memory(cfg, decode)["peak"]
