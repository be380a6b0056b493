"""Where label fidelity is lost: a segmenter's scores along CA-LDM's path, stage by stage.

    python benchmarks/fidelity_ceiling.py --bundle B --heldout DATA --segmenter FILE [--markdown F]

For every held-out real volume (with its label of the bundle's kind) the segmenter (from
``jobs/downstream.py`` or the main job's ``downstream/segmenter_real.safetensors``) segments
five versions of it, each scored against the volume's own label (layers: Dice, boundary MAD;
vessels: IoU-A, IoU-V, vessel contrast):

| row | what the segmenter sees | what it bounds |
|---|---|---|
| real | the volume itself | the segmenter |
| ae2d | DecM(Enc2D(x)), slice by slice | any sampler: the slice autoencoder's loss |
| nhae | DecM(f_sr(Enc3D(x))) | a perfect Diff3D without the refiner |
| refiner | DecM(Diff_slice(f_sr(Enc3D(x)) / label)) | a perfect Diff3D |
| sampled | the full sampler guided by the label | what generation gives |

A row far below the one above it names the stage that loses the label. The bundle must be a
conditioned bundle with the refiner, the adaptors and the NHAE encoders; a ``vessels`` bundle
is scored with IoU-A, IoU-V and the en-face vessel contrast instead of Dice and MAD.
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
    from caldm.data.sinks import ArraySink

    s = pipe.cfg.sampling
    sink = ArraySink(tuple(pipe.cfg.model.image_shape))

    def emit(start: int, out: torch.Tensor) -> None:
        sink(start, from_unit_range(out[:, 0].float().cpu()))

    pipe.refine_and_decode(z, seed, labels, s.refiner_sampler or s.sampler,
                           s.refiner_steps or s.steps, None, emit, refine=refine)  # fmt: skip
    return sink.result()


class RowScores:
    """One row's per-volume scores for the bundle's task: Dice and boundary MAD (layers), or
    IoU-A, IoU-V and the en-face vessel contrast (vessels)."""

    def __init__(self, task: str, num_classes: int) -> None:
        from caldm import metrics

        self.task = task
        if task == "layers":
            self.dice, self.mad = metrics.MeanDice(num_classes), metrics.BoundaryMAD(num_classes)
        else:
            self.iou = metrics.ArteryVeinIoU()
            self.contrast: list[float] = []

    def __call__(self, pred: np.ndarray, label: np.ndarray, volume: np.ndarray) -> None:
        from caldm.metrics import vessel_contrast

        if self.task == "layers":
            self.dice(pred, label)
            self.mad(pred, label)
        else:
            self.iou(pred, label)
            self.contrast.append(vessel_contrast(volume, label))

    def summary(self) -> dict:
        from caldm.segmentation import nan_mean_std

        if self.task == "layers":
            values = {"dice": self.dice.values, "mad": self.mad.values}
        else:
            values = {k: [v[k] for v in self.iou.values] for k in ("iou_a", "iou_v")}
            values["vessel_contrast"] = self.contrast
        out = {k: nan_mean_std(v) for k, v in values.items()}
        out["n"] = len(next(iter(values.values())))
        return out


class StagePath:
    """One volume through every stage of a conditioned bundle's path (the rows of
    :data:`ROWS`), on the bundle's image grid and back; loads the bundle once."""

    def __init__(self, bundle: str, guidance: float | None = None) -> None:
        from caldm.bundle import load_bundle
        from caldm.distributed.encode import NEEDS
        from caldm.pipeline import CALDMPipeline

        self.pipe = CALDMPipeline.from_bundle(bundle, device="cpu", offload=False)
        if guidance is not None:
            self.pipe.cfg.sampling.guidance_scale = guidance
        self.nets = load_bundle(bundle, NEEDS, device="cpu")

    @torch.inference_mode()
    def versions(self, pair, seed: int, rows: tuple[str, ...] = ROWS) -> dict[str, np.ndarray]:  # noqa: ANN001
        """``{row: volume}`` for a :class:`caldm.segmentation.Pair`, each at the pair's shape:
        the volume itself, its autoencoded, NHAE-decoded and refined versions (from its own
        latents) and a sample guided by its label. ``seed`` seeds the refiner and the sampler
        (Dec2D's noise is keyed by its latent: the autoencoded rows do not change with it)."""
        from caldm.data.preprocess import resize, to_unit_range
        from caldm.distributed.encode import encode_volume

        pipe = self.pipe
        unit = resize(to_unit_range(pair.volume), tuple(pipe.cfg.model.image_shape), order="linear")
        lat = {k: torch.from_numpy(v) for k, v in encode_volume(self.nets, unit, pipe.cfg).items()}
        labels = pipe.prepare_labels(pair.label, pair.label_url)
        make = {
            "real": lambda: pair.volume,
            "ae2d": lambda: decoded(pipe, lat["z_hr"], labels, seed, refine=False),
            "nhae": lambda: decoded(pipe, lat["z_sr"], labels, seed, refine=False),
            "refiner": lambda: decoded(pipe, lat["z_sr"], labels, seed, refine=True),
            "sampled": lambda: pipe.sample(seed=seed, labels=labels),
        }
        out = {}
        for row in rows:
            volume = np.asarray(make[row]())
            if volume.shape != pair.volume.shape:
                volume = resize(volume.astype(np.float32), pair.volume.shape, order="linear")
            out[row] = volume
        return out


def ceiling(
    bundle: str, heldout: str, segmenter: str, seed: int = 0, guidance: float | None = None
) -> dict[str, dict]:
    """``{row: {metric: {"mean", "std"}, ..., "n"}}`` over the held-out volumes; the metrics
    are those of the bundle's condition (layers: dice, mad; vessels: iou_a, iou_v,
    vessel_contrast)."""
    from caldm.data.io import read_bytes
    from caldm.nn.nets.segmenter import segment_volume, segmenter_from_bytes
    from caldm.segmentation import iter_pairs

    model, seg_cfg = segmenter_from_bytes(read_bytes(segmenter), segmenter)
    path = StagePath(bundle, guidance)
    task = path.pipe.condition
    if task != seg_cfg.task:
        raise SystemExit(f"{segmenter}: a {seg_cfg.task} segmenter for a {task} bundle")
    scores = {r: RowScores(task, seg_cfg.num_classes) for r in ROWS}
    for pair in iter_pairs(heldout, task, seg_cfg.num_classes):
        for row, volume in path.versions(pair, seed).items():
            scores[row](segment_volume(model, seg_cfg, volume), pair.label, volume)
        print(f"fidelity_ceiling: {pair.id} done", file=sys.stderr)
    return {row: s.summary() for row, s in scores.items()}


def markdown(result: dict[str, dict], bundle: str, heldout: str) -> str:
    from caldm.segmentation import METRIC_NAMES

    keys = [k for k in result["real"] if k != "n"]
    first = keys[0]
    names = [METRIC_NAMES.get(k, k.replace("_", " ")) for k in keys]
    lines = [f"Bundle `{bundle}`, held-out volumes `{heldout}` ({result['real']['n']}).", "",
             "| row | " + " | ".join(names) + f" | {names[0]} / real |",
             "|---|" + "---|" * (len(keys) + 1)]
    real = result["real"][first]["mean"]
    for row in ROWS:
        cells = [f"{result[row][k]['mean']:.3f} ± {result[row][k]['std']:.3f}" for k in keys]
        ratio = result[row][first]["mean"] / real
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {ratio:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, help="conditioned (layers or vessels) bundle")
    parser.add_argument("--heldout", required=True,
                        help="held-out real dataset (labels of the bundle's kind)")
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
