"""Where label fidelity is lost: the segmenter's Dice along CA-LDM's path, stage by stage.

    python benchmarks/fidelity_ceiling.py --bundle B --heldout DATA --segmenter FILE [--markdown F]

For every held-out real volume (with its layer label) the segmenter (from ``jobs/downstream.py``
or the main job's ``downstream/segmenter_real.safetensors``) segments five versions of it, each
scored (Dice, boundary MAD) against the volume's own label:

| row | what the segmenter sees | what it bounds |
|---|---|---|
| real | the volume itself | the segmenter |
| ae2d | DecM(Enc2D(x)), slice by slice | any sampler: the slice autoencoder's loss |
| nhae | DecM(f_sr(Enc3D(x))) | a perfect Diff3D without the refiner |
| refiner | DecM(Diff_slice(f_sr(Enc3D(x)) / label)) | a perfect Diff3D |
| sampled | the full sampler guided by the label | what generation gives |

A row far below the one above it names the stage that loses the label. The bundle must be a
conditioned (``layers``) bundle with the refiner, the adaptors and the NHAE encoders.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROWS = ("real", "ae2d", "nhae", "refiner", "sampled")


def decoded(pipe, z: torch.Tensor, labels, seed: int, refine: bool) -> np.ndarray:  # noqa: ANN001
    """Latent slices ``(c, D, H', W')`` through the sampler's own slice path
    (:meth:`CALDMPipeline.refine_and_decode`): refined with ``labels`` first, or decoded as
    they are."""
    from caldm.data.preprocess import from_unit_range
    from caldm.streaming import ArraySink

    s = pipe.cfg.sampling
    sink = ArraySink(tuple(pipe.cfg.model.image_shape))

    def emit(start: int, out: torch.Tensor) -> None:
        sink(start, from_unit_range(out[:, 0].float().cpu()))

    pipe.refine_and_decode(z, seed, labels, s.refiner_sampler or s.sampler,
                           s.refiner_steps or s.steps, None, emit, refine=refine)  # fmt: skip
    return sink.result()


@torch.inference_mode()
def ceiling(
    bundle: str, heldout: str, segmenter: str, seed: int = 0, guidance: float | None = None
) -> dict[str, dict]:
    """``{row: {"dice": {"mean", "std"}, "mad": {...}, "n"}}`` over the held-out volumes."""
    from caldm.bundle import load_bundle
    from caldm.data.io import read_bytes
    from caldm.data.preprocess import resize, to_unit_range
    from caldm.distributed.encode import NEEDS, encode_volume
    from caldm.metrics import BoundaryMAD, MeanDice
    from caldm.nn.nets.segmenter import segment_volume, segmenter_from_bytes
    from caldm.pipeline import CALDMPipeline
    from caldm.segmentation import iter_pairs, nan_mean_std

    model, seg_cfg = segmenter_from_bytes(read_bytes(segmenter), segmenter)
    pipe = CALDMPipeline.from_bundle(bundle, device="cpu", offload=False)
    if guidance is not None:
        pipe.cfg.sampling.guidance_scale = guidance
    nets = load_bundle(bundle, NEEDS, device="cpu")
    shape = tuple(pipe.cfg.model.image_shape)
    scores = {r: (MeanDice(seg_cfg.num_classes), BoundaryMAD(seg_cfg.num_classes)) for r in ROWS}
    for pair in iter_pairs(heldout, "layers", seg_cfg.num_classes):
        unit = resize(to_unit_range(pair.volume), shape, order="linear")
        lat = {k: torch.from_numpy(v) for k, v in encode_volume(nets, unit, pipe.cfg).items()}
        labels = pipe.prepare_labels(pair.label, pair.label_url)
        versions = {
            "real": pair.volume,
            "ae2d": decoded(pipe, lat["z_hr"], labels, seed, refine=False),
            "nhae": decoded(pipe, lat["z_sr"], labels, seed, refine=False),
            "refiner": decoded(pipe, lat["z_sr"], labels, seed, refine=True),
            "sampled": pipe.sample(seed=seed, labels=labels),
        }
        for row, volume in versions.items():
            if volume.shape != pair.label.shape:
                volume = resize(volume.astype(np.float32), pair.label.shape, order="linear")
            pred = segment_volume(model, seg_cfg, np.asarray(volume))
            for scorer in scores[row]:
                scorer(pred, pair.label)
        print(f"fidelity_ceiling: {pair.id} done", file=sys.stderr)
    return {
        row: {"dice": nan_mean_std(d.values), "mad": nan_mean_std(m.values), "n": len(d.values)}
        for row, (d, m) in scores.items()
    }


def markdown(result: dict[str, dict], bundle: str, heldout: str) -> str:
    lines = [f"Bundle `{bundle}`, held-out volumes `{heldout}` ({result['real']['n']}).", "",
             "| row | Dice | MAD (px) | Dice / real |", "|---|---|---|---|"]
    real = result["real"]["dice"]["mean"]
    for row in ROWS:
        d, m = result[row]["dice"], result[row]["mad"]
        lines.append(f"| {row} | {d['mean']:.3f} ± {d['std']:.3f} | {m['mean']:.2f} ± "
                     f"{m['std']:.2f} | {d['mean'] / real:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, help="conditioned (layers) bundle")
    parser.add_argument("--heldout", required=True, help="held-out real dataset with layer labels")
    parser.add_argument("--segmenter", required=True, help="segmenter file (jobs/downstream.py)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance-scale", type=float,
                        help="classifier-free guidance scale (default: the bundle's)")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    result = ceiling(args.bundle, args.heldout, args.segmenter, args.seed, args.guidance_scale)
    table = markdown(result, args.bundle, args.heldout)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
