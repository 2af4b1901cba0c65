"""Seeing representation collapse while a run trains, instead of finding it in the evaluation.

A contrastive encoder collapses when every image maps to (nearly) the same projection: the loss stops
moving, nothing is learnt, and nothing fails. The measure is the standard deviation across the batch of the
L2-normalised projections, averaged over dimensions: for unit vectors spread over ``d`` dimensions it is
about ``1/sqrt(d)``, and it is 0 when all projections coincide. Multiplied by ``sqrt(d)`` it reads the same
for any projector width: about 1 healthy, 0 collapsed.

The criterion: an epoch sits at collapse when the epoch mean of ``std * sqrt(d)`` is below
``COLLAPSE_THRESHOLD`` (0.05, a mean pairwise cosine of about 0.997). For SimCLR the monitor also reports the
base loss against ``log(2N - 1)``, the value NT-Xent takes when all projections coincide (``N`` the global
batch: each row's softmax is over the ``2N - 1`` other rows of the gathered batch); the loss is reported, not
used to decide, because an untrained encoder's loss is close to that value too. Measured on the digits default
(256-d projections, batch 128): the baseline's epoch means go 0.25 (a cosine of about 0.94 at initialisation),
0.67, 0.84 and on to 0.93; with same-class positives at lambda 1.0 from the first step they go 0.05, then 0.006
for good, with the base loss at log(2N - 1) to four digits.

A run counts as collapsed when its last epoch sits at collapse (it ended there, whatever happened before);
the record lists every collapsed epoch, so a run that collapsed and recovered is visible too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import Tensor

COLLAPSE_THRESHOLD = 0.05


def std_of_l2_normalized(z: Tensor) -> Tensor:
    """Std across the batch (dim 0) of the L2-normalised rows of ``z`` ``[B, d]``, averaged over the ``d`` dims."""
    return F.normalize(z.float(), dim=-1).std(dim=0).mean()


def nt_xent_at_collapse(global_batch: int) -> float:
    """NT-Xent with all projections equal: a uniform softmax over the ``2N - 1`` other rows, ``log(2N - 1)``."""
    return math.log(2 * global_batch - 1)


@dataclass
class CollapseMonitor:
    """Per-epoch record of ``z_std`` and the decision whether each epoch sat at collapse.

    ``z_std`` holds one value per finished epoch (1-based epoch ``i + 1`` at index ``i``), so a resumed run
    restores it from its checkpoint and keeps the whole record.
    """

    dim: int
    loss_at_collapse: float | None = None  # log(2N - 1) for SimCLR, else None
    threshold: float = COLLAPSE_THRESHOLD
    z_std: list[float] = field(default_factory=list)

    def normalised(self, z_std: float) -> float:
        """``z_std * sqrt(d)``: about 1 for projections spread over the sphere, 0 at collapse."""
        return z_std * math.sqrt(self.dim)

    def at_collapse(self, z_std: float) -> bool:
        return self.normalised(z_std) < self.threshold

    def observe(self, z_std: float) -> bool:
        """Record the next epoch's mean ``z_std``; True when that epoch sat at collapse."""
        self.z_std.append(float(z_std))
        return self.at_collapse(z_std)

    @property
    def epochs(self) -> list[int]:
        """The 1-based epochs that sat at collapse."""
        return [epoch for epoch, value in enumerate(self.z_std, start=1) if self.at_collapse(value)]

    def warning(self, run: str, epoch: int, z_std: float, loss_base: float | None) -> str:
        """The one line that says an epoch sat at collapse."""
        line = (f"{run}: epoch {epoch} sits at collapse: std of the normalised projections {z_std:.4g} "
                f"(x sqrt(d) = {self.normalised(z_std):.3f} < {self.threshold:g}; healthy about 1)")
        if self.loss_at_collapse is not None and loss_base is not None:
            line += f", base loss {loss_base:.4f} vs log(2B - 1) = {self.loss_at_collapse:.4f}"
        return line

    def record(self) -> dict:
        """The ``collapse`` entry of ``train_summary.json``."""
        epochs = self.epochs
        return {"collapsed": bool(self.z_std) and len(self.z_std) in epochs, "epochs": epochs,
                "z_std": self.z_std, "threshold": self.threshold, "loss_at_collapse": self.loss_at_collapse}
