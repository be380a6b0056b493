"""Paper-scale figures on one GPU: measured memory next to the meta accounting, seconds per
512^3 volume, training step rates, generation throughput. One command, a time budget.

Runs without Ray or DeepSpeed, so a bare machine with PyTorch (and the wheels of
``benchmarks/gpu_wheels.sh``) is enough. Parts, most important first:

1. ``train:<stage>``, every training stage at the preset's settings (bf16 and activation
   checkpointing at ``paper``): the real stage step of :mod:`caldm.stages` on
   :func:`~caldm.stages.example_batch`, with torch AdamW standing in for a single-worker
   DeepSpeed step (fp32 master weights and gradient buffer for bf16 weights, the
   discriminator's own step in GAN stages, an fp32 EMA for the diffusion stages).
   ``torch.cuda.max_memory_allocated`` over the steps, next to ``caldm bench memory``'s
   accounted figure for the same settings, and steps/s.
2. ``sample:setup`` / ``sample:probe``: a randomly initialised bundle in memory
   (``memory://``, as ``caldm init-bundle`` writes it) loaded by ``CALDMPipeline.from_bundle``;
   then a few timed denoising steps of Diff3D and of one refiner slice batch (each sampler)
   and a timed section of decoded slices (each mode). Whole-volume times are composed from
   these (marked ``extrapolated``) wherever a whole volume does not fit the budget.
3. ``sample:dpmpp20_chunked``, ``sample:accounting``: one whole volume, DPM-Solver++-20 and
   chunked decoding, its peak memory and its time split into Diff3D (+ f_sr), refiner and
   decoding (the rest: decoder, host hand-over, weight offloading); then the pipeline's
   meta-device accounting (``sampling_memory``) for the same settings.
4. ``flops``: FLOPs per volume, counted on the meta device (no GPU time), and the fraction of
   the card's dense bf16 peak (:data:`BF16_PEAK_TFLOPS`) each setting achieves.
5. ``throughput``: volumes/hour per card with the NIfTI writing (``.nii.gz`` into a local temp
   dir, as generation writes) inline after each volume vs in a writer thread that overlaps
   the next volume's sampling.
6. ``sample:ddim200_chunked``, ``sample:ddim200_exact``: whole volumes at the paper's steps
   (DDIM 200 + 200).

Each part is estimated from what earlier parts measured and skipped (listed under
``skipped``) when it would overrun ``--budget-s``; a part that fails is recorded under
``errors`` and the rest still run. Results are rewritten after every part, so a run cut short
still leaves them: ``gpu_<device>.md`` and ``.json`` in ``--out`` (default
``benchmarks/results``).

``--dry-run`` runs the same code on the tiny preset on the CPU in its own precision (fp32),
one thread, and writes into a temp dir (or ``--out``); peak memory there is the bytes of CPU
tensors, counted by :class:`~caldm.bench.meta.PeakMemory`, not an allocator's figure.

On the device machine (see ``benchmarks/gpu_wheels.sh`` for the wheels, run here first):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; \
        PYTHONUNBUFFERED=1 python3 benchmarks/gpu_suite.py --out $OUT
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from caldm.bench.memory import stage_peak_bytes  # noqa: E402
from caldm.bench.meta import PeakMemory, module_bytes  # noqa: E402
from caldm.bench.sampling import sampling_memory  # noqa: E402
from caldm.bundle import init_bundle  # noqa: E402
from caldm.config import STAGES as STAGE_NAMES  # noqa: E402
from caldm.config import Config, preset  # noqa: E402
from caldm.data.io import write_volume  # noqa: E402
from caldm.data.preprocess import from_unit_range  # noqa: E402
from caldm.diffusion.schedule import NoiseSchedule  # noqa: E402
from caldm.nn.factory import build  # noqa: E402
from caldm.nn.inferers import SliceDecoder  # noqa: E402
from caldm.nn.losses import HybridLoss  # noqa: E402
from caldm.pipeline import (  # noqa: E402
    LATENT_MODULES,
    SAMPLING_MODULES,
    SLICE_MODULES,
    CALDMPipeline,
)
from caldm.stages import (  # noqa: E402
    STAGES,
    StepContext,
    discriminator_loss,
    example_batch,
    train_dtype,
)

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 2**30
# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s, matched in
# this order against the device name (L40S before L40 before L4).
BF16_PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("A10G", 70.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("4090", 165.0),
)
# (key, sampler, steps per process, decode mode): DDIM-200 is the paper's setting.
SETTINGS = (
    ("ddim200_exact", "ddim", 200, "exact"),
    ("ddim200_chunked", "ddim", 200, "chunked"),
    ("dpmpp20_exact", "dpm++", 20, "exact"),
    ("dpmpp20_chunked", "dpm++", 20, "chunked"),
)
REQUIRED_SECONDS = ("ddim200_exact", "ddim200_chunked", "dpmpp20_chunked")
TARGETS = {
    "train_peak_gib": 22.0,
    "sample_peak_gib": 6.0,
    "accounting_rel_error": 0.15,
    "ddim200_s": 60.0,
    "dpmpp20_chunked_s": 10.0,
}


def bf16_peak_tflops(name: str) -> float | None:
    """The card's dense bf16 peak by its name, or None for an unknown card (or the CPU)."""
    upper = name.upper()
    for key, tflops in BF16_PEAK_TFLOPS:
        if key in upper:
            return tflops
    return None


