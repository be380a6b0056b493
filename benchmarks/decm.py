"""DecM measured: how adaptors trained one way decode another, on a trained autoencoder.

    PYTHONPATH=$PWD python benchmarks/decm.py --bundle DIR [--steps 100] [--count 4]

From a bundle with trained Enc2D/Dec2D (e.g. the main job's ``runs/ae2d/bundle``), adaptors
are trained here with the adaptor stage's own step (:func:`caldm.stages.adaptor_step`, the
hybrid loss without the GAN, Adam at the preset's lr) under each recipe:

- ``center_mix0``: the recipe before issue 13: k-slice windows, loss on the center slice,
  ``mix`` adaptors starting at alpha 0;
- ``chunk_mix05``: decode-chunk windows, loss on every chunk slice, ``mix`` at alpha 0.5 (the
  released code's start);
- ``chunk_residual``: decode-chunk windows, zero-conv ``residual`` adaptors (the new default).

Then held-out phantom volumes are encoded slice by slice (Enc2D means) and decoded by Dec2D
alone and by each DecM in ``exact`` (Eq. 1) and ``chunked`` mode. Reported per row: L1 and PSNR
against the real volume, the slice-consistency measures synthetic/real, the mean abs(alpha), the
exact-vs-chunked difference and seconds per volume of each mode (medians). Writes
``benchmarks/results/decm_<device>.md`` / ``.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from benchmarks.fidelity import heldout_phantoms  # noqa: E402
from caldm import metrics  # noqa: E402
from caldm.bundle import load_bundle  # noqa: E402
from caldm.data.datasets import SliceWindowDataset  # noqa: E402
from caldm.data.preprocess import to_unit_range  # noqa: E402
from caldm.nn.factory import build  # noqa: E402
from caldm.nn.inferers import SliceDecoder  # noqa: E402
from caldm.nn.losses import HybridLoss  # noqa: E402
from caldm.nn.nets.dec_m import DecM  # noqa: E402
from caldm.stages import StepContext, adaptor_step  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RECIPES = {  # name: (form, alpha_init, training chunk or None for the decode chunk)
    "center_mix0": ("mix", 0.0, 1),
    "chunk_mix05": ("mix", 0.5, None),
    "chunk_residual": ("residual", 1.0, None),
}


def train_adaptors(bundle, data: str, recipe: str, steps: int, seed: int = 0) -> torch.nn.Module:
    form, alpha, chunk = RECIPES[recipe]
    cfg = bundle.cfg.model_copy(deep=True)
    cfg.model.adaptor.form = form
    cfg.model.adaptor.alpha_init = alpha
    if chunk is not None:
        cfg.sampling.decode_chunk = chunk
    torch.manual_seed(seed)
    adaptors = build("adaptors", cfg)
    mods = {"enc2d": bundle.modules["enc2d"], "dec2d": bundle.modules["dec2d"]}
    mods["adaptors"] = adaptors
    ctx = StepContext(cfg, hybrid=HybridLoss(cfg.model.loss), generator=torch.Generator())
    opt = torch.optim.Adam(adaptors.parameters(), lr=cfg.train.lr)
    stream = iter(torch.utils.data.DataLoader(SliceWindowDataset(data, cfg, seed=seed),
                                              batch_size=cfg.train.micro_batch))
    for step in tqdm(range(steps), desc=recipe, unit="step"):
        ctx.step = step
        out = adaptor_step(mods, next(stream), ctx)
        opt.zero_grad()
        out.losses["loss"].backward()
        opt.step()
    return adaptors.eval()


@torch.inference_mode()
def decode(decm: DecM, z: torch.Tensor, mode: str, cfg) -> tuple[np.ndarray, float]:
    d = z.shape[0]
    out = np.zeros((d, *cfg.model.image_shape[1:]), np.float32)

    def emit(start: int, x: torch.Tensor) -> None:
        out[start : start + len(x)] = x[:, 0].float().numpy()

    start = time.perf_counter()
    dec = SliceDecoder(decm, d, mode, cfg.model.k, cfg.sampling.decode_chunk, cfg.model.k // 2,
                       emit)
    dec.push(z)
    dec.close()
    return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="bundle with trained enc2d and dec2d")
    p.add_argument("--data", required=True, help="training dataset root for the adaptors")
    p.add_argument("--steps", type=int, default=100, help="adaptor training steps per recipe")
    p.add_argument("--count", type=int, default=4, help="held-out phantom volumes")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    bundle = load_bundle(args.bundle, ["enc2d", "dec2d"])
    cfg = bundle.cfg
    heldout = heldout_phantoms(cfg.model.image_shape, args.count)
    reals = [to_unit_range(h[0]) for h in heldout]
    with torch.inference_mode():
        latents = [bundle.modules["enc2d"](torch.from_numpy(r[:, None]).float())[0] for r in reals]

    def score(volumes: list[np.ndarray]) -> dict[str, float]:
        row = {
            "L1": float(np.mean([np.abs(v - r).mean() for v, r in zip(volumes, reals)])),
            "PSNR": float(np.mean([10 * np.log10(4 / np.mean((v - r) ** 2))
                                   for v, r in zip(volumes, reals)])),
        }
        for name in metrics.SLICE_CONSISTENCY:
            syn = [metrics.slice_consistency(np.clip(v, -1, 1))[name] for v in volumes]
            real = [metrics.slice_consistency(r)[name] for r in reals]
            row[f"{name} syn/real"] = float(np.mean(syn) / np.mean(real))
        return row

    rows: dict[str, dict[str, float]] = {}
    plain = DecM(bundle.modules["dec2d"], None).eval()
    vols, secs = zip(*(decode(plain, z, "chunked", cfg) for z in latents))
    rows["Dec2D (no adaptors)"] = {**score(list(vols)), "s/volume": float(np.median(secs))}
    for recipe in RECIPES:
        adaptors = train_adaptors(bundle, args.data, recipe, args.steps)
        decm = DecM(bundle.modules["dec2d"], adaptors).eval()
        alpha = float(np.mean([abs(a.alpha.item()) for a in adaptors.adaptors.values()]))
        outs = {}
        for mode in ("exact", "chunked"):
            vols, secs = zip(*(decode(decm, z, mode, cfg) for z in latents))
            outs[mode] = vols
            rows[f"{recipe}, {mode}"] = {**score(list(vols)), "s/volume": float(np.median(secs)),
                                         "mean abs alpha": alpha}
        diff = np.mean([np.abs(a - b).mean() for a, b in zip(*outs.values())]) * 127.5
        rows[f"{recipe}, chunked"]["exact-chunked grey levels"] = float(diff)
        print(recipe, json.dumps(rows[f"{recipe}, exact"]), json.dumps(rows[f"{recipe}, chunked"]))
    cols = list(dict.fromkeys(itertools.chain.from_iterable(r.keys() for r in rows.values())))
    lines = ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:.4g}" if c in r else "" for c in cols)
                     + " |")
    device = "cpu"
    text = (
        f"# DecM: training recipe vs decoding mode ({device})\n\n"
        f"`PYTHONPATH=$PWD python benchmarks/decm.py --bundle {args.bundle} --data {args.data} "
        f"--steps {args.steps} --count {args.count}`\n\n"
        f"{args.count} held-out phantom volumes encoded by the bundle's Enc2D (means) and decoded; "
        f"adaptors trained {args.steps} steps per recipe (module docstring). Decode chunk "
        f"{cfg.sampling.decode_chunk}, halo {cfg.model.k // 2}. Ratios synthetic/real: 1 is "
        "ideal.\n\n" + "\n".join(lines) + "\n"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"decm_{device}.md").write_text(text)
    (RESULTS / f"decm_{device}.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
