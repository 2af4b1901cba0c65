"""``clsp-eval`` (also ``clsp eval``): stage 3, evaluation of encoders and of the synthetic positives.

Every command writes ``results.json`` (merged per command and dataset) and appends a section to
``report.md`` in its run directory (``--out``, by default the encoder's directory). Features are
cached under ``RUN_DIR/feature-cache`` and reused by every command until the encoder changes.

    clsp-eval linear --encoder runs/clsp --dataset cifar10
    clsp-eval knn --encoder runs/clsp --dataset cifar10
    clsp-eval positives --encoder runs/clsp --shards shards/cifar10
    clsp-eval compare --run clsp=runs/clsp --run baseline=runs/simclr --dataset cifar10
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import click

from clsp.errors import Group
from clsp.datasets import DEFAULT_DATA_ROOT

_SETTINGS = {"show_default": True, "help_option_names": ["-h", "--help"]}


def _encoder_options(func: Callable) -> Callable:
    """Options every encoder evaluation shares."""
    options = [
        click.option("--encoder", required=True, type=click.Path(),
                     help="Exported encoder directory (clsp-train --out)."),
        click.option("--out", "run_dir", default=None, type=click.Path(),
                     help="Run directory for results.json and report.md [default: the encoder directory]."),
        click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
                     help="Feature cache [default: RUN_DIR/feature-cache]."),
        click.option("--data-root", default=DEFAULT_DATA_ROOT, help="Where datasets are stored or downloaded."),
        click.option("--batch-size", type=int, default=256,
                     help="Images per feature-extraction (and classifier) batch."),
        click.option("--seed", type=int, default=0, help="Seed of every random choice the command makes."),
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), func)


def _download_option(func: Callable) -> Callable:
    return click.option("--download/--no-download", default=True,
                        help="Download torchvision datasets that are missing under --data-root.")(func)


def _linear_options(func: Callable) -> Callable:
    options = [
        click.option("--epochs", type=int, default=100, help="Classifier epochs (lr x0.1 at 60% and 80% of them)."),
        click.option("--lr", type=float, default=1.0, help="SGD learning rate (momentum 0.9, no weight decay)."),
        click.option("--flip", is_flag=True, help="Flip-augmented protocol: each epoch sees randomly flipped images."),
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), func)


class _Context:
    """The loaded encoder and where this command's outputs go."""

    def __init__(self, encoder: str, run_dir: str | None, cache_dir: str | None) -> None:
        from clsp.evaluate.features import load_frozen_encoder

        self.encoder = load_frozen_encoder(encoder)
        self.run_dir = Path(run_dir) if run_dir else self.encoder.path
        self.cache_dir = Path(cache_dir) if cache_dir else self.run_dir / "feature-cache"
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def finish(self, command: str, payloads: list[dict[str, Any]], summary: str) -> None:
        from clsp.evaluate.report import append_report, command_section, record_result

        for payload in payloads:
            record_result(self.run_dir, command, payload["dataset"], payload)
        section = {"rows": payloads} if command == "transfer" else payloads[0]
        report = append_report(self.run_dir, *command_section(command, section, self.run_dir))
        click.echo(summary)
        click.echo(f"results: {self.run_dir / 'results.json'}; report: {report}")


@click.group(cls=Group, context_settings=_SETTINGS)
def evaluate() -> None:
    """Stage 3: evaluate encoders (linear, kNN, transfer, t-SNE) and the synthetic positives."""


@evaluate.command(context_settings=_SETTINGS)
@_encoder_options
@_download_option
@click.option("--dataset", default="digits", help="Labelled dataset (digits, cifar10, imagefolder:PATH, ...).")
@_linear_options
def linear(encoder: str, run_dir: str | None, cache_dir: str | None, data_root: str, download: bool, batch_size: int,
           seed: int, dataset: str, epochs: int, lr: float, flip: bool) -> None:
    """Linear probe on frozen features: top-1 and top-5 on the test split."""
    from clsp.evaluate.features import labelled_splits
    from clsp.evaluate.linear import linear_protocol

    ctx = _Context(encoder, run_dir, cache_dir)
    train, test = labelled_splits(dataset, "linear", root=data_root, download=download,
                                  image_size=ctx.encoder.arch.get("image_size"))
    result = linear_protocol(ctx.encoder, train, test, epochs=epochs, lr=lr, batch_size=batch_size, flip=flip,
                             seed=seed, cache_dir=ctx.cache_dir, log_dir=ctx.run_dir / "tb" / "linear")
    ctx.finish("linear", [result], f"linear {dataset}: top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}")


@evaluate.command(context_settings=_SETTINGS)
@_encoder_options
@_download_option
@click.option("--dataset", default="digits", help="Labelled dataset (digits, cifar10, imagefolder:PATH, ...).")
@click.option("--k", "ks", type=int, multiple=True, default=(5, 10, 20, 50, 100, 200),
              help="Neighbour counts to try (repeatable); each is capped at the training-set size.")
@click.option("--temperature", type=float, default=0.07, help="Vote weight exp(similarity / temperature).")
def knn(encoder: str, run_dir: str | None, cache_dir: str | None, data_root: str, download: bool, batch_size: int,
        seed: int, dataset: str, ks: tuple[int, ...], temperature: float) -> None:
    """Weighted cosine kNN on frozen features: best top-1 and the table over k."""
    from clsp.errors import UserError
    from clsp.evaluate.features import labelled_splits
    from clsp.evaluate.knn import knn_protocol

    if any(k < 1 for k in ks):
        raise UserError(f"--k must be positive, got {', '.join(map(str, ks))}")
    ctx = _Context(encoder, run_dir, cache_dir)
    train, test = labelled_splits(dataset, "kNN", root=data_root, download=download,
                                  image_size=ctx.encoder.arch.get("image_size"))
    result = knn_protocol(ctx.encoder, train, test, ks=ks, temperature=temperature, batch_size=batch_size,
                          cache_dir=ctx.cache_dir)
    ctx.finish("knn", [result], f"kNN {dataset}: best top-1 {result['best_top1']:.2f} (k={result['best_k']})")


