"""Sampling speed: seconds and FLOPs per volume, exact vs chunked decoding, DDIM-200 vs DPM++.

For each preset (tiny and small on the CPU; the paper preset too when CUDA is available) a
random bundle is sampled with the streaming pipeline. Measured in this run, medians of
``--repeats``:

- decoding: the same latents through DecM in ``exact`` (Eq. 1) and ``chunked`` mode, on a
  section of ``--decode-slices`` slices (streaming makes decoding cost linear in D; scaled to
  the volume), and their difference (max / mean absolute uint8 difference, PSNR);
- denoising: the latent stage (Diff3D + f_sr) and the refinement of one slice batch, each
  with ``--probe`` steps, scaled linearly to the step counts compared (every step costs the
  same) and to the volume's number of slice batches;
- FLOPs (``torch.utils.flop_counter``): of the same pieces with 1 and 2 steps (giving the
  cost per step and the fixed part) and of each decoding mode;
- a dense matmul on the same device, the yardstick for achieved FLOP/s.

Per volume = denoising scaled to the step count + the decoding mode's time. Random weights
make the timings and FLOPs real but the images meaningless, so sampler *quality* is not
compared here (tests/test_diffusion.py checks DDIM and DPM-Solver++ against a closed form).
Writes ``benchmarks/results/sampling_speed_<device>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from caldm.bundle import init_bundle
from caldm.config import preset
from caldm.data.preprocess import from_unit_range
from caldm.nn.inferers import SliceDecoder
from caldm.pipeline import CALDMPipeline

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLERS = (("ddim", 200), ("dpm++", 20))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` runs (after one warm-up run)."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        began = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def compare(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Max / mean absolute difference and PSNR of two uint8 volumes."""
    diff = np.abs(a.astype(np.float64) - b)
    rmse = float(np.sqrt((diff**2).mean()))
    return {
        "max_abs_uint8": float(diff.max()),
        "mean_abs_uint8": float(diff.mean()),
        "psnr_db": float("inf") if rmse == 0 else float(20 * np.log10(255 / rmse)),
    }


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, device, max(repeats, 5))


def decode_all(pipe: CALDMPipeline, z: torch.Tensor, mode: str) -> torch.Tensor:
    """Decode latents ``(D, c, H', W')`` in ``mode``; returns ``(D, H, W)`` float on the host."""
    parts: dict[int, torch.Tensor] = {}

    def emit(start: int, x: torch.Tensor) -> None:
        parts[start] = x[:, 0].float().cpu()

    s = pipe.cfg.sampling
    dec = SliceDecoder(
        pipe.decm, z.shape[0], mode, pipe.cfg.model.k, s.decode_chunk, pipe.halo, emit, pipe.dtype
    )
    with torch.inference_mode(), pipe._autocast():
        for batch in z.split(s.slice_batch):
            dec.push(batch)
        dec.close()
    return torch.cat([parts[k] for k in sorted(parts)])


