"""Counting the aten operations a piece of eager code dispatches: kernel launches, roughly, and host traffic.

At CIFAR sizes a GPU step is bound by how many kernels it launches (5-10 us each) rather than by its FLOPs,
so the count is a speed measure that a CPU can take: a regression shows here before any GPU is involved.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# tensors made from host values (torch.tensor), moves between devices and reads back (.item()): each a copy
# through the host, and on CUDA a sync
HOST_TRAFFIC = ("aten.lift_fresh", "aten._local_scalar_dense", "to another device")


class AtenOps(TorchDispatchMode):
    """Inside, every aten op dispatched is counted by name in ``ops`` (a move to another device as
    ``"to another device"``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        moved = func.overloadpacket is torch.ops.aten._to_copy and "device" in kwargs
        self.ops["to another device" if moved else str(func.overloadpacket)] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def host_traffic(self) -> int:
        return sum(self.ops[name] for name in HOST_TRAFFIC)
