"""``clsp study CONFIG``: does the CLSP term help? Paired seeds, intervals, one table.

For each method and seed the study trains the CLSP run and its baseline (lambda 0) with the same seed,
so they share initial weights and epoch order and differ only in the CLSP term. ``--controls self,oracle``
adds arms that differ from the CLSP run only in what fills the positive (``positive_source``): an extra
augmented view of the anchor, or another training image of its class. All runs reuse the configuration's
one shard set. Each run and each evaluation is a stage of one pipeline (its own ``RUN_DIR/study``), so a
killed study resumes where it stopped.

``--grid train.KEY=V1,V2`` (repeatable) first trains every cell of the grid's cartesian product on the
training split less a fixed, stratified validation split, and scores it on those held-out images; the test
split is not read. Per method, the baseline's settings are those of the cell with the best baseline linear
top-1 on validation, and among the cells sharing them the one with the best CLSP linear top-1 is selected
(ties: the higher kNN top-1, then the earlier cell; ``select_cell``); only that cell is then trained on the
whole training split and measured on the test split. A baseline never reads the CLSP-only settings
(``setting(clsp_only=True)``), so cells that differ only in those share one baseline per seed.

The report gives each arm's mean top-1 with its 95 % t-interval, the paired CLSP - baseline (and CLSP -
control) differences with theirs, the baseline's spread over seeds (the noise floor a difference must
clear), and marks runs whose training sat at collapse.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import click

from clsp.errors import SETTINGS, Command, UserError
from clsp.io import write_bytes_atomic, write_json_atomic
from clsp.train.positive_sources import CONTROLS

# (results.json command, or "train" for train_summary.json; keys into its payload; label)
METRICS = (("linear", ("top1",), "linear top-1"),
           ("linear", ("deterministic", "top1"), "deterministic probe top-1"),
           ("knn", ("best_top1",), "kNN top-1"),
           # NNCLR: the share of support-set neighbours with the anchor's label in the last epoch (%), i.e. what
           # the positives did to the neighbours; a method without a support set has no such row
           ("train", ("final", "nn_acc"), "support-set nn accuracy"))
SELECTION_METRIC, TIE_BREAK_METRIC = "linear top-1", "kNN top-1"
ARM_SUFFIX = {"clsp": "clsp", "baseline": "base", **{control: control for control in CONTROLS}}
VALIDATION_PREFIX = "val-"
MAX_GRID_CELLS = 64  # cells of a --grid, checked from the axes' lengths before any cell is built
MAX_STUDY_RUNS = 1000  # training runs of a whole study (grid and test phases), checked before any work


def _clsp_only() -> set[str]:
    """The training settings a baseline (lambda 0) never reads: a grid over them shares one baseline per seed."""
    from clsp.config import clsp_only_fields
    from clsp.train.config import TrainSettings

    return clsp_only_fields(TrainSettings)


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


def spread(values: list[float]) -> dict[str, float | int]:
    """Sample SD and range over seeds: how far one run moves on its own."""
    n, mean = len(values), sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return {"n": n, "sd": sd, "min": min(values), "max": max(values), "range": max(values) - min(values)}


# ---- the grid ---------------------------------------------------------------------------------------------
def parse_grid(specs: tuple[str, ...] | list[str]) -> list[dict[str, Any]]:
    """The cells of ``--grid train.KEY=V1,V2 ...``: the cartesian product, each value validated as its setting."""
    from clsp.config import parse
    from clsp.train.config import TrainSettings
    from clsp.yamlio import parse_yaml

    axes: dict[str, list[Any]] = {}
    sizes = [spec.partition("=")[2].count(",") + 1 for spec in specs]
    if math.prod(sizes) > MAX_GRID_CELLS:  # before a value is parsed: a huge grid is refused at once
        raise UserError(f"--grid makes {math.prod(sizes):,} cells ({' x '.join(map(str, sizes))}); at most "
                        f"{MAX_GRID_CELLS}: search fewer values, or fewer settings at once")
    for spec in specs:
        dotted, sep, raw = spec.partition("=")
        parts = raw.split(",")
        if not sep or not dotted.startswith("train.") or any(not part.strip() for part in parts):
            raise UserError(f"--grid {spec[:60]!r} must look like train.KEY=V1,V2, e.g. "
                            "--grid train.clsp_lambda=0.3,1.0")
        key = dotted.removeprefix("train.")
        if key == "method":
            raise UserError("--grid train.method: compare methods with --methods")
        if key not in TrainSettings.model_fields:
            close = difflib.get_close_matches(key, list(TrainSettings.model_fields), n=1)
            raise UserError(f"--grid {dotted[:60]}: unknown training setting"
                            + (f" (did you mean 'train.{close[0]}'?)" if close else ""))
        if key in axes:
            raise UserError(f"--grid {dotted}: given twice; list all its values once, e.g. {dotted}=V1,V2")
        values = [parse_yaml(part.strip(), f"--grid {dotted}") for part in parts]
        for value in values:
            parse(TrainSettings, {key: value}, where="train")  # one line naming the key and the bad value
        if len({json.dumps(v, sort_keys=True) for v in values}) < len(values):
            raise UserError(f"--grid {dotted}: a value is repeated ({raw[:60]}); list each once")
        axes[key] = values
    if not axes:  # no --grid: no validation phase (the product of no axes would be one empty cell)
        return []
    return [dict(zip(axes, combination)) for combination in itertools.product(*axes.values())]


def cell_label(cell: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in cell.items()) or "configuration's settings"


# ---- the runs ---------------------------------------------------------------------------------------------
def _digest(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(settings), sort_keys=True).encode()).hexdigest()[:8]


def arm_runs(method: str, seeds: list[int], clsp_lambda: float | None, cell: Mapping[str, Any],
             arms: tuple[str, ...], prefix: str = "") -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Per arm, the ``(run name, run settings)`` of each seed. The name carries a digest of the cell's settings
    that the arm reads, so a baseline is the same run in every cell that differs only in CLSP-only settings."""
    out: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for arm in arms:
        if arm == "baseline":
            own = {key: value for key, value in cell.items() if key not in _clsp_only()}
            fixed: dict[str, Any] = {"clsp_lambda": 0.0}
        else:
            own = {**cell, **({"positive_source": arm} if arm in CONTROLS else {})}
            fixed = {"clsp_lambda": clsp_lambda}
        suffix = f"-{_digest({k: v for k, v in own.items() if k != 'positive_source'})}" if cell and own else ""
        out[arm] = [(f"{prefix}{method}-s{seed}-{ARM_SUFFIX[arm]}{suffix}",
                     {"method": method, "seed": seed, **fixed, **own}) for seed in seeds]
    return out


