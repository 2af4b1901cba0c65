"""``clsp-eval`` (also ``clsp eval``): stage 3, evaluation of encoders and of the synthetic positives.

Every command writes ``results.json`` (merged per command and dataset) and writes its section of
``report.md`` (replacing that section when it is run again) in its run directory (``--out``, by default the
encoder's directory). Features are cached under ``RUN_DIR/feature-cache`` and reused by every command until the
encoder changes.

    clsp-eval linear --encoder runs/clsp --dataset cifar10
    clsp-eval knn --encoder runs/clsp --dataset cifar10
    clsp-eval positives --encoder runs/clsp --shards shards/cifar10
    clsp-eval compare --run clsp=runs/clsp --run baseline=runs/simclr --dataset cifar10
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from clsp.config import click_options, parse
from clsp.errors import SETTINGS, Group, UserError
from clsp.evaluate.config import CompareJob, EmbedPlotJob, EncoderEval, KnnJob, LinearJob, PositivesJob, TransferJob
from clsp.io import check_creatable


class _Context:
    """The loaded encoder and where this command's outputs go."""

    def __init__(self, job: EncoderEval) -> None:
        from clsp.evaluate.features import load_frozen_encoder
        from clsp.evaluate.report import load_results

        self.encoder = load_frozen_encoder(job.encoder)
        self.run_dir = Path(job.out) if job.out else self.encoder.path
        load_results(self.run_dir)  # a damaged results.json is refused before the work, not after it
        self.cache_dir = Path(job.cache_dir) if job.cache_dir else self.run_dir / "feature-cache"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        check_creatable(self.cache_dir)

    @staticmethod
    def output(path: str | Path) -> Path:
        """An output file whose folder can be made: checked before the work, not after it."""
        check_creatable(Path(path).parent)
        return Path(path)

    def finish(self, command: str, payloads: list[dict[str, Any]], summary: str) -> None:
        from clsp.evaluate.report import command_section, record_result, write_section

        for payload in payloads:
            record_result(self.run_dir, command, payload["dataset"], payload)
        section = {"rows": payloads} if command == "transfer" else payloads[0]
        report = write_section(self.run_dir, *command_section(command, section, self.run_dir))
        click.echo(summary)
        click.echo(f"results: {self.run_dir / 'results.json'}; report: {report}")


@click.group(cls=Group, context_settings=SETTINGS)
def evaluate() -> None:
    """Stage 3: evaluate encoders (linear, kNN, transfer, t-SNE) and the synthetic positives."""


def linear_eval(job: LinearJob) -> dict:
    """Linear probe on frozen features: top-1 and top-5 on the test split (authors' protocol by default)."""
    from clsp.evaluate.features import labelled_splits
    from clsp.evaluate.linear import linear_protocol
    from clsp.evaluate.report import DETERMINISTIC_PROBE

    ctx = _Context(job)
    train, test = labelled_splits(job.dataset, "linear", root=job.data_root, download=job.download,
                                  image_size=ctx.encoder.card.image_size, validation=job.validation)
    result = linear_protocol(ctx.encoder, train, test, protocol=job.protocol, epochs=job.epochs, lr=job.lr,
                             batch_size=job.batch_size, seed=job.seed, cache_dir=ctx.cache_dir,
                             log_dir=ctx.run_dir / "tb" / "linear")
    ctx.finish("linear", [result], f"linear ({job.protocol} protocol) {job.dataset}/{result['split']}: top-1 "
                                   f"{result['top1']:.2f}  top-5 {result['top5']:.2f}; {DETERMINISTIC_PROBE}: top-1 "
                                   f"{result['deterministic']['top1']:.2f}")
    return result


def knn_eval(job: KnnJob) -> dict:
    """Weighted cosine kNN on frozen features: best top-1 and the table over k."""
    from clsp.evaluate.features import labelled_splits
    from clsp.evaluate.knn import knn_protocol

    ctx = _Context(job)
    train, test = labelled_splits(job.dataset, "kNN", root=job.data_root, download=job.download,
                                  image_size=ctx.encoder.card.image_size, validation=job.validation)
    result = knn_protocol(ctx.encoder, train, test, ks=job.k, temperature=job.temperature, batch_size=job.batch_size,
                          cache_dir=ctx.cache_dir)
    ctx.finish("knn", [result], f"kNN {job.dataset}/{result['split']}: best top-1 {result['best_top1']:.2f} "
                                f"(k={result['best_k']})")
    return result


