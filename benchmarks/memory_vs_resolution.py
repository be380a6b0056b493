"""Peak sampling memory vs resolution: CA-LDM and two baselines (the paper's Fig. 3).

Everything is counted on the meta device (:mod:`caldm.bench.meta`): the real networks run one
denoising step and the decoding, in bf16, and nothing is allocated. At each resolution R
(128, 256, 512) the models share the latent size of CA-LDM's Diff3D, (4, R/8, R/8, R/8), and
the paper preset's widths:

- ``ca-ldm``: the streaming pipeline itself (:func:`caldm.bench.sampling.account_sampling`) on the
  paper preset with image_shape R^3 and thumbnail (R/2)^3.
- ``holistic-3d-ldm``: Diff3D on (4, R/8, R/8, R/8) plus a 3D KL autoencoder's decoder (MONAI
  AutoencoderKL in 3D, Dec2D's widths, no attention) decoding the whole R^3 volume at once.
- ``ldm3d``: a 2D KL autoencoder per slice (Dec2D) plus a 3D diffusion UNet (Diff3D's config)
  over the stacked slice latents (4, R, R/8, R/8); slices decoded ``decode_chunk`` at a time.

Attention runs PyTorch SDPA; on meta it is counted as the math kernel (attention matrices
materialised), as it is for all three models. ``null`` marks a model that could not be built or
run at a resolution. Like CA-LDM on a GPU (``offload``), every model holds only the weights of
the stage that runs (denoising, then decoding). ``--json`` prints one JSON object as the last
line; the figures are also written to ``benchmarks/results/memory_vs_resolution.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from monai.networks.nets import AutoencoderKL

from caldm.bench.meta import PeakMemory, module_bytes
from caldm.bench.sampling import account_sampling
from caldm.config import Config, preset_dict
from caldm.nn.factory import build
from caldm.nn.nets.diffusion_unet import DiffusionUNet

RESOLUTIONS = (128, 256, 512)
DTYPE = torch.bfloat16
GIB = 2**30
OUT = Path(__file__).resolve().parent / "results" / "memory_vs_resolution.json"


def scaled_config(r: int) -> Config:
    """The paper preset at R^3: thumbnail (R/2)^3, same channels, k and widths."""
    tree = preset_dict("paper")
    tree["model"]["image_shape"] = (r, r, r)
    tree["model"]["thumbnail_shape"] = (r // 2, r // 2, r // 2)
    return Config.model_validate(tree)


def _one_step(unet: DiffusionUNet, latent: tuple[int, ...]) -> None:
    x = torch.randn(1, *latent, device="meta", dtype=DTYPE)
    unet(x, torch.zeros(1, dtype=torch.long, device="meta"))


def holistic_peak(cfg: Config) -> int:
    """Diff3D step, then the whole volume through a 3D KL decoder."""
    m = cfg.model
    n = len(m.ae2d.channels)
    with torch.device("meta"):
        ae = AutoencoderKL(
            spatial_dims=3,
            in_channels=1,
            out_channels=1,
            channels=m.ae2d.channels,
            num_res_blocks=[m.ae2d.num_res_blocks] * n,
            attention_levels=[False] * n,
            latent_channels=m.latent_channels,
            norm_num_groups=m.ae2d.norm_num_groups,
            with_encoder_nonlocal_attn=False,
            with_decoder_nonlocal_attn=False,
        )
        diff = build("diff3d", cfg)
    decoder = torch.nn.ModuleList([ae.post_quant_conv, ae.decoder]).to(DTYPE)
    diff.to(DTYPE)
    with torch.inference_mode():
        with PeakMemory(module_bytes(diff)) as denoise:
            _one_step(diff, m.latent_shape)
        z = torch.randn(1, *m.latent_shape, device="meta", dtype=DTYPE)
        with PeakMemory(module_bytes(decoder) + z.untyped_storage().nbytes()) as decode:
            ae.decoder(ae.post_quant_conv(z))
    return max(denoise.peak, decode.peak)


def ldm3d_peak(cfg: Config) -> int:
    """A 3D diffusion step over all slice latents, then Dec2D slice by slice."""
    m = cfg.model
    c, hl, wl = m.slice_latent_shape
    d = m.image_shape[0]
    with torch.device("meta"):
        diff = build("diff3d", cfg)
        dec2d = build("dec2d", cfg)
    diff.to(DTYPE)
    dec2d.to(DTYPE)
    chunk = cfg.sampling.decode_chunk
    with torch.inference_mode():
        with PeakMemory(module_bytes(diff)) as denoise:
            _one_step(diff, (c, d, hl, wl))
        z = torch.randn(d, c, hl, wl, device="meta", dtype=DTYPE)
        with PeakMemory(module_bytes(dec2d) + z.untyped_storage().nbytes()) as decode:
            for start in range(0, d, chunk):
                dec2d(z[start : start + chunk]).float()
    return max(denoise.peak, decode.peak)


def _or_none(fn, cfg: Config) -> int | None:
    try:
        return int(fn(cfg))
    except (RuntimeError, ValueError, MemoryError) as exc:
        print(f"# {fn.__name__} at {cfg.model.image_shape}: not built ({exc})")
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = parser.parse_args()
    peaks: dict[str, list[int | None]] = {"ca-ldm": [], "holistic-3d-ldm": [], "ldm3d": []}
    for r in RESOLUTIONS:
        cfg = scaled_config(r)
        peaks["ca-ldm"].append(_or_none(account_sampling, cfg))
        peaks["holistic-3d-ldm"].append(_or_none(holistic_peak, cfg))
        peaks["ldm3d"].append(_or_none(ldm3d_peak, cfg))
    result = {"resolutions": list(RESOLUTIONS), "peak_bytes": peaks}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result))
        return
    print("peak sampling memory (GiB, bf16, meta-device accounting)")
    print(f"{'model':<18}" + "".join(f"{r:>10}^3" for r in RESOLUTIONS))
    for name, row in peaks.items():
        cells = "".join(f"{'null' if v is None else f'{v / GIB:.2f}':>12}" for v in row)
        print(f"{name:<18}{cells}")


if __name__ == "__main__":
    main()