def study_runs(methods: list[str], seeds: list[int], clsp_lambda: float | None,
               cells: Mapping[str, Mapping[str, Any]] | None = None, arms: tuple[str, ...] = ("clsp", "baseline"),
               prefix: str = "") -> dict[str, dict[str, Any]]:
    """Every run of a phase, name -> settings: per method its cell's arms over the paired seeds."""
    runs: dict[str, dict[str, Any]] = {}
    for method in methods:
        for per_seed in arm_runs(method, seeds, clsp_lambda, (cells or {}).get(method, {}), arms, prefix).values():
            runs.update(per_seed)
    return runs


# ---- reading results ----------------------------------------------------------------------------------------
def _metric(study_dir: Path, name: str, command: str, keys: tuple[str, ...]) -> float | None:
    """A run's value of one metric: from its evaluations' ``results.json``, or (``train``) its training summary,
    where fractions become percentages like the accuracies beside them."""
    from clsp.evaluate.report import load_results, train_summary

    value: Any
    if command == "train":
        value = train_summary(study_dir / "train" / name)
    else:
        value = next(iter(load_results(study_dir / "eval" / name).get(command, {}).values()), None)
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    if value is None:
        return None
    return 100 * float(value) if command == "train" else float(value)


def collapsed(train_dir: Path) -> bool | None:
    """Whether the run's training ended collapsed (``train_summary.json``); None where it records nothing."""
    from clsp.evaluate.report import train_summary

    record = train_summary(train_dir).get("collapse")
    return bool(record.get("collapsed")) if isinstance(record, dict) and "collapsed" in record else None


