"""``--grid train.KEY=V1,V2``: the cells of the validation grid, validated as their settings, within a budget."""

from __future__ import annotations

import difflib
import itertools
import json
import math
from collections.abc import Mapping
from typing import Any

from clsp.errors import UserError

MAX_GRID_CELLS = 64  # cells of a --grid, checked from the axes' lengths before any cell is built


def clsp_only() -> set[str]:
    """The training settings a baseline (lambda 0) never reads: a grid over them shares one baseline per seed."""
    from clsp.config import clsp_only_fields
    from clsp.train.config import TrainSettings

    return clsp_only_fields(TrainSettings)


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