def bench_preset(
    name: str, device: torch.device, repeats: int, probe: int, decode_slices: int
) -> dict:
    cfg = preset(name)
    with tempfile.TemporaryDirectory() as tmp:
        init_bundle(name, tmp, cfg=cfg)
        pipe = CALDMPipeline.from_bundle(tmp, device=device, offload=False)
    gen = torch.Generator().manual_seed(0)
    c, d = cfg.model.latent_channels, cfg.model.image_shape[0]
    n = min(decode_slices, d)
    section = d / n  # decoding cost is linear in the slices
    z = torch.randn(n, c, *cfg.model.slice_latent_shape[1:], generator=gen).to(device)

    decode = {}
    images = {}
    for mode in ("exact", "chunked"):
        images[mode] = from_unit_range(decode_all(pipe, z, mode))
        decode[mode] = {
            "seconds": section * timed(lambda m=mode: decode_all(pipe, z, m), device, repeats),
            "flops": int(section * flops(lambda m=mode: decode_all(pipe, z, m))),
        }
    difference = compare(images["exact"], images["chunked"])
    # Real latents vary smoothly across slices (f_sr upsamples D' slices); i.i.d. ones do not.
    coarse = torch.randn(c, max(1, n * cfg.model.latent_shape[1] // cfg.model.image_shape[0]),
                         *cfg.model.slice_latent_shape[1:], generator=gen)
    smooth = torch.nn.functional.interpolate(
        coarse[None], size=(n, *coarse.shape[2:]), mode="trilinear"
    )[0].movedim(1, 0)
    smooth = smooth.to(device)
    smooth_exact = from_unit_range(decode_all(pipe, smooth, "exact"))
    halos = {}
    default_halo = pipe.halo
    for halo in sorted({0, default_halo, pipe.modules["adaptors"].halo()}):
        pipe.halo = halo
        halos[halo] = {
            "iid": compare(images["exact"], from_unit_range(decode_all(pipe, z, "chunked"))),
            "smooth": compare(smooth_exact, from_unit_range(decode_all(pipe, smooth, "chunked"))),
        }
    pipe.halo = default_halo

    s = cfg.sampling
    batches = -(-d // s.slice_batch)
    z_sr = torch.randn(c, d, *cfg.model.slice_latent_shape[1:], generator=gen).to(device)

    def latent(sampler: str, steps: int) -> None:
        with torch.inference_mode(), pipe._autocast():
            pipe.sample_latents(0, None, sampler, steps)

    def refine(sampler: str, steps: int) -> None:
        """One slice batch; a volume has ``batches`` of them."""
        with torch.inference_mode(), pipe._autocast():
            pipe.refine(z_sr, 0, min(s.slice_batch, d), 0, None, sampler, steps)

    def step_flops(fn: Callable[[str, int], None]) -> tuple[int, int]:
        """(FLOPs of the first step with the fixed part, FLOPs of each further step)."""
        one, two = flops(lambda: fn("ddim", 1)), flops(lambda: fn("ddim", 2))
        return one, two - one

    lat_one, lat_step = step_flops(latent)
    ref_one, ref_step = step_flops(refine)
    volumes = []
    for sampler, steps in SAMPLERS:
        lat_s = timed(lambda sm=sampler: latent(sm, probe), device, repeats) / probe
        ref_s = timed(lambda sm=sampler: refine(sm, probe), device, repeats) / probe
        for mode in ("exact", "chunked"):
            seconds = (lat_s + ref_s * batches) * steps + decode[mode]["seconds"]
            total = (
                lat_one
                + lat_step * (steps - 1)
                + (ref_one + ref_step * (steps - 1)) * batches
                + decode[mode]["flops"]
            )
            volumes.append(
                {
                    "sampler": sampler,
                    "steps": steps,
                    "decode": mode,
                    "seconds": seconds,
                    "flops": total,
                }
            )
    return {
        "preset": name,
        "image_shape": list(cfg.model.image_shape),
        "slice_batch": s.slice_batch,
        "decode_chunk": s.decode_chunk,
        "halo": pipe.halo,
        "probe_steps": probe,
        "decode_slices": n,
        "decode": decode,
        "difference": difference,
        "difference_by_halo": halos,
        "volumes": volumes,
    }


def render(result: dict) -> str:
    peak = result["matmul_flops_per_s"]
    lines = [
        f"# Sampling speed ({result['device']}, {result['dtype']}, "
        f"{result['threads']} thread(s), medians of {result['repeats']})",
        "",
        f"Dense matmul on this device: {peak / 1e9:.1f} GFLOP/s.",
        "",
        "## Decoding: exact (Eq. 1) vs chunked, the same refined latents",
        "",
        "| preset | exact s | chunked s | speed-up | exact GFLOP | chunked GFLOP "
        "| max abs | mean abs | PSNR dB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result["presets"]:
        e, c, d = p["decode"]["exact"], p["decode"]["chunked"], p["difference"]
        lines.append(
            f"| {p['preset']} | {e['seconds']:.3f} | {c['seconds']:.3f} "
            f"| {e['seconds'] / c['seconds']:.2f}x | {e['flops'] / 1e9:.2f} "
            f"| {c['flops'] / 1e9:.2f} | {d['max_abs_uint8']:.0f} | {d['mean_abs_uint8']:.2f} "
            f"| {d['psnr_db']:.1f} |"
        )
    lines += [
        "",
        "Chunked vs exact by halo (PSNR dB, i.i.d. latents / latents smooth across slices):",
        "",
    ]
    for p in result["presets"]:
        cells = [
            f"halo {h}: {v['iid']['psnr_db']:.1f} / {v['smooth']['psnr_db']:.1f}"
            for h, v in p["difference_by_halo"].items()
        ]
        lines.append(f"- {p['preset']}: " + ", ".join(cells))
    lines += [
        "",
        "## Per volume",
        "",
        "| preset | sampler | decode | s/volume | GFLOP/volume | GFLOP/s | of matmul |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in result["presets"]:
        for v in p["volumes"]:
            rate = v["flops"] / v["seconds"]
            lines.append(
                f"| {p['preset']} | {v['sampler']}-{v['steps']} | {v['decode']} "
                f"| {v['seconds']:.2f} | {v['flops'] / 1e9:.1f} | {rate / 1e9:.1f} "
                f"| {rate / peak:.1%} |"
            )
        by = {(v["sampler"], v["decode"]): v["seconds"] for v in p["volumes"]}
        lines.append(
            f"| {p['preset']} | ddim-200 / dpm++-20 | chunked "
            f"| {by[('ddim', 'chunked')] / by[('dpm++', 'chunked')]:.1f}x | | | |"
        )
    return "\n".join(lines) + "\n"


def trained_decode(bundle: str, device: torch.device, repeats: int) -> dict:
    """Exact vs chunked on a trained bundle: one sampled volume's refined latents, both ways.

    Random weights exaggerate the gap between the modes (random adaptors mix slices far more
    than trained ones); this is the figure the default decode mode rests on.
    """
    pipe = CALDMPipeline.from_bundle(bundle, device=device, offload=False)
    with torch.inference_mode(), pipe._autocast():
        z_sr = pipe.sample_latents(0, None, "ddim", 20)
        z = pipe.refine(z_sr, 0, z_sr.shape[1], 0, None, "ddim", 20)
    out: dict = {"bundle": bundle, "preset": pipe.cfg.preset}
    images = {}
    for mode in ("exact", "chunked"):
        images[mode] = from_unit_range(decode_all(pipe, z, mode))
        out[f"{mode}_s"] = timed(lambda m=mode: decode_all(pipe, z, m), device, repeats)
    out.update(compare(images["exact"], images["chunked"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=None, help="default: tiny small (+paper)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--probe", type=int, default=4, help="denoising steps actually run")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch)")
    parser.add_argument("--decode-slices", type=int, default=32, help="decoded section")
    parser.add_argument(
        "--trained-bundle", default=None, help="also compare exact vs chunked on this bundle"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.trained_bundle:  # only the trained comparison, into its own results file
        t = trained_decode(args.trained_bundle, device, args.repeats)
        table = (
            f"# Exact vs chunked decoding on a trained {t['preset']} bundle ({device.type})\n\n"
            f"exact {t['exact_s']:.3f} s, chunked {t['chunked_s']:.3f} s per volume "
            f"({t['exact_s'] / t['chunked_s']:.2f}x); max abs {t['max_abs_uint8']:.0f}, "
            f"mean abs {t['mean_abs_uint8']:.2f}, PSNR {t['psnr_db']:.1f} dB (uint8 volumes)\n"
        )
        print(table)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"decode_trained_{device.type}.md").write_text(table)
        return
    presets = args.presets or (["tiny", "small"] + (["paper"] if device.type == "cuda" else []))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "matmul_flops_per_s": matmul_flops_per_s(device, dtype, args.repeats),
        "presets": [
            bench_preset(p, device, args.repeats, args.probe, args.decode_slices) for p in presets
        ],
    }
    table = render(result)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"sampling_speed_{device.type}"
    stem.with_suffix(".md").write_text(table)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