def transfer_eval(job: TransferJob) -> list[dict]:
    """Linear transfer to other datasets: the linear protocol on each, one table for all."""
    from clsp.evaluate.transfer import parse_datasets, transfer_protocol

    names = parse_datasets(job.datasets)
    ctx = _Context(job)
    rows = transfer_protocol(ctx.encoder, names, root=job.data_root, download=job.download, protocol=job.protocol,
                             epochs=job.epochs, lr=job.lr, batch_size=job.batch_size, seed=job.seed,
                             cache_dir=ctx.cache_dir, log_dir=ctx.run_dir / "tb")
    ctx.finish("transfer", rows, "\n".join(f"transfer {r['dataset']}: top-1 {r['top1']:.2f}  top-5 {r['top5']:.2f}"
                                           for r in rows))
    return rows


def positives_eval(job: PositivesJob) -> dict:
    """How hard the synthetic positives are, and whether they keep the anchor's class."""
    from clsp.evaluate.positives import positives_stats

    ctx = _Context(job)
    result = positives_stats(ctx.encoder, job.shards, data_root=job.data_root, batch_size=job.batch_size,
                             limit=job.limit, seed=job.seed, cache_dir=ctx.cache_dir,
                             histogram=ctx.output(job.png or ctx.run_dir / "positives-similarity.png"))
    means = {name: s["mean"] for name, s in result["similarity"].items()}
    agreement = result["label_agreement"]
    ctx.finish("positives", [result], "positives: mean similarity " + ", ".join(
        f"{name.replace('_', ' ')} {'n/a' if v is None else f'{v:.3f}'}" for name, v in means.items())
        + ("" if agreement is None else f"; label agreement {agreement:.3f}"))
    return result


def embed_plot_eval(job: EmbedPlotJob) -> dict:
    """A 2-D t-SNE of test features coloured by label, as PNG."""
    import re

    from clsp.evaluate.embed_plot import embed_plot as plot

    ctx = _Context(job)
    png = ctx.output(job.png or ctx.run_dir / f"tsne-{re.sub(r'[^A-Za-z0-9_.-]+', '_', job.dataset)}.png")
    result = plot(ctx.encoder, job.dataset, png, root=job.data_root, download=job.download,
                  max_points=job.max_points, perplexity=job.perplexity, seed=job.seed, batch_size=job.batch_size,
                  cache_dir=ctx.cache_dir)
    ctx.finish("embed-plot", [result], f"t-SNE of {result['points']} {job.dataset} test images: {result['png']}")
    return result


# command name -> (settings model, stage function, whose docstring is the command's help): the CLI and
# ``clsp run`` use the same pairs
EVALUATIONS: dict[str, tuple[type[EncoderEval], Callable[[Any], Any]]] = {
    "linear": (LinearJob, linear_eval), "knn": (KnnJob, knn_eval), "transfer": (TransferJob, transfer_eval),
    "positives": (PositivesJob, positives_eval), "embed-plot": (EmbedPlotJob, embed_plot_eval),
}


def _register(name: str, model: type[EncoderEval], run: Callable[[Any], Any]) -> None:
    @evaluate.command(name, help=run.__doc__, context_settings=SETTINGS)
    @click_options(model)
    def command(**options) -> None:
        run(parse(model, options))


for _name, (_model, _run) in EVALUATIONS.items():
    _register(_name, _model, _run)


@evaluate.command(context_settings=SETTINGS)
@click_options(CompareJob)
def compare(**options) -> None:
    """Put runs side by side (linear, kNN, positives) beside the paper's numbers."""
    from clsp.evaluate.report import write_report

    job = parse(CompareJob, options)
    pairs = [run.split("=", 1) for run in job.runs]
    bad = [run for run, pair in zip(job.runs, pairs) if len(pair) != 2 or not Path(pair[1]).is_dir()]
    if bad:
        raise UserError(f"--run {bad[0]!r} is not LABEL=RUN_DIR with an existing directory")
    click.echo(f"report: {write_report(dict(pairs), job.out, job.dataset)}")


main = evaluate

if __name__ == "__main__":
    main()
