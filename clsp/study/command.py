"""``clsp study``: the command, its plan within the run budget, and the phases as pipeline stages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from clsp.errors import SETTINGS, Command, UserError
from clsp.io import write_bytes_atomic, write_json_atomic
from clsp.study.grid import parse_grid
from clsp.study.report import plot_differences, study_markdown
from clsp.study.results import collapse_marks, run_names, summarise
from clsp.study.runs import VALIDATION_PREFIX, arm_runs, study_runs
from clsp.study.selection import validation_grid
from clsp.train.positive_sources import CONTROLS

MAX_STUDY_RUNS = 1000  # training runs of a whole study (grid and test phases), checked before any work


def _run_phase(base: Any, study_dir: Path, runs: dict[str, dict[str, Any]], validation: float) -> Any:
    """Train and evaluate ``runs`` as stages of the study's pipeline (resumable); returns the resolved config."""
    from clsp.config import parse
    from clsp.pipeline import Pipeline, PipelineConfig

    values = base.model_dump()
    values.update(run_dir=str(study_dir), validation=validation,
                  shards=base.shards or str(Path(base.run_dir) / "shards"))  # one shard set: the configuration's own
    values["train"]["runs"] = runs
    values["evaluate"].update(linear=True, linear_protocol="authors", knn=True, positives=False, embed_plot=False,
                              transfer=[])
    resolved = parse(PipelineConfig, values, where="")
    pipeline = Pipeline(resolved)
    pipeline.check()
    pipeline.run()
    phase = "validation grid" if validation else "test"
    click.echo(f"[clsp study] {phase}: ran {', '.join(pipeline.ran) or 'nothing (everything was done already)'}")
    return resolved


def _plan(cells: list[dict[str, Any]], methods: int, grid_seeds: int, grid_runs: int, seeds: int,
          arms: tuple[str, ...]) -> str:
    """The study's runs, counted before any work (cells x seeds x arms = runs); over ``MAX_STUDY_RUNS`` refused."""
    test = methods * seeds * len(arms)
    phases = [f"test {methods} method(s) x {seeds} seeds x {len(arms)} arms = {test}"]
    if cells:
        planned = methods * len(cells) * grid_seeds * 2
        shared = f" ({grid_runs} to train: shared baselines)" if grid_runs < planned else ""
        phases.insert(0, f"grid {methods} method(s) x {len(cells)} cells x {grid_seeds} seeds x 2 arms = "
                         f"{planned}{shared}")
    total = grid_runs + test
    if total > MAX_STUDY_RUNS:
        raise UserError(f"the study would train {total} runs ({'; '.join(phases)}); at most {MAX_STUDY_RUNS}: "
                        f"use fewer --grid values, seeds, methods or controls")
    return f"[clsp study] plan: {'; '.join(phases)}; {total} training runs in all"


def _controls(text: str) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(c.strip() for c in text.split(",") if c.strip()))
    unknown = [c for c in chosen if c not in CONTROLS]
    if unknown:
        raise UserError(f"--controls {text[:60]!r}: choose from {', '.join(CONTROLS)}, e.g. --controls self,oracle")
    return chosen


@click.command(cls=Command, context_settings=SETTINGS)
@click.argument("config", type=click.Path(dir_okay=False), default="pipeline.yaml")
@click.option("--seeds", type=click.IntRange(2, 100), default=5, help="Paired seeds (0 .. N-1).")
@click.option("--methods", default=None, help="Comma-separated methods [default: every registered method].")
@click.option("--clsp-lambda", type=click.FloatRange(0, 100, min_open=True), default=None,
              help="lambda of the CLSP runs [default: the configuration's first run with lambda > 0].")
@click.option("--grid", "grid", multiple=True, metavar="train.KEY=V1,V2",
              help="A training setting to search (repeatable; the cells are the cartesian product), chosen on "
                   "validation data, then measured on the test split.")
@click.option("--grid-seeds", type=click.IntRange(2, 100), default=None,
              help="Paired seeds of each --grid cell on validation (0 .. N-1) [default: --seeds]; the selected cell "
                   "is then measured with --seeds.")
