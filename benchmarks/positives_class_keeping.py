"""Do the synthetic positives keep their anchor's class?

Draws positives for real digits anchors with the interpolated sampler at several weights and asks a
classifier trained on the real digits which class each positive shows. At w = 1 the anchor is ignored
(plain unconditional sampling), so agreement sits near chance (about 10%); the method needs w = 0.1 to
keep the class far more often.

    python benchmarks/positives_class_keeping.py [--unet FOLDER] [--anchors 200] [--weights 0.1,1.0]

Prints a table and writes benchmarks/results/positives_class_keeping.json.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np
import torch

from clsp.datasets import get_dataset
from clsp.generate import sample_positives
from clsp.generate.unet import default_unet_for, load_unet
from clsp.io import write_json_atomic
from digits_reference import fit_reference_classifier, grey
from clsp.errors import Command

RESULTS = Path(__file__).parent / "results" / "positives_class_keeping.json"


@click.command(cls=Command, context_settings={"show_default": True})
@click.option("--unet", default=None, help="Model folder [default: the shipped digits model].")
@click.option("--anchors", "num_anchors", type=int, default=200, help="Test-split anchors.")
@click.option("--candidates", type=int, default=4)
@click.option("--steps", type=int, default=50)
@click.option("--eta", type=float, default=0.1)
@click.option("--weights", default="0.1,1.0", help="Comma-separated interpolation weights.")
@click.option("--seed", type=int, default=0)
@click.option("--out", type=click.Path(dir_okay=False), default=str(RESULTS))
def main(unet: str | None, num_anchors: int, candidates: int, steps: int, eta: float, weights: str, seed: int,
         out: str) -> None:
    classifier, _ = fit_reference_classifier()
    test = get_dataset("digits", "test")
    index = np.arange(min(num_anchors, len(test)))
    labels = test.labels()[index]
    anchors = torch.from_numpy(test.array(index)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    model, scheduler = load_unet(unet or default_unet_for("digits"))
    rows = []
    for weight in (float(w) for w in weights.split(",")):
        started = time.time()
        generators = [torch.Generator().manual_seed(seed * 100_003 + int(i)) for i in index]
        images = sample_positives(model, scheduler, anchors, candidates, weight=weight, steps=steps, eta=eta,
                                  generator=generators)
        pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()
        predicted = classifier.predict(grey(pixels.reshape(-1, *pixels.shape[2:]))).reshape(len(index), candidates)
        keep = (predicted == labels[:, None]).mean()
        rows.append({"weight": weight, "class_kept": float(keep),
                     "anchors_with_all_candidates_kept": float((predicted == labels[:, None]).all(1).mean()),
                     "seconds": round(time.time() - started, 1)})
    chance = float(np.max(np.bincount(labels, minlength=10)) / len(labels))
    click.echo(f"{len(index)} test anchors x {candidates} candidates, {steps} DDIM steps, eta {eta}")
    click.echo(f"{'weight':>8}{'class kept':>12}{'all k kept':>12}{'seconds':>9}")
    for row in rows:
        click.echo(f"{row['weight']:>8.2f}{row['class_kept']:>12.3f}"
                   f"{row['anchors_with_all_candidates_kept']:>12.3f}{row['seconds']:>9.1f}")
    click.echo(f"chance (most frequent class): {chance:.3f}")
    write_json_atomic(out, {"anchors": len(index), "candidates": candidates, "steps": steps, "eta": eta,
                            "seed": seed, "chance": chance, "rows": rows})
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
