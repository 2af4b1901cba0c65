"""Is the trained encoder better than the same network untrained?

Exports a randomly initialised copy of a trained encoder's architecture (same backbone, stem, image
size and normalisation) and runs the same linear probe and kNN evaluation on both, so the README can
put the trained number beside its floor.

    python benchmarks/random_init_probe.py --encoder runs/digits/train/baseline --dataset digits

Prints a table and writes benchmarks/results/random_init_probe.json.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
import torch

from clsp.datasets import DEFAULT_DATA_ROOT
from clsp.errors import Command
from clsp.evaluate.features import labelled_splits, load_frozen_encoder
from clsp.evaluate.knn import knn_protocol
from clsp.evaluate.linear import linear_protocol
from clsp.io import write_json_atomic
from clsp.train.backbones import EncoderCard, build_backbone, export_encoder

RESULTS = Path(__file__).parent / "results" / "random_init_probe.json"


def _evaluate(encoder_dir: Path, dataset: str, data_root: str, epochs: int, seed: int, protocol: str) -> dict:
    encoder = load_frozen_encoder(encoder_dir)
    train, test = labelled_splits(dataset, "linear", root=data_root, download=False, image_size=None)
    linear = linear_protocol(encoder, train, test, protocol=protocol, epochs=epochs, seed=seed)
    knn = knn_protocol(encoder, train, test)
    return {"linear_top1": linear["top1"], "linear_top5": linear["top5"], "knn_best_top1": knn["best_top1"]}


@click.command(cls=Command, context_settings={"show_default": True})
@click.option("--encoder", "encoder_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--dataset", default="digits")
@click.option("--data-root", default=DEFAULT_DATA_ROOT)
@click.option("--epochs", type=int, default=100, help="Linear-probe epochs.")
@click.option("--seed", type=int, default=0, help="Seed of the random initialisation and of the probe.")
@click.option("--protocol", type=click.Choice(["authors", "standardized"]), default="authors",
              help="Linear-probe protocol (clsp-eval linear --protocol).")
@click.option("--out", type=click.Path(dir_okay=False), default=str(RESULTS))
def main(encoder_dir: str, dataset: str, data_root: str, epochs: int, seed: int, protocol: str, out: str) -> None:
    card = EncoderCard.read(Path(encoder_dir) / "encoder.json")
    torch.manual_seed(seed)
    untrained = build_backbone(card.backbone, card.stem)
    rows = {"trained": _evaluate(Path(encoder_dir), dataset, data_root, epochs, seed, protocol)}
    with tempfile.TemporaryDirectory() as tmp:
        export_encoder(untrained, tmp, card)
        rows["random init"] = _evaluate(Path(tmp), dataset, data_root, epochs, seed, protocol)
    arch = card.model_dump()
    click.echo(f"{card.backbone} on {dataset}: {card.method} (lambda {card.clsp_lambda}), {protocol} probe")
    click.echo(f"{'encoder':14}{'linear top-1':>14}{'linear top-5':>14}{'kNN top-1':>11}")
    for name, row in rows.items():
        click.echo(f"{name:14}{row['linear_top1']:>14.2f}{row['linear_top5']:>14.2f}{row['knn_best_top1']:>11.2f}")
    write_json_atomic(out, {"encoder": arch, "dataset": dataset, "linear_epochs": epochs, "protocol": protocol,
                            "seed": seed, "rows": rows})
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