@click.option("--validation", type=click.FloatRange(0, 0.5, min_open=True), default=0.2, show_default=True,
              help="Fraction of each label of the training split held out to score the --grid cells.")
@click.option("--controls", default="", metavar="self,oracle",
              help="Control arms: self (an extra augmented view as the positive), oracle (a same-class image).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="As for clsp run (repeatable).")
def study(config: str, seeds: int, methods: str | None, clsp_lambda: float | None, grid: tuple[str, ...],
          grid_seeds: int | None, validation: float, controls: str, overrides: tuple[str, ...]) -> None:
    """Train CLSP and baseline runs over paired seeds for each method; write study.md, study.json, a plot."""
    from clsp.config import ValidationSettings, parse
    from clsp.pipeline import load_config
    from clsp.train.methods import registered

    methods = ",".join(registered()) if methods is None else methods
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in registered()]
    if not chosen or unknown:
        raise UserError(f"--methods {methods[:60]!r}: choose from {', '.join(registered())}")
    arms = ("clsp", "baseline", *_controls(controls))
    parse(ValidationSettings, {"validation": validation})  # NaN, or a fraction that holds out nothing, even unused
    cells = parse_grid(grid)
    base = load_config(config, overrides)
    if clsp_lambda is None:
        positive = [v for v in base.train.runs.values() if isinstance(v, (int, float)) and v > 0]
        clsp_lambda = float(positive[0]) if positive else None
    seed_list = list(range(seeds))
    grid_seed_list = list(range(grid_seeds or seeds))
    grid_runs = {name: settings for cell in cells for name, settings in
                 study_runs(chosen, grid_seed_list, clsp_lambda, {m: cell for m in chosen},
                            prefix=VALIDATION_PREFIX).items()}
    click.echo(_plan(cells, len(chosen), len(grid_seed_list), len(grid_runs), seeds, arms))
    run_dir = Path(base.run_dir)
    study_dir = run_dir / "study"
    if base.shards is None and (run_dir / "shards" / "manifest.json").is_file() and not (study_dir / "shards").exists():
        study_dir.mkdir(parents=True, exist_ok=True)  # one shard set: the configuration's own, if generated
        (study_dir / "shards").symlink_to((run_dir / "shards").resolve(), target_is_directory=True)

    grid_report = None
    selected: dict[str, dict[str, Any]] = {method: {} for method in chosen}
    if cells:
        _run_phase(base, study_dir, grid_runs, validation)
        grid_report = validation_grid(study_dir, chosen, grid_seed_list, clsp_lambda, cells)
        selected = {method: entry["selected"]["settings"] for method, entry in grid_report.items()}
    runs = study_runs(chosen, seed_list, clsp_lambda, selected, arms)
    resolved = _run_phase(base, study_dir, runs, 0.0)

    per_method = {m: run_names(arm_runs(m, seed_list, clsp_lambda, selected[m], arms)) for m in chosen}
    summary = {method: summarise(study_dir, names) for method, names in per_method.items()}
    marks = collapse_marks(study_dir, runs)
    png = study_dir / "study.png"
    plot_differences(summary, png)
    described = resolved.model_dump()
    described["train"]["clsp_lambda_study"] = clsp_lambda if clsp_lambda is not None else "recipe"
    text = study_markdown(summary, described, seed_list, png.name, per_method, marks, grid_report, validation,
                          grid_seed_list)
    write_bytes_atomic(study_dir / "study.md", text.encode())
    write_json_atomic(study_dir / "study.json", {
        "seeds": seed_list, "methods": chosen, "clsp_lambda": clsp_lambda, "arms": list(arms),
        "selected": selected, "config": resolved.model_dump(), "summary": summary,
        "runs": {name: {**settings, "collapsed": marks[name]} for name, settings in runs.items()},
        "grid": None if grid_report is None else {"validation": validation, "seeds": grid_seed_list, "cells": cells,
                                                  "methods": grid_report}})
    click.echo(text)
    click.echo(f"wrote {study_dir / 'study.md'}, {study_dir / 'study.json'}, {png}")