def summarise(study_dir: Path, arms: Mapping[str, list[str]]) -> dict[str, Any]:
    """Per metric: each arm's interval, the paired CLSP - baseline and CLSP - control differences, and the
    baseline's spread, from the runs' ``results.json``. ``arms`` maps an arm to its run names, seed by seed.
    A metric missing from any run (results written before it existed) is left out."""
    summary: dict[str, Any] = {}
    for command, keys, label in METRICS:
        measured = {arm: [_metric(study_dir, name, command, keys) for name in names]
                    for arm, names in arms.items()}
        if any(v is None for per_seed in measured.values() for v in per_seed):
            continue
        values = cast(dict[str, list[float]], measured)  # no None left: checked just above
        clsp = values["clsp"]
        summary[label] = {
            **{arm: interval(per_seed) for arm, per_seed in values.items()},
            "difference": interval([c - b for c, b in zip(clsp, values["baseline"])]),
            "controls": {arm: interval([c - x for c, x in zip(clsp, values[arm])])
                         for arm in values if arm in CONTROLS},
            "noise_floor": spread(values["baseline"]), "per_seed": values}
    return summary


def _names(per_arm: Mapping[str, list[tuple[str, dict[str, Any]]]]) -> dict[str, list[str]]:
    return {arm: [name for name, _ in runs] for arm, runs in per_arm.items()}


def collapse_marks(study_dir: Path, runs: Iterable[str]) -> dict[str, bool | None]:
    return {name: collapsed(study_dir / "train" / name) for name in runs}


