"""Reading a study's results: each run's metrics, the paired summaries per arm, collapse marks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, cast

from clsp.study.stats import interval, spread
from clsp.train.positive_sources import CONTROLS

# (results.json command, or "train" for train_summary.json; keys into its payload; label)
METRICS = (("linear", ("top1",), "linear top-1"),
           ("linear", ("deterministic", "top1"), "deterministic probe top-1"),
           ("knn", ("best_top1",), "kNN top-1"),
           # NNCLR: the share of support-set neighbours with the anchor's label in the last epoch (%), i.e. what
           # the positives did to the neighbours; a method without a support set has no such row
           ("train", ("final", "nn_acc"), "support-set nn accuracy"))
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


def run_names(per_arm: Mapping[str, list[tuple[str, dict[str, Any]]]]) -> dict[str, list[str]]:
    return {arm: [name for name, _ in runs] for arm, runs in per_arm.items()}


def collapse_marks(study_dir: Path, runs: Iterable[str]) -> dict[str, bool | None]:
    return {name: collapsed(study_dir / "train" / name) for name in runs}
