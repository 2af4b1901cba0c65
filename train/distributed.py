"""Cross-rank gathering for contrastive losses.

Contrastive methods need every rank's embeddings as negatives (SimCLR, NNCLR) or as the queue/support-set
content (MoCo, NNCLR). Everything here is a no-op when ``torch.distributed`` is not initialised, so the
same code runs in one process and under ``accelerate launch``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


class _GatherWithGrad(torch.autograd.Function):
    """``all_gather`` whose backward sums each slice's gradient over ranks and returns the local one.

    Summing (rather than keeping only the local rank's gradient, as solo-learn's GatherLayer does) makes the
    DDP-averaged gradient equal the gradient of the single-process loss over the whole global batch: every
    rank's loss term depends on this rank's rows, not only the local one.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> tuple[Tensor, ...]:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> Tensor:
        stacked = torch.stack(grads)
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        return stacked[dist.get_rank()]


def gather(x: Tensor) -> Tensor:
    """Concatenate ``x`` from all ranks along dim 0 in rank order (``world * B`` rows), keeping gradients.

    Every rank must pass the same shape (the trainer drops the last incomplete batch). A detached input
    gives a detached result, which is how queues and support sets receive new entries.
    """
    if not is_distributed():
        return x
    return torch.cat(_GatherWithGrad.apply(x.contiguous()))
