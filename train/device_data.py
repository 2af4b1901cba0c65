"""A training set that lives on the training device: no loader, no host copies, no CPU per step.

For CIFAR-sized data every anchor and every positive fits on one GPU as uint8 (CIFAR-10 with 8
positives: 50,000 x 9 x 3,072 bytes = 1.4 GB). A step then gathers its anchors and one drawn
positive per anchor by index on the device and hands uint8 ``[B, 3, H, W]`` batches to the batched
augmentation (``clsp.train.augment.DeviceAugment``), so the input pipeline costs a few kernel
launches per step instead of CPU cores. Draws come from a ``torch.Generator`` on the device: the
same seed gives the same batches on the same device type.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from clsp.datasets import ImageDataset
from clsp.train.decoded_cache import DecodedShards


class DeviceDataset:
    """Anchors uint8 ``[N, 3, H, W]``, positives uint8 ``[N, k, 3, H, W]`` and labels ``[N]`` on one device.

    Rows are positions ``0..N-1``; ``index`` maps a row to its anchor index in the real dataset.
    """

    def __init__(self, anchors: np.ndarray | Tensor, positives: np.ndarray | Tensor, labels: np.ndarray | Tensor,
                 device: torch.device | str, index: np.ndarray | Tensor | None = None) -> None:
        self.device = torch.device(device)
        # copied channels-last as given, transposed on the device (no second full-size copy on the host)
        self.anchors = _to_device(anchors, self.device).permute(0, 3, 1, 2).contiguous()
        self.positives = _to_device(positives, self.device).permute(0, 1, 4, 2, 3).contiguous()
        self.labels = _to_device(labels, self.device).long()
        n = len(self.anchors)
        self.index = torch.arange(n, device=self.device) if index is None else _to_device(index, self.device).long()
        if not (len(self.positives) == len(self.labels) == len(self.index) == n):
            raise ValueError(f"anchors, positives, labels and index disagree in length: {n}, {len(self.positives)}, "
                             f"{len(self.labels)}, {len(self.index)}")
        if self.anchors.dtype != torch.uint8 or self.positives.dtype != torch.uint8:
            raise ValueError("anchors and positives must be uint8 images")

    @classmethod
    def from_decoded(cls, decoded: DecodedShards, dataset: ImageDataset, device: torch.device | str) -> DeviceDataset:
        """Every anchor of a decoded shard set (real images from the shards, else from the dataset)."""
        index, positives = decoded.arrays()
        anchors = decoded.stored_anchors(index)
        if anchors is None:
            anchors = dataset.array(index)
        return cls(anchors, positives, dataset.labels()[index], device, index=index)

    def __len__(self) -> int:
        return len(self.anchors)

    @property
    def candidates(self) -> int:
        return self.positives.shape[1]

    @property
    def nbytes(self) -> int:
        return self.anchors.nbytes + self.positives.nbytes

    def batch(self, rows: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        """The batch of ``rows`` with one positive drawn per row, shaped as ``ContrastiveStream`` yields
        with ``augment="device"``: ``index``, ``label``, uint8 ``anchor`` and ``positive`` ``[B, 3, H, W]``.
        """
        rows = rows.to(self.device)
        candidate = torch.randint(self.candidates, (len(rows),), generator=generator, device=self.device)
        return {"index": self.index[rows], "label": self.labels[rows], "anchor": self.anchors[rows],
                "positive": self.positives[rows, candidate]}

    def batches(self, batch_size: int, generator: torch.Generator) -> Iterator[dict[str, Tensor]]:
        """One epoch: a random permutation cut into full batches (the tail is dropped)."""
        order = torch.randperm(len(self), generator=generator, device=self.device)
        for start in range(0, len(self) - batch_size + 1, batch_size):
            yield self.batch(order[start:start + batch_size], generator)


def _to_device(array: np.ndarray | Tensor, device: torch.device) -> Tensor:
    tensor = array if isinstance(array, Tensor) else torch.from_numpy(np.ascontiguousarray(array))
    return tensor.to(device)
