"""What fills the CLSP positive (view 3): the shards' synthetic positives, or one of two controls.

- ``synthetic``: the anchor's drawn candidate from the shards (METHOD.md section 3).
- ``self``: the anchor image itself, augmented with view 1's list by a third, independent draw: an extra
  augmented view in place of the synthetic positive (the authors' ``simclr_aug`` control). It tells whether
  the synthetic positives give more than one more augmentation.
- ``oracle``: another training image of the anchor's class, drawn at random: a perfect positive as far as
  labels go, so the ceiling of what a positive can give. Needs labels.

The controls change only the pixels of view 3: anchors, epoch order and augmentation seeds stay those of
the synthetic run with the same seed, so a control is a paired comparison with it. The oracle's partner
is drawn from the run's own anchors (never from images outside the shards, such as a held-out split).
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

from clsp.errors import UserError

PositiveSource = Literal["synthetic", "self", "oracle"]
POSITIVE_SOURCES: tuple[str, ...] = get_args(PositiveSource)
CONTROLS = tuple(source for source in POSITIVE_SOURCES if source != "synthetic")  # the arms of ``clsp study``
_ORACLE_STREAM = 2  # the RNG stream of the oracle's draws (1 is the synthetic candidate draw)


class OraclePartners:
    """Same-class partners among a pool of anchors, drawn from ``(seed, epoch, anchor index)``."""

    def __init__(self, pool: np.ndarray, labels: np.ndarray) -> None:
        """``pool``: the run's anchor indices; ``labels``: the class of every dataset index (-1: none)."""
        pool = np.asarray(pool, dtype=np.int64)
        classes = labels[pool]
        if len(labels) == 0 or (classes < 0).any():
            raise UserError("--positive-source oracle needs a class label for every anchor, and this dataset has "
                            "none; use --positive-source synthetic or self")
        order = np.lexsort((pool, classes))
        self.members = pool[order]  # grouped by class, ascending index within a class
        self.labels, self.size = labels, len(labels)
        values, start, count = np.unique(classes[order], return_index=True, return_counts=True)
        if (count < 2).any():
            alone = int(values[np.argmax(count < 2)])
            raise UserError(f"--positive-source oracle needs at least two anchors of each class, and class {alone} "
                            "has one; train on more anchors or use --positive-source synthetic or self")
        self.start = dict(zip(values.tolist(), start.tolist()))
        self.count = dict(zip(values.tolist(), count.tolist()))
        self.position = np.full(len(labels), -1, dtype=np.int64)
        self.position[self.members] = np.arange(len(self.members))

    def partners(self, anchors: np.ndarray, seed: int, epoch: int) -> np.ndarray:
        """One other anchor of the same class per anchor: uniform over the class's other members."""
        anchors = np.asarray(anchors, dtype=np.int64)
        u = np.random.default_rng([seed, epoch, _ORACLE_STREAM]).random(self.size)[anchors]
        classes = self.labels[anchors].tolist()
        start = np.array([self.start[c] for c in classes], dtype=np.int64)
        others = np.array([self.count[c] for c in classes], dtype=np.int64) - 1
        pick = np.minimum((u * others).astype(np.int64), others - 1)
        own = self.position[anchors] - start
        return self.members[start + pick + (pick >= own)]  # skip the anchor's own slot
