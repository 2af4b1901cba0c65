"""Contrastive losses of the base methods (SupCon's with labels) and the CLSP term.

Every loss L2-normalises its inputs itself (normalising twice changes nothing), computes in float32 even
inside a bf16 autocast region (logits at temperature 0.2 lose too much in bf16), and gathers across ranks
where the method takes negatives from the whole global batch. Rows of the same local batch are positives
of each other by position.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from clsp.train.distributed import gather, get_rank, get_world_size


def float32_math(loss: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Run ``loss`` with autocast switched off, on its floating-point tensor arguments (positional or keyword)
    raised to at least float32."""

    def raised(value):
        if isinstance(value, Tensor) and value.is_floating_point():
            return value.to(torch.promote_types(value.dtype, torch.float32))
        return value  # masks and indices stay as they are

    @functools.wraps(loss)
    def wrapper(*args, **kwargs) -> Tensor:
        device = next(v.device for v in (*args, *kwargs.values()) if isinstance(v, Tensor))
        with torch.autocast(device.type, enabled=False):
            return loss(*map(raised, args), **{key: raised(value) for key, value in kwargs.items()})

    return wrapper


@float32_math
def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.2) -> Tensor:
    """SimCLR's NT-Xent: each of the 2B local rows against the 2N-1 other rows of the global batch.

    Row i of ``z1`` and row i of ``z2`` are positives; every other view of the gathered batch (both views
    of all ranks) is a negative. The result is the mean over local rows, so the mean over ranks equals the
    single-process loss on the concatenated batch.
    """
    z1, z2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
    b, n = z1.shape[0], z1.shape[0] * get_world_size()
    keys = torch.cat([gather(z1), gather(z2)])
    logits = torch.cat([z1, z2]) @ keys.T / temperature
    local = torch.arange(b, device=z1.device) + get_rank() * b
    own = torch.cat([local, local + n])
    positive = torch.cat([local + n, local])
    self_mask = F.one_hot(own, num_classes=2 * n).bool()
    return F.cross_entropy(logits.masked_fill(self_mask, float("-inf")), positive)


@float32_math
def positive_nce(queries: Tensor, positives: Tensor, keys: Tensor, excluded: Tensor | None = None,
                 temperature: float = 0.2) -> Tensor:
    """InfoNCE of each query against its own positive and the rows of ``keys`` as negatives.

    Row i of ``queries`` [Q, D] has ``positives[i]`` as its positive; ``keys`` [K, D] are its negatives, less
    those where ``excluded`` [Q, K] is True (the other views of the query's own image). This is how a
    synthetic positive joins a method's loss (``positive_loss: infonce``) against that loss's negatives.
    """
    queries, positives, keys = (F.normalize(t, dim=-1) for t in (queries, positives, keys))
    negatives = queries @ keys.T
    if excluded is not None:
        negatives = negatives.masked_fill(excluded, float("-inf"))
    logits = torch.cat([(queries * positives).sum(dim=-1, keepdim=True), negatives], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(queries.shape[0], dtype=torch.long, device=queries.device))


def simclr_positive_nce(z1: Tensor, z2: Tensor, positive: Tensor, temperature: float = 0.2) -> Tensor:
    """``positive`` as a second positive of both views of each local row in SimCLR's loss: the negatives are
    those of ``nt_xent``, every view of the other images of the global batch."""
    b, n = z1.shape[0], z1.shape[0] * get_world_size()
    keys = torch.cat([gather(z1), gather(z2)])
    local = torch.arange(b, device=z1.device) + get_rank() * b
    own = F.one_hot(local, num_classes=n).bool()
    excluded = torch.cat([own, own], dim=1).repeat(2, 1)  # both views of the query's own image
    return positive_nce(torch.cat([z1, z2]), torch.cat([positive, positive]), keys, excluded, temperature)


@float32_math
def supcon_loss(z1: Tensor, z2: Tensor, labels: Tensor, temperature: float = 0.2) -> Tensor:
    """Supervised contrast (Khosla et al. 2020, the authors' ``simclr_supervised``): each of the 2B local rows
    against the 2N-1 other views of the global batch, with every view of the same label as a positive.

    Per row, the loss is minus the mean log-softmax over its positives (the denominator excludes the row
    itself); the result is the mean over local rows, so the mean over ranks equals the single-process loss.
    With all labels distinct it is ``nt_xent``.
    """
    z1, z2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
    b, n = z1.shape[0], z1.shape[0] * get_world_size()
    keys = torch.cat([gather(z1), gather(z2)])
    key_labels = gather(labels).repeat(2)
    logits = torch.cat([z1, z2]) @ keys.T / temperature
    local = torch.arange(b, device=z1.device) + get_rank() * b
    self_mask = F.one_hot(torch.cat([local, local + n]), num_classes=2 * n).bool()
    log_prob = logits.masked_fill(self_mask, float("-inf")).log_softmax(dim=1)
    positive = (labels.repeat(2)[:, None] == key_labels[None, :]) & ~self_mask
    return -(log_prob.masked_fill(~positive, 0.0).sum(dim=1) / positive.sum(dim=1)).mean()


@float32_math
def moco_loss(query: Tensor, key: Tensor, queue: Tensor, temperature: float = 0.2) -> Tensor:
    """InfoNCE of MoCo: the key of the same image is the positive, the queue rows ``[K, D]`` the negatives."""
    query, key, queue = F.normalize(query, dim=-1), F.normalize(key, dim=-1), F.normalize(queue, dim=-1)
    positive = (query * key).sum(dim=-1, keepdim=True)
    logits = torch.cat([positive, query @ queue.T], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(query.shape[0], dtype=torch.long, device=query.device))


@float32_math
def nnclr_loss(neighbours: Tensor, predictions: Tensor, temperature: float = 0.2) -> Tensor:
    """NNCLR: each local neighbour NN(z) against the predictions of the whole global batch.

    The prediction of the same image (at this rank's offset in the gathered batch) is the positive; the
    neighbours come from the support set and carry no gradient.
    """
    neighbours, predictions = F.normalize(neighbours, dim=-1), F.normalize(predictions, dim=-1)
    b = neighbours.shape[0]
    logits = neighbours @ gather(predictions).T / temperature
    targets = torch.arange(b, device=neighbours.device) + get_rank() * b
    return F.cross_entropy(logits, targets)


@float32_math
def clsp_loss(z1: Tensor, z3: Tensor) -> Tensor:
    """The CLSP term ``mean_i ||z1_i - z3_i||^2`` on normalised embeddings, i.e. ``mean(2 - 2 cos)``.

    Gradients flow into both arguments: the anchor view is pulled towards its synthetic positive and back.
    """
    z1, z3 = F.normalize(z1, dim=-1), F.normalize(z3, dim=-1)
    return (z1 - z3).pow(2).sum(dim=-1).mean()
