"""Memory banks: MoCo's queue of negatives and NNCLR's support set.

Both are FIFO queues of embeddings held in buffers, so they live on the model's device, are part of the
``state_dict`` and are checkpointed and resumed with the model. New entries are gathered from all ranks
before they are written, which keeps the bank identical on every rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clsp.train.distributed import gather
from clsp.train.neighbours import BankIndex, nearest_neighbours


class FIFOQueue(nn.Module):
    """A fixed-size first-in-first-out queue of ``dim``-sized embeddings with an integer label each.

    The queue starts full of random unit vectors (MoCo's and solo-learn's NNCLR's choice), so the first
    steps already have negatives and neighbours. Labels are -1 where none was given.
    """

    embeddings: Tensor
    labels: Tensor
    ptr: Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"a queue needs a positive size and dim, got size={size}, dim={dim}")
        self.register_buffer("embeddings", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.embeddings.shape[0]

    def contents(self) -> tuple[Tensor, Tensor]:
        """``(embeddings [size, dim], labels [size])`` as detached copies: a later ``push`` overwrites the
        buffers in place, and a caller's tensors (kept by autograd for the backward pass) stay as they were."""
        return self.embeddings.detach().clone(), self.labels.clone()

    @torch.no_grad()
    def push(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """Append the rows of ``x`` (and their labels) from every rank, overwriting the oldest entries;
        returns the slots written."""
        x = gather(x.detach())
        if labels is None:
            labels = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        else:
            labels = gather(labels.detach().to(device=x.device, dtype=torch.long))
        x, labels = x[-self.size:], labels[-self.size:]
        slots = (self.ptr + torch.arange(x.shape[0], device=self.ptr.device)) % self.size
        self.embeddings.index_copy_(0, slots, x.to(self.embeddings))
        self.labels.index_copy_(0, slots, labels.to(self.labels.device))
        self.ptr.copy_((self.ptr + x.shape[0]) % self.size)
        return slots


class SupportSet(FIFOQueue):
    """NNCLR's support set: a FIFO of view-1 embeddings searched for each query's nearest neighbour.

    ``index`` is ``flat`` (exact, FAISS) or ``ivf``/``hnsw``: an approximate index kept across steps
    (``BankIndex``) and rebuilt from the set when enough of it has been overwritten; it is not part of the
    state and is rebuilt after a resume.
    """

    def __init__(self, size: int, dim: int, index: str = "flat") -> None:
        super().__init__(size, dim)
        self.index = index
        self._approximate = BankIndex(index) if index != "flat" else None

    @torch.no_grad()
    def push(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        slots = super().push(x, labels)
        if self._approximate is not None:
            self._approximate.mark_written(slots)
        return slots

    @torch.no_grad()
    def nearest(self, queries: Tensor) -> tuple[Tensor, Tensor]:
        """``(neighbours [B, dim], their labels [B])`` by inner product over the whole set."""
        bank, bank_labels = self.embeddings, self.labels  # read before any push: no copy needed
        if self._approximate is not None:
            _, idx = self._approximate.search(queries, bank, k=1)
        else:
            _, idx = nearest_neighbours(queries, bank, k=1)
        idx = idx[:, 0].to(bank.device)
        return bank[idx].to(queries.dtype), bank_labels[idx]
