"""The runs of a study: per method, arm and seed, a run name and its settings, paired by seed."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from clsp.study.grid import clsp_only
from clsp.train.positive_sources import CONTROLS

ARM_SUFFIX = {"clsp": "clsp", "baseline": "base", **{control: control for control in CONTROLS}}
VALIDATION_PREFIX = "val-"


def _digest(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(settings), sort_keys=True).encode()).hexdigest()[:8]


def arm_runs(method: str, seeds: list[int], clsp_lambda: float | None, cell: Mapping[str, Any],
             arms: tuple[str, ...], prefix: str = "") -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Per arm, the ``(run name, run settings)`` of each seed. The name carries a digest of the cell's settings
    that the arm reads, so a baseline is the same run in every cell that differs only in CLSP-only settings."""
    out: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for arm in arms:
        if arm == "baseline":
            own = {key: value for key, value in cell.items() if key not in clsp_only()}
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
