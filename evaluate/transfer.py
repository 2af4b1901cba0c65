"""Linear transfer: the linear protocol on other datasets (METHOD.md section 4), one table for all."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from clsp.errors import UserError
from clsp.evaluate.features import FrozenEncoder, labelled_splits
from clsp.evaluate.linear import linear_protocol


def parse_datasets(text: str) -> list[str]:
    """``"cifar10,imagefolder:PATH"`` -> names; ``imagefolder:`` paths may not contain commas."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UserError("--datasets is empty; pass registry names separated by commas, e.g. cifar10,cifar100")
    return names


def transfer_protocol(encoder: FrozenEncoder, datasets: Sequence[str], *, root: str | Path, download: bool = True,
                      log_dir: str | Path | None = None, **linear_options) -> list[dict]:
    """The linear protocol on each dataset; every dataset is loaded and checked before any training."""
    pairs = [labelled_splits(name, "linear transfer", root=root, download=download,
                             image_size=encoder.card.image_size) for name in datasets]
    rows = []
    for i, (train, test) in enumerate(pairs):
        run_log = None if log_dir is None else Path(log_dir) / f"transfer-{i}"
        rows.append(linear_protocol(encoder, train, test, log_dir=run_log, **linear_options))
    return rows
