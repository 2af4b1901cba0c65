"""``clsp study CONFIG``: does the CLSP term help? Paired seeds, intervals, one table.

For each method and seed the study trains the CLSP run and its baseline (lambda 0) with the same seed,
so they share initial weights and epoch order and differ only in the CLSP term. All runs reuse the
configuration's one shard set. Each run and each evaluation is a stage of one pipeline (its own
``RUN_DIR/study``), so a killed study resumes where it stopped. The report gives the mean top-1 of each
arm with its 95 % t-interval, and the paired CLSP - baseline difference with its 95 % t-interval.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click

from clsp.errors import SETTINGS, Command, UserError
from clsp.io import write_bytes_atomic, write_json_atomic
from clsp.train.recipes import METHODS

METRICS = (("linear", "top1", "linear top-1"), ("knn", "best_top1", "kNN top-1"))


def interval(values: list[float]) -> dict[str, float | int]:
    """Mean and the half-width of its 95 % Student-t interval (n - 1 degrees of freedom)."""
    from scipy.stats import t

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"n": n, "mean": mean, "half_width": math.nan, "low": math.nan, "high": math.nan}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "half_width": half, "low": mean - half, "high": mean + half}


def study_runs(methods: list[str], seeds: list[int], clsp_lambda: float | None) -> dict[str, dict[str, Any]]:
    """The paired runs: ``METHOD-sSEED-clsp`` and ``METHOD-sSEED-base`` for every method and seed."""
    runs: dict[str, dict[str, Any]] = {}
    for method in methods:
        for seed in seeds:
            runs[f"{method}-s{seed}-clsp"] = {"method": method, "seed": seed, "clsp_lambda": clsp_lambda}
            runs[f"{method}-s{seed}-base"] = {"method": method, "seed": seed, "clsp_lambda": 0.0}
    return runs


def summarise(eval_root: Path, methods: list[str], seeds: list[int]) -> dict[str, Any]:
    """Per method and metric: each arm's interval and the paired difference's, from the runs' results."""
    summary: dict[str, Any] = {}
    for method in methods:
        for command, key, label in METRICS:
            arms: dict[str, list[float]] = {"clsp": [], "base": []}
            for seed in seeds:
                for arm in arms:
                    path = eval_root / f"{method}-s{seed}-{arm}" / "results.json"
                    results = json.loads(path.read_text())
                    arms[arm].append(float(next(iter(results[command].values()))[key]))
            diffs = [c - b for c, b in zip(arms["clsp"], arms["base"])]
            summary.setdefault(method, {})[label] = {
                "clsp": interval(arms["clsp"]), "baseline": interval(arms["base"]), "difference": interval(diffs),
                "per_seed": {"clsp": arms["clsp"], "baseline": arms["base"]}}
    return summary


def _fmt(stat: dict[str, float]) -> str:
    return f"{stat['mean']:.2f} ± {stat['half_width']:.2f}"


def study_markdown(summary: dict[str, Any], config: dict[str, Any], seeds: list[int], png: str) -> str:
    rows = []
    for method, metrics in summary.items():
        for label, stat in metrics.items():
            diff = stat["difference"]
            verdict = "CLSP better" if diff["low"] > 0 else "CLSP worse" if diff["high"] < 0 else "no difference shown"
            rows.append(f"| {method} | {label} | {_fmt(stat['clsp'])} | {_fmt(stat['baseline'])} | "
                        f"{diff['mean']:+.2f} [{diff['low']:+.2f}, {diff['high']:+.2f}] | {verdict} |")
    train = config["train"]
    return "\n".join([
        f"# CLSP study: {config['dataset']['name']}",
        "",
        f"{len(seeds)} paired seeds ({', '.join(map(str, seeds))}); each CLSP run (lambda "
        f"{train['clsp_lambda_study']}) and its baseline share a seed, so they start from the same weights and "
        f"see the same epoch order. {train['epochs']} epochs, {train['backbone']}, one shard set "
        f"({config['generate']['candidates']} candidates, w {config['generate']['interpolation']}). Linear probe: "
        f"the authors' protocol (METHOD.md section 4), {config['evaluate']['linear_epochs']} epochs; kNN: best over "
        "k in 5..200. Mean ± half-width of the 95 % t-interval over seeds; the difference is paired (per seed).",
        "",
        "| method | metric | CLSP | baseline | CLSP - baseline [95 % CI] | verdict |",
        "|---|---|---:|---:|---:|---|",
        *rows,
        "",
        f"![paired differences]({png})",
        "",
    ])