def device_slug(name: str) -> str:
    """``NVIDIA H200`` -> ``h200`` (the results file's name)."""
    name = re.sub(r"^nvidia\s+", "", name.strip(), flags=re.I)
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "device"


def clock(device: torch.device) -> float:
    """Wall time after the device's queued work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def gib(nbytes: float | None) -> float | None:
    return None if nbytes is None else nbytes / GIB


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


class Budget:
    """Wall-clock seconds left for the suite."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


class PeakTracker:
    """Peak bytes held on ``device`` inside the block, ``held`` included.

    On CUDA: ``torch.cuda.max_memory_allocated`` above ``floor`` (what the process held
    before any part ran). On the CPU (dry runs): the bytes of CPU tensors alive at once,
    counted by :class:`PeakMemory` from ``held`` (tensors that existed before the block).
    :meth:`reset` forgets the peak so far (e.g. the transients of building the modules).
    """

    def __init__(self, device: torch.device, floor: int = 0, held: int = 0) -> None:
        self.device = device
        self.floor = floor
        self.held = held
        self.mode: PeakMemory | None = None

    def __enter__(self) -> PeakTracker:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.mode = PeakMemory(self.held, device_type=self.device.type)
            self.mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.mode is not None:
            self.mode.__exit__(*exc)

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.mode is not None:
            self.mode.reset_peak()

    @property
    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.floor
        assert self.mode is not None
        return self.mode.peak


# ---------------------------------------------------------------------- training


def _fold_grad(master: torch.Tensor, param: torch.Tensor) -> None:
    master.grad.add_(param.grad)
    param.grad = None


