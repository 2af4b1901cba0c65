"""The recipe chosen on validation data: each arm's own best cell, never the largest difference."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from clsp.study.grid import cell_label, clsp_only
from clsp.study.results import collapse_marks, run_names, summarise
from clsp.study.runs import VALIDATION_PREFIX, arm_runs

SELECTION_METRIC, TIE_BREAK_METRIC = "linear top-1", "kNN top-1"


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
        return {key: value for key, value in cells[i].items() if key not in clsp_only()}

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
            names = run_names(per_arm)
            entries.append({"settings": cell, "runs": names, "summary": summarise(study_dir, names),
                            "collapsed": [n for n, c in collapse_marks(study_dir, sum(names.values(), [])).items()
                                          if c]})
        choice = select_cell(cells, [entry["summary"] for entry in entries])
        report[method] = {"cells": entries, "selected": {**choice, "settings": cells[choice["cell"]]}}
    return report