def plot_differences(summary: dict[str, Any], path: Path) -> None:
    """The paired differences with their intervals, one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clsp.evaluate.report import save_figure

    labels = [label for _, _, label in METRICS]
    fig, axes = plt.subplots(1, len(labels), figsize=(4 * len(labels), 3.2), squeeze=False)
    for ax, label in zip(axes[0], labels):
        methods = list(summary)
        for i, method in enumerate(methods):
            stat = summary[method][label]["difference"]
            ax.errorbar([i], [stat["mean"]], yerr=[[stat["half_width"]], [stat["half_width"]]], fmt="o", capsize=4)
            per_seed = [c - b for c, b in zip(*summary[method][label]["per_seed"].values())]
            ax.scatter([i + 0.15] * len(per_seed), per_seed, s=8, alpha=0.5)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(methods)), methods)
        ax.set_title(f"{label}: CLSP - baseline")
        ax.set_ylabel("points")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


@click.command(cls=Command, context_settings=SETTINGS)
@click.argument("config", type=click.Path(dir_okay=False), default="pipeline.yaml")
@click.option("--seeds", type=click.IntRange(2, 100), default=5, help="Paired seeds (0 .. N-1).")
@click.option("--methods", default=",".join(METHODS), help="Comma-separated methods.")
@click.option("--clsp-lambda", type=click.FloatRange(0, 100, min_open=True), default=None,
              help="lambda of the CLSP runs [default: the configuration's first run with lambda > 0].")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="As for clsp run (repeatable).")
def study(config: str, seeds: int, methods: str, clsp_lambda: float | None, overrides: tuple[str, ...]) -> None:
    """Train CLSP and baseline runs over paired seeds for each method; write study.md, study.json, a plot."""
    from clsp.pipeline import Pipeline, load_config

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METHODS]
    if not chosen or unknown:
        raise UserError(f"--methods {methods!r}: choose from {', '.join(METHODS)}")
    base = load_config(config, overrides)
    if clsp_lambda is None:
        positive = [v for v in base.train.runs.values() if isinstance(v, (int, float)) and v > 0]
        clsp_lambda = float(positive[0]) if positive else None
    seed_list = list(range(seeds))
    run_dir = Path(base.run_dir)
    study_dir = run_dir / "study"
    values = base.model_dump()
    values["run_dir"] = str(study_dir)
    values["shards"] = base.shards or str(run_dir / "shards")  # one shard set: the configuration's own
    values["train"]["runs"] = study_runs(chosen, seed_list, clsp_lambda)
    values["evaluate"].update(linear=True, linear_protocol="authors", knn=True, positives=False, embed_plot=False,
                              transfer=[])
    from clsp.config import parse
    from clsp.pipeline import PipelineConfig

    resolved = parse(PipelineConfig, values, where="")
    if base.shards is None and (run_dir / "shards" / "manifest.json").is_file() and not (study_dir / "shards").exists():
        study_dir.mkdir(parents=True, exist_ok=True)  # one shard set: the configuration's own, if generated
        (study_dir / "shards").symlink_to((run_dir / "shards").resolve(), target_is_directory=True)
    pipeline = Pipeline(resolved)
    pipeline.check()
    pipeline.run()
    click.echo(f"[clsp study] ran: {', '.join(pipeline.ran) or 'nothing (everything was done already)'}")
    summary = summarise(study_dir / "eval", chosen, seed_list)
    png = study_dir / "study.png"
    plot_differences(summary, png)
    described = resolved.model_dump()
    described["train"]["clsp_lambda_study"] = clsp_lambda if clsp_lambda is not None else "recipe"
    text = study_markdown(summary, described, seed_list, png.name)
    write_bytes_atomic(study_dir / "study.md", text.encode())
    write_json_atomic(study_dir / "study.json", {"seeds": seed_list, "methods": chosen, "clsp_lambda": clsp_lambda,
                                                 "config": resolved.model_dump(), "summary": summary})
    click.echo(text)
    click.echo(f"wrote {study_dir / 'study.md'}, {study_dir / 'study.json'}, {png}")