class MasterWeightAdamW:
    """torch AdamW standing in for DeepSpeed's optimizer on one worker.

    Low-precision (bf16) parameters get fp32 master weights and a persistent fp32 gradient
    buffer (with AdamW's two moments the 16 B/param ``caldm.bench.memory`` accounts); each
    parameter's bf16 gradient is added to the buffer as soon as backward has formed it and
    then dropped, as ZeRO's reduce buckets do, and the updated masters are copied back into
    the bf16 weights. fp32 parameters are optimised in place. Gradients are clipped by
    global norm first (``train.grad_clip``).
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float,
        betas: tuple[float, float],
        weight_decay: float,
        grad_clip: float,
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.grad_clip = grad_clip
        self.mixed = any(p.dtype != torch.float32 for p in self.params)
        if self.mixed:
            self.master = []
            for p in self.params:
                m = torch.empty_like(p, dtype=torch.float32).copy_(p.detach()).requires_grad_()
                m.grad = torch.zeros_like(m)
                p.register_post_accumulate_grad_hook(functools.partial(_fold_grad, m))
                self.master.append(m)
        else:
            self.master = self.params
        fused = bool(self.params) and self.params[0].device.type == "cuda"
        self.opt = torch.optim.AdamW(
            self.master, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused or None
        )

    @torch.no_grad()
    def step(self) -> None:
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.master, self.grad_clip)
        self.opt.step()
        if self.mixed:
            for p, m in zip(self.params, self.master):
                p.copy_(m)
            torch._foreach_zero_([m.grad for m in self.master])
        else:
            self.opt.zero_grad(set_to_none=True)


def train_stage(
    stage: str, cfg: Config, device: torch.device, floor: int, seconds: float, max_steps: int
) -> dict[str, Any]:
    """Measure one training stage: peak memory of its steps, steps/s, and the accounting."""
    spec = STAGES[stage]
    dtype = train_dtype(cfg)
    t = cfg.train
    trained = spec.trainable(None)
    began = time.perf_counter()
    accounted = stage_peak_bytes(stage, cfg)["peak"]  # the same settings, on meta
    account_s = time.perf_counter() - began
    free_memory(device)
    with PeakTracker(device, floor) as tracker:
        torch.manual_seed(t.seed)
        with torch.device(device):  # initialise on the device: seconds, not minutes
            mods = {name: build(name, cfg) for name in (*trained, *spec.frozen)}
            if spec.gan:
                mods["disc"] = build("disc", cfg)
        for name, module in mods.items():
            module.to(device, dtype)
            trains = name in trained or name == "disc"
            module.requires_grad_(trains).train(trains)
            if t.activation_checkpointing and hasattr(module, "checkpoint_activations"):
                module.checkpoint_activations()
        disc = mods.get("disc")
        opt_g = MasterWeightAdamW(
            (p for n in trained for p in mods[n].parameters()),
            t.lr,
            (0.9, 0.999),
            t.weight_decay,
            t.grad_clip,
        )
        opt_d = (
            MasterWeightAdamW(disc.parameters(), t.disc_lr, (0.5, 0.9), t.weight_decay, t.grad_clip)
            if disc is not None
            else None
        )
        ema = [m.detach().clone() for m in opt_g.master] if spec.diffusion else None
        ctx = StepContext(
            cfg,
            step=cfg.model.loss.adv_start_step,  # the discriminator is active, as accounted
            hybrid=HybridLoss(cfg.model.loss.model_copy(update={"perceptual_weights_path": None})),
            schedule=NoiseSchedule.from_config(cfg.diffusion),
        )
        batch = example_batch(stage, cfg, device=device, dtype=dtype)

        def step() -> None:
            if disc is not None:  # no discriminator gradients from the generator's loss
                disc.requires_grad_(False)
            out = spec.step(mods, batch, ctx)
            out.losses["loss"].backward()
            opt_g.step()
            if disc is not None and opt_d is not None:
                out.losses = {}
                disc.requires_grad_(True)
                discriminator_loss(disc, out).backward()
                opt_d.step()
            if ema is not None:
                with torch.no_grad():
                    torch._foreach_lerp_(ema, opt_g.master, 1.0 - t.ema_decay)

        tracker.reset()  # the step's peak, not building's fp32-then-bf16 transients
        start = clock(device)
        step()  # also creates the optimizer state
        first = clock(device) - start
        step()  # the steady state: optimizer state and activations at once
        peak = tracker.peak
    # timed outside the tracker: on the CPU its per-operator bookkeeping would be timed too
    times: list[float] = []
    for _ in range(max_steps):
        if first * (len(times) + 1) > seconds:
            break
        start = clock(device)
        step()
        times.append(clock(device) - start)
    n_params = {n: sum(p.numel() for p in m.parameters()) for n, m in mods.items()}
    step_s = statistics.median(times) if times else first
    return {
        "peak_bytes": peak,
        "accounted_bytes": accounted,
        "ratio": peak / accounted,
        "steps_per_s": 1.0 / step_s,
        "samples_per_s": t.micro_batch / step_s,
        "timed_steps": len(times),
        "first_step_s": first,
        "accounting_s": account_s,
        "params": n_params,
        "dtype": str(dtype).removeprefix("torch."),
        "activation_checkpointing": t.activation_checkpointing,
        "micro_batch": t.micro_batch,
    }


# ---------------------------------------------------------------------- sampling


class TimedPipeline(CALDMPipeline):
    """The sampling pipeline with the time of its latent stage (Diff3D + f_sr) and of slice
    refinement recorded in ``seconds``; decoding, the host hand-over and weight offloading
    are the rest of a volume's time. The device is synchronised around each timed call."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seconds: dict[str, float] = defaultdict(float)

    def sample_latents(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        start = clock(self.device)
        out = super().sample_latents(*args, **kwargs)
        self.seconds["diff3d"] += clock(self.device) - start
        return out

    def refine(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        start = clock(self.device)
        out = super().refine(*args, **kwargs)
        self.seconds["refiner"] += clock(self.device) - start
        return out


def random_pipeline(cfg: Config, device: torch.device, dtype: torch.dtype) -> TimedPipeline:
    """A pipeline on a randomly initialised bundle written to and loaded from memory."""
    import fsspec

    url = f"memory://caldm-gpu-suite-{os.getpid()}/bundle"
    try:
        with torch.device(device):  # initialising on the GPU takes seconds, on the CPU minutes
            init_bundle(cfg.preset, url, cfg=cfg)
    except Exception as exc:  # noqa: BLE001 - fall back to the plain CPU initialisation
        print(f"  initialising on {device} failed ({exc}); initialising on the CPU", flush=True)
        init_bundle(cfg.preset, url, cfg=cfg)
    try:
        return TimedPipeline.from_bundle(url, device=device, dtype=dtype)
    finally:
        fsspec.filesystem("memory").rm(url.removeprefix("memory://"), recursive=True)


def _slope(fn: Callable[[int], object], probe: int, device: torch.device) -> dict[str, float]:
    """Fixed and per-step seconds of ``fn(steps)`` from runs with 1 and 1 + ``probe`` steps."""
    fn(1)  # warm-up: kernel selection, lazy initialisation
    start = clock(device)
    fn(1)
    one = clock(device) - start
    start = clock(device)
    fn(1 + probe)
    more = clock(device) - start
    per_step = max(more - one, 0.0) / probe
    return {"fixed_s": max(one - per_step, 0.0), "step_s": per_step}


def decode_section(pipe: CALDMPipeline, n: int, mode: str) -> None:
    """Decode ``n`` random latent slices as a volume of ``n`` slices, handing each decoded
    group to the host as the pipeline does."""
    cfg, s = pipe.cfg, pipe.cfg.sampling
    c, hl, wl = cfg.model.slice_latent_shape
    z = torch.randn(n, c, hl, wl, device=pipe.device)

    def emit(start: int, decoded: torch.Tensor) -> None:
        if decoded.device.type != "meta":  # meta tensors (FLOP counting) have no data
            from_unit_range(decoded[:, 0].float().cpu())

    dec = SliceDecoder(
        pipe.decm, n, mode, cfg.model.k, s.decode_chunk, pipe.halo, emit, pipe.dtype
    )
    for batch in z.split(s.slice_batch):
        dec.push(batch)
    dec.close()


def probe_sampling(pipe: TimedPipeline, probe: int, decode_slices: int) -> dict[str, Any]:
    """Per-step seconds of Diff3D and of one refiner slice batch (each sampler) and seconds
    per decoded slice (each mode), from short timed runs on the device."""
    cfg, dev = pipe.cfg, pipe.device
    s = cfg.sampling
    d = cfg.model.image_shape[0]
    batch = min(s.slice_batch, d)
    out: dict[str, Any] = {"diff3d": {}, "refiner": {}, "decode_slice_s": {}}
    z_sr: list[torch.Tensor] = []
    with torch.inference_mode(), pipe._autocast():
        with pipe._resident(LATENT_MODULES):
            for sampler in ("ddim", "dpm++"):

                def latent(n: int, sampler: str = sampler) -> None:
                    z_sr[:] = [pipe.sample_latents(0, None, sampler, n)]

                out["diff3d"][sampler] = _slope(latent, probe, dev)
        with pipe._resident(SLICE_MODULES):
            for sampler in ("ddim", "dpm++"):
                out["refiner"][sampler] = _slope(
                    lambda n, sm=sampler: pipe.refine(z_sr[0], 0, batch, 0, None, sm, n),
                    probe,
                    dev,
                )
            n = min(decode_slices, d)
            for mode in ("exact", "chunked"):
                decode_section(pipe, min(n, s.decode_chunk), mode)  # warm-up
                start = clock(dev)
                decode_section(pipe, n, mode)
                out["decode_slice_s"][mode] = (clock(dev) - start) / n
    out.update(probe_steps=probe, decode_slices=n, slice_batches=-(-d // s.slice_batch))
    return out


def compose(probe: dict[str, Any], sampler: str, steps: int, mode: str, d: int) -> dict:
    """A volume's seconds from the probes: Diff3D, refiner over all slice batches, decoding."""
    lat, ref = probe["diff3d"][sampler], probe["refiner"][sampler]
    parts = {
        "diff3d": lat["fixed_s"] + lat["step_s"] * steps,
        "refiner": probe["slice_batches"] * (ref["fixed_s"] + ref["step_s"] * steps),
        "decode": probe["decode_slice_s"][mode] * d,
    }
    return {"seconds": sum(parts.values()), "split": parts}


def sample_volume(
    pipe: TimedPipeline,
    sampler: str,
    steps: int,
    mode: str,
    tracker: PeakTracker | None,
    seed: int = 0,
) -> tuple[dict[str, Any], np.ndarray]:
    """Sample one whole volume; its seconds, their split and the peak memory (with a
    tracker)."""
    pipe.seconds.clear()
    if tracker is not None:
        tracker.reset()
    start = clock(pipe.device)
    volume = pipe.sample(
        seed, sampler=sampler, steps=steps, refiner_sampler=sampler, refiner_steps=steps,
        decode=mode,
    )
    total = clock(pipe.device) - start
    split = {k: pipe.seconds.get(k, 0.0) for k in ("diff3d", "refiner")}
    split["decode"] = total - sum(split.values())
    peak = None if tracker is None else tracker.peak
    return {"seconds": total, "split": split, "peak_bytes": peak}, volume


def count_flops(cfg: Config) -> dict[str, Any]:
    """FLOPs of sampling, counted on the meta device with ``torch.utils.flop_counter``:
    Diff3D (+ f_sr) with 1 and 2 steps, one refiner slice batch with 1 and 2 steps (giving
    the fixed part and the cost of each further step) and one decoder group of each mode."""
    with torch.device("meta"):
        modules = {n: build(n, cfg) for n in SAMPLING_MODULES}
    pipe = CALDMPipeline(cfg, modules, device="meta", dtype=torch.bfloat16)
    s, m = cfg.sampling, cfg.model
    d = m.image_shape[0]
    batch = min(s.slice_batch, d)

    def flops(fn: Callable[[], object]) -> int:
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            fn()
        return counter.get_total_flops()

    lat = [flops(lambda n=n: pipe.sample_latents(0, None, "ddim", n)) for n in (1, 2)]
    z_sr = torch.empty(m.latent_channels, d, *m.slice_latent_shape[1:], device="meta")
    ref = [flops(lambda n=n: pipe.refine(z_sr, 0, batch, 0, None, "ddim", n)) for n in (1, 2)]
    decode = {}
    for mode in ("exact", "chunked"):
        probe = SliceDecoder(pipe.decm, d, mode, m.k, s.decode_chunk, pipe.halo, lambda *_: None)
        group = min(probe.group, d)  # one decoder call: a volume of one group of slices
        decode[mode] = flops(lambda g=group, mode=mode: decode_section(pipe, g, mode)) / group
    return {
        "diff3d": {"fixed": lat[0] - (lat[1] - lat[0]), "step": lat[1] - lat[0]},
        "refiner": {"fixed": ref[0] - (ref[1] - ref[0]), "step": ref[1] - ref[0]},
        "decode_per_slice": decode,
        "slice_batches": -(-d // s.slice_batch),
        "slices": d,
    }


def volume_flops(f: dict[str, Any], steps: int, mode: str) -> float:
    return (
        f["diff3d"]["fixed"]
        + f["diff3d"]["step"] * steps
        + f["slice_batches"] * (f["refiner"]["fixed"] + f["refiner"]["step"] * steps)
        + f["decode_per_slice"][mode] * f["slices"]
    )


def throughput(
    pipe: TimedPipeline, sampler: str, steps: int, mode: str, volumes: int, workdir: str
) -> dict[str, Any]:
    """Volumes/hour sampling ``volumes`` volumes and writing each as ``.nii.gz`` (as
    generation does) inline after it, then in a writer thread overlapping the next volume."""
    from caldm.data.phantom import phantom_affine

    affine = phantom_affine(pipe.cfg.model.image_shape)

    def sample(i: int) -> np.ndarray:
        return pipe.sample(
            i, sampler=sampler, steps=steps, refiner_sampler=sampler, refiner_steps=steps,
            decode=mode,
        )

    def write(path: str, volume: np.ndarray) -> None:
        write_volume(path, volume, affine)
        os.remove(path)  # keep the disk free; the bytes were written

    results: dict[str, Any] = {"setting": f"{sampler}-{steps} {mode}", "volumes": volumes}
    writes = []
    start = time.perf_counter()
    for i in range(volumes):
        volume = sample(i)
        began = time.perf_counter()
        write(f"{workdir}/inline_{i}.nii.gz", volume)
        writes.append(time.perf_counter() - began)
    inline = time.perf_counter() - start
    results["write_s"] = statistics.median(writes)
    start = time.perf_counter()
    with ThreadPoolExecutor(1) as writer:
        pending = []
        for i in range(volumes):
            volume = sample(i)
            pending.append(writer.submit(write, f"{workdir}/overlap_{i}.nii.gz", volume))
        for future in pending:
            future.result()
    overlapped = time.perf_counter() - start
    results.update(
        inline_s=inline,
        overlapped_s=overlapped,
        inline_per_hour=3600 * volumes / inline,
        overlapped_per_hour=3600 * volumes / overlapped,
    )
    return results


# ---------------------------------------------------------------------- the suite


class Suite:
    """Runs the parts in order within the budget and keeps the results up to date on disk."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cfg = preset(args.preset)
        if args.dry_run:
            self.device = torch.device("cpu")
            name = "cpu"
        else:
            if not torch.cuda.is_available():
                raise SystemExit("no CUDA device: run on a GPU, or pass --dry-run")
            self.device = torch.device("cuda")
            name = torch.cuda.get_device_name(self.device)
        # sampling on a GPU runs in bf16; the dry run keeps the preset's (CPU) precision
        self.sample_dtype = torch.bfloat16 if self.device.type == "cuda" else train_dtype(self.cfg)
        self.budget = Budget(args.budget_s)
        self.floor = torch.cuda.memory_allocated() if self.device.type == "cuda" else 0
        self.out = Path(args.out)
        self.stem = self.out / f"gpu_{device_slug(name)}"
        self.pipe: TimedPipeline | None = None
        self.probe: dict[str, Any] | None = None
        self.r: dict[str, Any] = {
            "device": name,
            "dry_run": args.dry_run,
            "preset": args.preset,
            "bf16_peak_tflops": bf16_peak_tflops(name) if self.device.type == "cuda" else None,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "budget_s": args.budget_s,
            "train_peak_gib": dict.fromkeys(STAGE_NAMES),
            "train_accounted_gib": dict.fromkeys(STAGE_NAMES),
            "train_ratio": dict.fromkeys(STAGE_NAMES),
            "train_steps_per_s": dict.fromkeys(STAGE_NAMES),
            "train": {},
            "sample_peak_gib": None,
            "sample_accounted_gib": None,
            "sample_ratio": None,
            "seconds_per_volume": {key: None for key, *_ in SETTINGS},
            "seconds_source": {key: None for key, *_ in SETTINGS},
            "seconds_split": {key: None for key, *_ in SETTINGS},
            "flops_per_volume": {key: None for key, *_ in SETTINGS},
            "fraction_of_bf16_peak": {key: None for key, *_ in SETTINGS},
            "volumes_per_hour": None,
            "sampling_probe": None,
            "targets": TARGETS,
            "parts_s": {},
            "skipped": [],
            "errors": {},
        }

    # -- bookkeeping

    def part(self, name: str, estimate: float | None, fn: Callable[[], None]) -> None:
        """Run ``fn`` unless its estimated seconds exceed what is left (then list it skipped);
        record its time, or its error, and rewrite the results."""
        left = self.budget.left()
        if left <= 0 or (estimate is not None and estimate > left):
            need = "" if estimate is None else f"needs ~{estimate:.0f} s, "
            reason = f"{need}{max(left, 0):.0f} s of the budget left"
            self.r["skipped"].append({"part": name, "reason": reason})
            print(f"[{self.budget.elapsed():6.1f} s] skip {name}: {reason}", flush=True)
            self.write()
            return
        print(f"[{self.budget.elapsed():6.1f} s] {name} ...", flush=True)
        start = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - one failed part must not lose the others
            traceback.print_exc()
            self.r["errors"][name] = f"{type(exc).__name__}: {exc}"
            free_memory(self.device)
        self.r["parts_s"][name] = round(time.perf_counter() - start, 2)
        self.write()

    def write(self) -> None:
        self.r["elapsed_s"] = round(self.budget.elapsed(), 2)
        self.out.mkdir(parents=True, exist_ok=True)
        self.stem.with_suffix(".json").write_text(json.dumps(self.r, indent=1) + "\n")
        self.stem.with_suffix(".md").write_text(render(self.r))

    def composed(self, key: str) -> dict[str, Any] | None:
        if self.probe is None:
            return None
        _, sampler, steps, mode = next(s for s in SETTINGS if s[0] == key)
        return compose(self.probe, sampler, steps, mode, self.cfg.model.image_shape[0])

    def estimate(self, key: str) -> float | None:
        c = self.composed(key)
        return None if c is None else 1.2 * c["seconds"] + 1.0

    # -- parts

    def train(self, stage: str) -> None:
        a = self.args
        res = train_stage(stage, self.cfg, self.device, self.floor, a.train_seconds, a.train_steps)
        self.r["train"][stage] = res
        self.r["train_peak_gib"][stage] = gib(res["peak_bytes"])
        self.r["train_accounted_gib"][stage] = gib(res["accounted_bytes"])
        self.r["train_ratio"][stage] = res["ratio"]
        self.r["train_steps_per_s"][stage] = res["steps_per_s"]
        print(
            f"  {stage}: peak {gib(res['peak_bytes']):.2f} GiB, accounted "
            f"{gib(res['accounted_bytes']):.2f} GiB ({res['ratio']:.2f}x), "
            f"{res['steps_per_s']:.2f} steps/s",
            flush=True,
        )

    def setup_sampling(self) -> None:
        free_memory(self.device)
        start = time.perf_counter()
        self.pipe = random_pipeline(self.cfg, self.device, self.sample_dtype)
        self.r["sampling_setup_s"] = time.perf_counter() - start
        self.r["sampling_offload"] = self.pipe.offload
        self.r["sampling_dtype"] = str(self.pipe.dtype).removeprefix("torch.")

    def probe_sampling(self) -> None:
        assert self.pipe is not None, "sampling setup failed"
        self.probe = probe_sampling(self.pipe, self.args.probe_steps, self.args.decode_slices)
        self.r["sampling_probe"] = self.probe
        for key, *_ in SETTINGS:
            c = self.composed(key)
            assert c is not None
            self.r["seconds_per_volume"][key] = c["seconds"]
            self.r["seconds_source"][key] = "extrapolated"
            self.r["seconds_split"][key] = c["split"]
        print(
            "  composed: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in self.r["seconds_per_volume"].items()),
            flush=True,
        )

    def account_sampling(self) -> None:
        assert self.pipe is not None, "sampling setup failed"
        acc = sampling_memory(
            self.cfg, decode="chunked", dtype=self.pipe.dtype, offload=self.pipe.offload
        )["peak"]
        self.r["sample_accounted_gib"] = gib(acc)
        measured = (self.r.get("volumes") or {}).get("dpmpp20_chunked")
        if measured is not None:
            self.r["sample_peak_gib"] = gib(measured["peak_bytes"])
            self.r["sample_ratio"] = measured["peak_bytes"] / acc
        print(f"  sampling accounted {gib(acc):.2f} GiB (meta device, chunked)", flush=True)

    def volume(self, key: str, with_memory: bool = False) -> None:
        assert self.pipe is not None, "sampling setup failed"
        _, sampler, steps, mode = next(s for s in SETTINGS if s[0] == key)
        held = 0 if self.pipe.offload else module_bytes(*self.pipe.modules.values())
        free_memory(self.device)
        if with_memory or self.device.type == "cuda":
            with PeakTracker(self.device, self.floor, held) as tracker:
                res, _ = sample_volume(self.pipe, sampler, steps, mode, tracker)
        else:  # counting CPU tensors would slow the dry run's volume several times
            res, _ = sample_volume(self.pipe, sampler, steps, mode, None)
        composed = self.composed(key)
        res["composed_s"] = None if composed is None else composed["seconds"]
        self.r["seconds_per_volume"][key] = res["seconds"]
        self.r["seconds_source"][key] = "measured"
        self.r["seconds_split"][key] = res["split"]
        self.r.setdefault("volumes", {})[key] = res
        line = f"  {key}: {res['seconds']:.2f} s"
        if composed is not None:
            line += f" (composed from the probes: {composed['seconds']:.2f} s)"
        if with_memory:
            self.r["sample_peak_gib"] = gib(res["peak_bytes"])
            line += f", peak {gib(res['peak_bytes']):.2f} GiB"
        print(line, flush=True)

    def flops(self) -> None:
        f = count_flops(self.cfg)
        self.r["flops"] = f
        peak = self.r["bf16_peak_tflops"]
        for key, _, steps, mode in SETTINGS:
            total = volume_flops(f, steps, mode)
            self.r["flops_per_volume"][key] = total
            seconds = self.r["seconds_per_volume"][key]
            if peak and seconds:
                self.r["fraction_of_bf16_peak"][key] = total / seconds / (peak * 1e12)
        print(
            "  TFLOP/volume: "
            + ", ".join(f"{k} {v / 1e12:.4g}" for k, v in self.r["flops_per_volume"].items()),
            flush=True,
        )

    def throughput(self) -> None:
        assert self.pipe is not None, "sampling setup failed"
        with tempfile.TemporaryDirectory(prefix="caldm-gpu-suite-") as tmp:
            res = throughput(self.pipe, "dpm++", 20, "chunked", self.args.volumes, tmp)
        # at the paper's steps, from the measured write time and seconds per volume
        write_s = res["write_s"]
        for key in ("ddim200_chunked", "dpmpp20_chunked"):
            s = self.r["seconds_per_volume"][key]
            if s:
                res[f"{key}_inline_per_hour_derived"] = 3600 / (s + write_s)
                res[f"{key}_overlapped_per_hour_derived"] = 3600 / max(s, write_s)
        self.r["volumes_per_hour"] = res
        print(
            f"  {res['setting']}: {res['inline_per_hour']:.0f} volumes/h writing inline, "
            f"{res['overlapped_per_hour']:.0f} overlapped (write {write_s:.2f} s)",
            flush=True,
        )

    def run(self) -> dict[str, Any]:
        a = self.args
        print(
            f"gpu suite: {self.r['device']}, preset {a.preset}, budget {a.budget_s:.0f} s, "
            f"results {self.stem}.md/.json",
            flush=True,
        )
        self.write()
        last: float | None = None
        for stage in STAGE_NAMES:
            if stage not in a.stages:
                self.r["skipped"].append({"part": f"train:{stage}", "reason": "not selected"})
                continue
            start = time.perf_counter()
            self.part(f"train:{stage}", last, lambda s=stage: self.train(s))
            if f"train:{stage}" in self.r["parts_s"]:
                last = time.perf_counter() - start
        self.part("sample:setup", None, self.setup_sampling)
        if self.pipe is not None:
            self.part("sample:probe", None, self.probe_sampling)
            self.part(
                "sample:dpmpp20_chunked",
                self.estimate("dpmpp20_chunked"),
                lambda: self.volume("dpmpp20_chunked", with_memory=True),
            )
            self.part("sample:accounting", None, self.account_sampling)
        self.part("flops", None, self.flops)
        if self.pipe is not None:
            per = self.estimate("dpmpp20_chunked")
            self.part("throughput", None if per is None else 2.5 * a.volumes * per, self.throughput)
            for key in ("ddim200_chunked", "ddim200_exact"):
                self.part(f"sample:{key}", self.estimate(key), lambda k=key: self.volume(k))
        else:
            for name in (
                "sample:probe",
                "sample:dpmpp20_chunked",
                "sample:accounting",
                "throughput",
                "sample:ddim200_chunked",
                "sample:ddim200_exact",
            ):
                self.r["skipped"].append({"part": name, "reason": "no sampling pipeline"})
        self.pipe = None
        # fractions of peak with the final seconds (measured volumes replace composed ones)
        peak = self.r["bf16_peak_tflops"]
        for key, *_ in SETTINGS:
            f, s = self.r["flops_per_volume"][key], self.r["seconds_per_volume"][key]
            if peak and f and s:
                self.r["fraction_of_bf16_peak"][key] = f / s / (peak * 1e12)
        self.write()
        print(render(self.r), flush=True)
        skipped = ", ".join(s["part"] for s in self.r["skipped"]) or "none"
        print(f"skipped: {skipped}; errors: {', '.join(self.r['errors']) or 'none'}")
        print(f"wrote {self.stem}.md and {self.stem}.json", flush=True)
        return self.r


# ---------------------------------------------------------------------- the report


def _f(value: float | None, fmt: str = ".2f", unit: str = "") -> str:
    return "—" if value is None else f"{value:{fmt}}{unit}"


def _verdict(ok: bool | None) -> str:
    return "" if ok is None else (" ✓" if ok else " ✗")


def render(r: dict[str, Any]) -> str:
    dry = r["dry_run"]
    judge = (lambda ok: "") if dry else _verdict  # targets are for the paper preset on a GPU
    t = r["targets"]
    kind = "counted CPU tensors (dry run)" if dry else "torch.cuda.max_memory_allocated"
    lines = [
        f"# GPU figures: {r['device']}, preset {r['preset']}"
        + (" (DRY RUN on CPU)" if dry else ""),
        "",
        f"torch {r['torch']}, CUDA {r['cuda']}, Python {r['python']}; "
        f"budget {r['budget_s']:.0f} s, ran {r.get('elapsed_s', 0):.0f} s. "
        "`python benchmarks/gpu_suite.py` (stand-in single-worker steps: torch AdamW, no "
        "Ray/DeepSpeed; random weights)."
        + (
            " Dry run: CPU times on the tiny preset (the DPM-Solver++-20 volume's inflated by "
            "counting every CPU tensor); figures not comparable with the targets."
            if dry
            else ""
        ),
        "",
        f"## Training, one worker (measured: {kind})",
        "",
        "| stage | measured GiB | accounted GiB | measured / accounted | steps/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for stage in r["train_peak_gib"]:
        peak, acc = r["train_peak_gib"][stage], r["train_accounted_gib"][stage]
        ratio = r["train_ratio"][stage]
        ok_mem = None if peak is None else peak <= t["train_peak_gib"]
        ok_acc = None if ratio is None else abs(ratio - 1) <= t["accounting_rel_error"]
        lines.append(
            f"| {stage} | {_f(peak)}{judge(ok_mem)} | {_f(acc)} | {_f(ratio)}{judge(ok_acc)} "
            f"| {_f(r['train_steps_per_s'][stage], '.2f')} |"
        )
    sp, sa, sr = r["sample_peak_gib"], r["sample_accounted_gib"], r["sample_ratio"]
    lines += [
        "",
        "## Sampling one volume",
        "",
        f"Peak memory (DPM-Solver++-20, chunked): measured {_f(sp)} GiB"
        f"{judge(None if sp is None else sp <= t['sample_peak_gib'])}, accounted {_f(sa)} GiB, "
        f"ratio {_f(sr)}{judge(None if sr is None else abs(sr - 1) <= t['accounting_rel_error'])}.",
        "",
        "| setting | s/volume | source | Diff3D s | refiner s | decode s | TFLOP/volume "
        "| of bf16 peak |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for key, *_ in SETTINGS:
        s = r["seconds_per_volume"][key]
        split = r["seconds_split"][key] or {}
        target = t["dpmpp20_chunked_s"] if key == "dpmpp20_chunked" else None
        if key.startswith("ddim200"):
            target = t["ddim200_s"]
        ok = None if s is None or target is None else s <= target
        flops = r["flops_per_volume"][key]
        lines.append(
            f"| {key} | {_f(s)}{judge(ok)} | {r['seconds_source'][key] or 'skipped'} "
            f"| {_f(split.get('diff3d'))} | {_f(split.get('refiner'))} "
            f"| {_f(split.get('decode'))} | {_f(None if flops is None else flops / 1e12, '.4g')} "
            f"| {_f(r['fraction_of_bf16_peak'][key], '.1%')} |"
        )
    v = r["volumes_per_hour"]
    lines += ["", "## Generation throughput, one card", ""]
    if v is None:
        lines.append("skipped")
    else:
        lines.append(
            f"{v['setting']}, {v['volumes']} volumes each way, `.nii.gz` write "
            f"{v['write_s']:.2f} s: {v['inline_per_hour']:.0f} volumes/h writing inline, "
            f"{v['overlapped_per_hour']:.0f} volumes/h with writing overlapped."
        )
        derived = v.get("ddim200_chunked_overlapped_per_hour_derived")
        if derived:
            lines.append(
                f"At DDIM-200 chunked (derived): {v['ddim200_chunked_inline_per_hour_derived']:.0f}"
                f" inline, {derived:.0f} overlapped."
            )
    lines += [
        "",
        f"Targets (paper preset, one H200): each stage <= {t['train_peak_gib']:.0f} GiB, "
        f"sampling <= {t['sample_peak_gib']:.0f} GiB, accounting within "
        f"{t['accounting_rel_error']:.0%}, DDIM-200 <= {t['ddim200_s']:.0f} s, "
        f"DPM-Solver++-20 chunked <= {t['dpmpp20_chunked_s']:.0f} s per volume.",
        "",
        "Skipped: "
        + (", ".join(f"{s['part']} ({s['reason']})" for s in r["skipped"]) or "nothing")
        + ". Errors: "
        + (", ".join(f"{k}: {e}" for k, e in r["errors"].items()) or "none")
        + ".",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Paper-scale GPU figures: training/sampling memory vs accounting, "
        "seconds per volume, throughput; within a time budget."
    )
    parser.add_argument("--budget-s", type=float, default=None, help="default 480 (dry run 60)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--dry-run", action="store_true", help="tiny preset on the CPU")
    parser.add_argument("--preset", default=None, help="default paper (dry run: tiny)")
    parser.add_argument(
        "--stages", nargs="*", default=list(STAGE_NAMES), choices=STAGE_NAMES,
        help="training stages to measure (default: all; none with a bare --stages)",
    )
    parser.add_argument("--train-steps", type=int, default=3, help="timed steps per stage")
    parser.add_argument(
        "--train-seconds", type=float, default=20.0, help="at most this long timing a stage"
    )
    parser.add_argument("--probe-steps", type=int, default=4, help="denoising steps per probe")
    parser.add_argument("--decode-slices", type=int, default=64, help="slices per decode probe")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (dry run default: 1)"
    )
    parser.add_argument("--volumes", type=int, default=2, help="volumes per throughput mode")
    args = parser.parse_args(argv)
    args.preset = args.preset or ("tiny" if args.dry_run else "paper")
    if args.threads is None and args.dry_run:
        args.threads = 1  # a shared CPU: more threads than free cores only spin
    if args.budget_s is None:
        args.budget_s = 60.0 if args.dry_run else 480.0
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="caldm-gpu-dry-") if args.dry_run else str(RESULTS)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return Suite(args).run()
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
