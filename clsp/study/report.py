"""The study's report: ``study.md`` (tables through the report's table helper) and ``study.png``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from clsp.evaluate.report import markdown_table
from clsp.study.grid import cell_label
from clsp.study.results import METRICS
from clsp.study.selection import SELECTION_METRIC


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
             "the largest difference, which would reward a broken baseline.", ""]
    rows = []
    for method, entry in grid.items():
        for i, cell in enumerate(entry["cells"]):
            diffs = [_diff(cell["summary"][label]["difference"]) if label in cell["summary"] else "n/a"
                     for label in labels]
            chosen = "**selected**" if i == entry["selected"]["cell"] else ""
            collapsed_runs = ", ".join(f"**{name}**" for name in cell["collapsed"]) or "none"
            linear = cell["summary"].get(SELECTION_METRIC, {})
            arms = [_fmt(linear[arm]) if arm in linear else "n/a" for arm in ("clsp", "baseline")]
            rows.append([method, f"{i}: {cell_label(cell['settings'])}", *arms, *diffs, collapsed_runs, chosen])
    headers = ["method", "cell", "CLSP linear", "baseline linear", *labels, "collapsed runs", "selected"]
    lines += [markdown_table(headers, rows, numeric=range(2, 4 + len(labels))), ""]
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
            rows.append([method, label, _fmt(stat["clsp"]), _fmt(stat["baseline"]), _diff(stat["difference"]),
                         _verdict(stat["difference"], "baseline"), dead])
            for control, diff in stat["controls"].items():
                control_rows.append([method, label, control, _fmt(stat[control]), _diff(diff), _verdict(diff, control)])
            floor = stat["noise_floor"]
            floor_rows.append([method, label, f"{floor['sd']:.2f}",
                               f"{floor['min']:.2f} - {floor['max']:.2f} ({floor['range']:.2f})", floor["n"]])
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
        markdown_table(["method", "metric", "CLSP", "baseline", "CLSP - baseline [95 % CI]", "verdict",
                        "collapsed runs"], rows, numeric=(2, 3, 4)),
        "",
    ]
    if control_rows:
        parts += ["## Controls", "",
                  "Each control run is its seed's CLSP run with another positive: `self` an extra augmented view of "
                  "the anchor, `oracle` another training image of the anchor's class (the ceiling).", "",
                  markdown_table(["method", "metric", "control", "control top-1", "CLSP - control [95 % CI]",
                                  "verdict"], control_rows, numeric=(3, 4)), ""]
    parts += ["## Noise floor", "",
              "The baseline's spread over seeds: a difference of one run pair smaller than this is noise.", "",
              markdown_table(["method", "metric", "baseline SD", "baseline min - max (range)", "seeds"], floor_rows,
                             numeric=(2, 3, 4)), ""]
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
