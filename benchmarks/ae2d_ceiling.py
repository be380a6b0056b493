"""What the slice autoencoder alone keeps: Dec2D(Enc2D(x)) of held-out volumes, scored.

    python benchmarks/ae2d_ceiling.py --bundle B --heldout DATA --segmenter FILE

For a bundle with ``enc2d`` and ``dec2d`` (an ``ae2d`` run's bundle is enough: no adaptors, no
diffusion), every held-out volume with layer and vessel labels is encoded and decoded slice by
slice and compared with itself: layer Dice of a layers segmenter (``jobs/downstream.py``'s
``segmenter_real.safetensors``) on the volume and on its reconstruction, the en-face vessel
contrast of both (:func:`caldm.metrics.vessel_contrast`), and their total variation. Any sampler
decodes through this autoencoder, so these bound what synthetic volumes can show.

With ``--decm`` (a bundle with ``adaptors``) the latent slices are decoded as generation decodes
them (DecM, the bundle's ``sampling.decode`` mode) and the slice-consistency ratios
(:data:`caldm.metrics.SLICE_CONSISTENCY`, reconstruction/real) join the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

import numpy as np  # noqa: E402
import torch  # noqa: E402


@torch.inference_mode()
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, help="bundle with enc2d and dec2d")
    p.add_argument("--heldout", required=True, help="held-out dataset with layer and vessel labels")
    p.add_argument("--segmenter", required=True, help="layers segmenter file")
    p.add_argument("--decm", action="store_true", help="decode through DecM (needs adaptors)")
    a = p.parse_args(argv)

    from caldm.bundle import load_bundle
    from caldm.data.io import read_bytes
    from caldm.data.preprocess import from_unit_range, resize, to_unit_range
    from caldm.metrics import (
        ColumnPersistence,
        MeanDice,
        slice_consistency,
        total_variation,
        vessel_contrast,
    )
    from caldm.nn.inferers import SliceDecoder
    from caldm.nn.nets.dec_m import DecM
    from caldm.nn.nets.segmenter import segment_volume, segmenter_from_bytes
    from caldm.segmentation import iter_pairs

    nets = load_bundle(a.bundle, ["enc2d", "dec2d", *(["adaptors"] if a.decm else [])])
    decm = DecM(nets["dec2d"], nets["adaptors"] if a.decm else None).eval()
    m_cfg, s_cfg = nets.cfg.model, nets.cfg.sampling
    shape = tuple(nets.cfg.model.image_shape)  # the grid the autoencoder was trained on

    def decode(z: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(z), *shape[1:])

        def emit(start: int, x: torch.Tensor) -> None:
            out[start : start + len(x)] = x[:, 0]

        halo = m_cfg.k // 2 if decm.adaptors is not None else 0  # as the sampler
        dec = SliceDecoder(decm, len(z), s_cfg.decode, m_cfg.k, s_cfg.decode_chunk, halo, emit)
        dec.push(z)
        dec.close()
        return out

    model, cfg = segmenter_from_bytes(read_bytes(a.segmenter), a.segmenter)
    dice = {"real": MeanDice(cfg.num_classes), "rec": MeanDice(cfg.num_classes)}
    contrast: dict[str, list[float]] = {"real": [], "rec": []}
    tv: dict[str, list[float]] = {"real": [], "rec": []}
    strips: dict[str, dict[str, list[float]]] = {"real": {}, "rec": {}}
    columns: dict[str, list[float]] = {"real": [], "rec": []}
    for pl in iter_pairs(a.heldout, "layers", cfg.num_classes):
        (pv,) = iter_pairs(a.heldout, "vessels", 3, ids=[pl.id])  # the same volume's vessels
        unit = resize(to_unit_range(pl.volume), shape, order="linear")
        x = torch.from_numpy(unit.astype(np.float32))[:, None]
        z = torch.cat([nets["enc2d"](chunk)[0] for chunk in x.split(32)])
        dec = decode(z).clamp(-1, 1)
        rec = from_unit_range(resize(dec.numpy(), pl.volume.shape, order="linear"))
        for name, volume in (("real", pl.volume), ("rec", rec)):
            dice[name](segment_volume(model, cfg, volume), pl.label)
            contrast[name].append(vessel_contrast(volume, pv.label))
            tv[name].append(total_variation(to_unit_range(volume) * 0.5 + 0.5))
            for key, value in slice_consistency(volume).items():
                strips[name].setdefault(key, []).append(value)
            columns[name].append(ColumnPersistence()(volume))
    m = {k: {n: float(np.mean(v)) for n, v in d.items()} for k, d in
         (("dice", {n: s.values for n, s in dice.items()}), ("contrast", contrast), ("tv", tv))}
    ratios = {k: np.mean(strips["rec"][k]) / np.mean(strips["real"][k]) for k in strips["rec"]}
    print(f"| bundle | decoder | layer Dice (real {m['dice']['real']:.3f}) | vessel contrast "
          f"(real {m['contrast']['real']:.2f}) | TV ratio | " + " | ".join(ratios)
          + f" | column persistence (real {np.mean(columns['real']):.2f}) |")
    print("|---|---|---|---|---|" + "---|" * (len(ratios) + 1))
    print(f"| {a.bundle} | {'DecM ' + s_cfg.decode if a.decm else 'Dec2D'} | "
          f"{m['dice']['rec']:.3f} | {m['contrast']['rec']:.2f} | "
          f"{m['tv']['rec'] / m['tv']['real']:.2f} | "
          + " | ".join(f"{r:.2f}" for r in ratios.values())
          + f" | {np.mean(columns['rec']):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