@evaluate.command(context_settings=_SETTINGS)
@_encoder_options
@_download_option
@click.option("--datasets", required=True, help="Comma-separated labelled datasets, e.g. cifar10,imagefolder:PATH.")
@_linear_options
def transfer(encoder: str, run_dir: str | None, cache_dir: str | None, data_root: str, download: bool,
             batch_size: int, seed: int, datasets: str, epochs: int, lr: float, flip: bool) -> None:
    """Linear transfer to other datasets: the linear protocol on each, one table for all."""
    from clsp.evaluate.transfer import parse_datasets, transfer_protocol

    names = parse_datasets(datasets)
    ctx = _Context(encoder, run_dir, cache_dir)
    rows = transfer_protocol(ctx.encoder, names, root=data_root, download=download, epochs=epochs, lr=lr,
                             batch_size=batch_size, flip=flip, seed=seed, cache_dir=ctx.cache_dir,
                             log_dir=ctx.run_dir / "tb")
    ctx.finish("transfer", rows, "\n".join(f"transfer {r['dataset']}: top-1 {r['top1']:.2f}  top-5 {r['top5']:.2f}"
                                           for r in rows))


@evaluate.command(context_settings=_SETTINGS)
@_encoder_options
@click.option("--shards", required=True, type=click.Path(file_okay=False), help="Shard directory (clsp-gen --shards).")
@click.option("--limit", type=int, default=None, help="Only the first N anchors.")
@click.option("--png", default=None, type=click.Path(dir_okay=False),
              help="Histogram of the similarities [default: RUN_DIR/positives-similarity.png].")
def positives(encoder: str, run_dir: str | None, cache_dir: str | None, data_root: str, batch_size: int, seed: int,
              shards: str, limit: int | None, png: str | None) -> None:
    """How hard the synthetic positives are, and whether they keep the anchor's class."""
    from clsp.evaluate.positives import positives_stats

    ctx = _Context(encoder, run_dir, cache_dir)
    result = positives_stats(ctx.encoder, shards, data_root=data_root, batch_size=batch_size, limit=limit, seed=seed,
                             cache_dir=ctx.cache_dir, histogram=png or ctx.run_dir / "positives-similarity.png")
    means = {name: s["mean"] for name, s in result["similarity"].items()}
    agreement = result["label_agreement"]
    ctx.finish("positives", [result], "positives: mean similarity " + ", ".join(
        f"{name.replace('_', ' ')} {'n/a' if v is None else f'{v:.3f}'}" for name, v in means.items())
        + ("" if agreement is None else f"; label agreement {agreement:.3f}"))


@evaluate.command("embed-plot", context_settings=_SETTINGS)
@_encoder_options
@_download_option
@click.option("--dataset", default="digits", help="Dataset whose test split is plotted.")
@click.option("--png", default=None, type=click.Path(dir_okay=False),
              help="Output PNG [default: RUN_DIR/tsne-DATASET.png]; an --out ending in .png is taken as the PNG.")
@click.option("--max-points", type=int, default=2000, help="Plot at most this many test images (random subset).")
@click.option("--perplexity", type=float, default=30.0, help="t-SNE perplexity (capped for few points).")
def embed_plot(encoder: str, run_dir: str | None, cache_dir: str | None, data_root: str, download: bool,
               batch_size: int, seed: int, dataset: str, png: str | None, max_points: int, perplexity: float) -> None:
    """A 2-D t-SNE of test features coloured by label, as PNG."""
    import re

    from clsp.evaluate.embed_plot import embed_plot as plot

    if run_dir and run_dir.lower().endswith(".png") and png is None:
        run_dir, png = str(Path(run_dir).parent), run_dir
    ctx = _Context(encoder, run_dir, cache_dir)
    png = png or ctx.run_dir / f"tsne-{re.sub(r'[^A-Za-z0-9_.-]+', '_', dataset)}.png"
    result = plot(ctx.encoder, dataset, png, root=data_root, download=download, max_points=max_points,
                  perplexity=perplexity, seed=seed, batch_size=batch_size, cache_dir=ctx.cache_dir)
    ctx.finish("embed-plot", [result], f"t-SNE of {result['points']} {dataset} test images: {result['png']}")


@evaluate.command(context_settings=_SETTINGS)
@click.option("--run", "runs", multiple=True, required=True, metavar="LABEL=RUN_DIR",
              help="A run directory with results.json, under a label (repeatable), e.g. clsp=runs/clsp.")
@click.option("--dataset", default="digits", help="Dataset whose results are compared.")
@click.option("--out", default="report.md", type=click.Path(), help="Markdown file to write.")
def compare(runs: tuple[str, ...], dataset: str, out: str) -> None:
    """Put runs side by side (linear, kNN, positives) beside the paper's numbers."""
    from clsp.errors import UserError
    from clsp.evaluate.report import write_report

    pairs = [run.split("=", 1) for run in runs]
    bad = [run for run, pair in zip(runs, pairs) if len(pair) != 2 or not Path(pair[1]).is_dir()]
    if bad:
        raise UserError(f"--run {bad[0]!r} is not LABEL=RUN_DIR with an existing directory")
    click.echo(f"report: {write_report(dict(pairs), out, dataset)}")


main = evaluate

if __name__ == "__main__":
    main()