# ---- selection on validation ----------------------------------------------------------------------------------
def select_cell(cells: Sequence[Mapping[str, Any]], summaries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The recipe each arm would pick for itself on validation data, so neither arm is handicapped:

    1. the settings a baseline reads (the cell less the CLSP-only keys) whose baseline has the highest mean
       linear top-1 (ties: kNN, then the earlier cell);
    2. among the cells with those settings, the one whose CLSP run has the highest mean linear top-1 (ties: kNN,
       then the earlier cell).

    Selecting on the paired difference instead would favour cells whose baseline is broken (a cell without
    warm-up can lose 20 points of baseline and "win" by that). Reads validation summaries only."""
    def mean(i: int, arm: str, label: str) -> float:
        return summaries[i].get(label, {}).get(arm, {}).get("mean", -math.inf)

    def score(i: int, arm: str) -> tuple[float, float, int]:
        return mean(i, arm, SELECTION_METRIC), mean(i, arm, TIE_BREAK_METRIC), -i

    def shared(i: int) -> dict[str, Any]:
        return {key: value for key, value in cells[i].items() if key not in _clsp_only()}

    best_base = max(range(len(cells)), key=lambda i: score(i, "baseline"))
    group = [i for i in range(len(cells)) if shared(i) == shared(best_base)]
    best = max(group, key=lambda i: score(i, "clsp"))
    difference = summaries[best].get(SELECTION_METRIC, {}).get("difference", {})
    notes = []
    if len(group) < len(cells) and shared(best_base):
        notes.append(f"baseline settings {cell_label(shared(best_base))} chosen by the baseline's validation accuracy")
    if not difference.get("mean", math.nan) > 0:
        notes.append("at the selected recipe CLSP is not above its baseline on validation")
    elif not difference.get("low", math.nan) > 0:
        notes.append("its validation interval includes 0: the gain is not shown at this number of seeds")
    return {"cell": best, "linear_difference": difference.get("mean", math.nan),
            "clsp_linear": mean(best, "clsp", SELECTION_METRIC),
            "baseline_linear": mean(best, "baseline", SELECTION_METRIC), "notes": notes}


def validation_grid(study_dir: Path, methods: list[str], seeds: list[int], clsp_lambda: float | None,
                    cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method: every cell's validation summary, collapse marks, and the selected cell."""
    report: dict[str, Any] = {}
    for method in methods:
        entries: list[dict[str, Any]] = []
        for cell in cells:
            per_arm = arm_runs(method, seeds, clsp_lambda, cell, ("clsp", "baseline"), VALIDATION_PREFIX)
            names = _names(per_arm)
            entries.append({"settings": cell, "runs": names, "summary": summarise(study_dir, names),
                            "collapsed": [n for n, c in collapse_marks(study_dir, sum(names.values(), [])).items()
                                          if c]})
        choice = select_cell(cells, [entry["summary"] for entry in entries])
        report[method] = {"cells": entries, "selected": {**choice, "settings": cells[choice["cell"]]}}
    return report


# ---- the report -------------------------------------------------------------------------------------------
def _fmt(stat: Mapping[str, float]) -> str:
    return f"{stat['mean']:.2f} ± {stat['half_width']:.2f}"


def _diff(stat: Mapping[str, float]) -> str:
    return f"{stat['mean']:+.2f} [{stat['low']:+.2f}, {stat['high']:+.2f}]"


def _verdict(stat: Mapping[str, float], other: str) -> str:
    return f"CLSP better than {other}" if stat["low"] > 0 else f"CLSP worse than {other}" if stat["high"] < 0 \
        else "no difference shown"


def _collapsed_cell(arms: Mapping[str, list[str]], marks: Mapping[str, bool | None]) -> str:
    parts = [f"{arm} {sum(bool(marks.get(n)) for n in names)}/{len(names)}" for arm, names in arms.items()
             if any(marks.get(n) for n in names)]
    if parts:
        return "**" + ", ".join(parts) + "**"
    return "none" if all(marks.get(n) is not None for names in arms.values() for n in names) else "n/a"


def grid_markdown(grid: Mapping[str, Any], validation: float, seeds: list[int]) -> list[str]:
    labels = [label for _, _, label in METRICS]
    lines = [f"## Validation grid ({validation:g} of each label of the training split held out, "
             f"{len(seeds)} paired seeds per cell)", "",
             "Each cell trains on the training split less the validation images and is scored on those images; "
             "the test split is not read. Mean linear top-1 of each arm, and CLSP - baseline paired over seeds, "
             "mean [95 % CI]. Selected per method: the settings a baseline reads where the baseline is best, "
             "then among those the cell where the CLSP run is best (ties: kNN, then the earlier cell); never "
             "the largest difference, which would reward a broken baseline.", "",
             f"| method | cell | CLSP linear | baseline linear | {' | '.join(labels)} | collapsed runs | selected |",
             "|---|---|---:|---:|" + "---:|" * len(labels) + "---|---|"]
    for method, entry in grid.items():
        for i, cell in enumerate(entry["cells"]):
            diffs = [_diff(cell["summary"][label]["difference"]) if label in cell["summary"] else "n/a"
                     for label in labels]
            chosen = "**selected**" if i == entry["selected"]["cell"] else ""
            collapsed_runs = ", ".join(f"**{name}**" for name in cell["collapsed"]) or "none"
            linear = cell["summary"].get(SELECTION_METRIC, {})
            arms = " | ".join(_fmt(linear[arm]) if arm in linear else "n/a" for arm in ("clsp", "baseline"))
            lines.append(f"| {method} | {i}: {cell_label(cell['settings'])} | {arms} | {' | '.join(diffs)} | "
                         f"{collapsed_runs} | {chosen} |")
    lines.append("")
    for method, entry in grid.items():
        selected = entry["selected"]
        notes = "; ".join(selected["notes"])
        lines.append(f"- {method}: cell {selected['cell']} ({cell_label(selected['settings'])}), validation linear "
                     f"top-1 CLSP {selected['clsp_linear']:.2f}, baseline {selected['baseline_linear']:.2f}, "
                     f"difference {selected['linear_difference']:+.2f}" + (f"; {notes}" if notes else ""))
    return [*lines, ""]


def study_markdown(summary: Mapping[str, Any], config: Mapping[str, Any], seeds: list[int], png: str,
                   arms: Mapping[str, Mapping[str, list[str]]], marks: Mapping[str, bool | None],
                   grid: Mapping[str, Any] | None = None, validation: float = 0.0,
                   grid_seeds: list[int] | None = None) -> str:
    from clsp.evaluate.report import DETERMINISTIC_PROBE

    rows, control_rows, floor_rows = [], [], []
    for method, metrics in summary.items():
        dead = _collapsed_cell(arms[method], marks)
        for label, stat in metrics.items():
            rows.append(f"| {method} | {label} | {_fmt(stat['clsp'])} | {_fmt(stat['baseline'])} | "
                        f"{_diff(stat['difference'])} | {_verdict(stat['difference'], 'baseline')} | {dead} |")
            for control, diff in stat["controls"].items():
                control_rows.append(f"| {method} | {label} | {control} | {_fmt(stat[control])} | {_diff(diff)} | "
                                    f"{_verdict(diff, control)} |")
            floor = stat["noise_floor"]
            floor_rows.append(f"| {method} | {label} | {floor['sd']:.2f} | {floor['min']:.2f} - {floor['max']:.2f} "
                              f"({floor['range']:.2f}) | {floor['n']} |")
    train = config["train"]
    cells = "the configuration's settings" if not grid else "per method the cell selected on validation (below)"
    parts = [
        f"# CLSP study: {config['dataset']['name']}",
        "",
        f"{len(seeds)} paired seeds ({', '.join(map(str, seeds))}); each CLSP run (lambda "
        f"{train['clsp_lambda_study']}) and its baseline share a seed, so they start from the same weights and "
        f"see the same epoch order. {train['epochs']} epochs, {train['backbone']}, {cells}, one shard set "
        f"({config['generate']['candidates']} candidates, w {config['generate']['interpolation']}). Linear probe: "
        f"the authors' protocol (METHOD.md section 4), {config['evaluate']['linear_epochs']} epochs; beside it the "
        f"{DETERMINISTIC_PROBE} (C = 1, L-BFGS; not the paper's protocol, no random state); kNN: best over k in "
        "5..200. Scored on the test split, trained on the whole training split. Mean ± half-width of the 95 % "
        "t-interval over seeds; the difference is paired (per seed). Collapsed runs: runs whose training ended "
        "collapsed (train_summary.json; n/a where a run records nothing).",
        "",
        "| method | metric | CLSP | baseline | CLSP - baseline [95 % CI] | verdict | collapsed runs |",
        "|---|---|---:|---:|---:|---|---|",
        *rows,
        "",
    ]
    if control_rows:
        parts += ["## Controls", "",
                  "Each control run is its seed's CLSP run with another positive: `self` an extra augmented view of "
                  "the anchor, `oracle` another training image of the anchor's class (the ceiling).", "",
                  "| method | metric | control | control top-1 | CLSP - control [95 % CI] | verdict |",
                  "|---|---|---|---:|---:|---|", *control_rows, ""]
    parts += ["## Noise floor", "",
              "The baseline's spread over seeds: a difference of one run pair smaller than this is noise.", "",
              "| method | metric | baseline SD | baseline min - max (range) | seeds |", "|---|---|---:|---:|---:|",
              *floor_rows, ""]
    dead_runs = sorted(name for name, mark in marks.items() if mark)
    parts += [f"Collapsed runs: {', '.join(dead_runs) if dead_runs else 'none recorded'}.", ""]
    if grid:
        parts += grid_markdown(grid, validation, grid_seeds or seeds)
    parts += [f"![paired differences]({png})", ""]
    return "\n".join(parts)


def plot_differences(summary: Mapping[str, Any], path: Path) -> None:
    """The paired differences with their intervals, one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clsp.evaluate.report import save_figure

    labels = [label for _, _, label in METRICS if all(label in metrics for metrics in summary.values())]
    fig, axes = plt.subplots(1, len(labels), figsize=(4 * len(labels), 3.2), squeeze=False)
    for ax, label in zip(axes[0], labels):
        methods = list(summary)
        for i, method in enumerate(methods):
            stat = summary[method][label]["difference"]
            ax.errorbar([i], [stat["mean"]], yerr=[[stat["half_width"]], [stat["half_width"]]], fmt="o", capsize=4)
            per_seed = summary[method][label]["per_seed"]
            diffs = [c - b for c, b in zip(per_seed["clsp"], per_seed["baseline"])]
            ax.scatter([i + 0.15] * len(diffs), diffs, s=8, alpha=0.5)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlim(-0.5, len(methods) - 0.5)
        ax.set_xticks(range(len(methods)), methods)
        ax.set_title(f"{label}: CLSP - baseline")
        ax.set_ylabel("points")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


# ---- the command ----------------------------------------------------------------------------------------------
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

    per_method = {m: _names(arm_runs(m, seed_list, clsp_lambda, selected[m], arms)) for m in chosen}
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
