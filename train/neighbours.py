"""Nearest neighbours by inner product with FAISS.

``flat`` is exact: FAISS's ``IndexFlatIP`` on CPU, and on CUDA tensors FAISS's GPU brute-force search when
FAISS was built with GPU support (``faiss-gpu``). ``ivf`` and ``hnsw`` are approximate CPU indexes for banks
large enough that exact search costs more than it is worth (a support set of a whole dataset).
``nearest_neighbours`` builds its index for one search over a fixed bank; ``BankIndex`` keeps one across
searches of a memory bank whose rows are overwritten a batch at a time.
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache
from typing import TYPE_CHECKING, get_args

import torch
from torch import Tensor

from clsp.errors import UserError
from clsp.train.recipes import NNIndex

if TYPE_CHECKING:
    import faiss

NN_INDEXES: tuple[str, ...] = get_args(NNIndex)

HNSW_NEIGHBOURS = 32  # graph degree M of the HNSW index
HNSW_EF_SEARCH = 128  # candidate list size at query time; higher = better recall, slower
IVF_MIN_POINTS_PER_LIST = 39  # FAISS's k-means wants at least this many training points per centroid


def check_index(index: str) -> str:
    if index not in NN_INDEXES:
        raise UserError(f"unknown nearest-neighbour index {index!r}; choose one of: {', '.join(NN_INDEXES)}")
    return index


def nearest_neighbours(queries: Tensor, bank: Tensor, k: int = 1, index: str = "flat") -> tuple[Tensor, Tensor]:
    """The ``k`` rows of ``bank`` with the largest inner product with each query.

    Returns ``(scores [Q, k] float32, indices [Q, k] int64)`` on the queries' device, best first. For
    ``flat`` this is what ``torch.topk(queries @ bank.T, k)`` returns. Pass only the filled part of a
    bank: every row given can be returned.
    """
    check_index(index)
    if queries.ndim != 2 or bank.ndim != 2 or queries.shape[1] != bank.shape[1]:
        raise ValueError(f"queries [Q, D] and bank [N, D] must share D, got {tuple(queries.shape)} "
                         f"and {tuple(bank.shape)}")
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(f"k={k} neighbours asked of a bank of {bank.shape[0]} rows")
    device = queries.device
    queries = queries.detach().float().contiguous()
    bank = bank.detach().float().contiguous()
    if index == "flat" and queries.is_cuda:
        with torch.autocast("cuda", enabled=False):
            return _flat_cuda(queries, bank.to(device), k)
    search = _build_cpu_index(index, bank.cpu().numpy())
    scores, indices = search.search(queries.cpu().numpy(), k)
    return torch.from_numpy(scores).to(device), torch.from_numpy(indices).to(device)


def _build_cpu_index(index: str, bank) -> faiss.Index:
    import faiss  # here, where it is used: importing this module (every method's) does not load FAISS

    n, dim = bank.shape
    built: faiss.Index
    if index == "flat":
        built = faiss.IndexFlatIP(dim)
    elif index == "hnsw":
        graph = faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efSearch = HNSW_EF_SEARCH
        built = graph
    else:
        lists = max(1, min(int(math.sqrt(n)), n // IVF_MIN_POINTS_PER_LIST))
        built = faiss.index_factory(dim, f"IVF{lists},Flat", faiss.METRIC_INNER_PRODUCT)
        built.train(bank)
        faiss.extract_index_ivf(built).nprobe = max(1, lists // 8)
    built.add(bank)
    return built


def _flat_cuda(queries: Tensor, bank: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact search on the GPU: FAISS's GPU kernel when available, else the same search in torch."""
    resources = _gpu_resources()
    if resources is None:
        _warn_no_faiss_gpu()
        return torch.topk(queries @ bank.T, k, dim=1)
    import faiss.contrib.torch_utils  # (binds faiss; lets FAISS's GPU search take and return CUDA tensors)

    scores, indices = faiss.knn_gpu(resources, queries, bank, k, metric=faiss.METRIC_INNER_PRODUCT,
                                    device=queries.device.index or 0)
    return scores, indices.long()


@lru_cache(maxsize=1)
def _gpu_resources():
    """One set of FAISS GPU resources (scratch memory, streams) per process, or None without faiss-gpu."""
    import faiss

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return None
    return faiss.StandardGpuResources()


@lru_cache(maxsize=1)
def _warn_no_faiss_gpu() -> None:
    warnings.warn("FAISS has no GPU support here (faiss-cpu); exact neighbours on CUDA are searched with "
                  "torch instead. Install faiss-gpu to use FAISS's GPU kernels.", stacklevel=3)


class BankIndex:
    """Approximate search over a memory bank that changes a batch of rows at a time.

    Building an IVF or HNSW index costs more than one exact search, so the index is built from the bank
    once and reused: rows written since then ("fresh") are searched exactly, the index proposes
    ``candidates`` rows per query among the others, and every proposal is re-scored against the bank's
    current content. The index is rebuilt when the fresh rows (overwritten or appended since the build)
    exceed ``refresh_fraction`` of the bank, which bounds the exact part to that fraction of a flat search.
    """

    def __init__(self, kind: str, refresh_fraction: float = 0.2, candidates: int = 16) -> None:
        if check_index(kind) == "flat":
            raise ValueError("BankIndex is for the approximate indexes (ivf, hnsw); search flat banks directly")
        self.kind, self.refresh_fraction, self.candidates = kind, refresh_fraction, candidates
        self._index: faiss.Index | None = None
        self._fresh = torch.zeros(0, dtype=torch.bool)

    def mark_written(self, slots: Tensor) -> None:
        """Record bank rows that were overwritten since the index was built."""
        if self._index is not None:
            self._grow(int(slots.max()) + 1)
            self._fresh[slots.cpu()] = True

    def _grow(self, n: int) -> None:
        """Rows appended to a filling bank after the build are fresh too."""
        if n > len(self._fresh):
            self._fresh = torch.cat([self._fresh, torch.ones(n - len(self._fresh), dtype=torch.bool)])

    def search(self, queries: Tensor, bank: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
        """Like ``nearest_neighbours(queries, bank, k, kind)``, scores taken from the current ``bank``."""
        n, device = bank.shape[0], queries.device
        if not 1 <= k <= n:
            raise ValueError(f"k={k} neighbours asked of a bank of {n} rows")
        queries, bank = queries.detach().float().to(bank.device), bank.detach().float()
        self._grow(n)
        if self._index is None or len(self._fresh) != n or self._fresh.sum() > self.refresh_fraction * n:
            self._index = _build_cpu_index(self.kind, bank.cpu().contiguous().numpy())
            self._fresh = torch.zeros(n, dtype=torch.bool)
        _, found = self._index.search(queries.cpu().contiguous().numpy(), min(self.candidates, n))
        proposed = torch.from_numpy(found)
        stale = (proposed < 0) | self._fresh[proposed.clamp(min=0)]  # missing, or superseded by a fresh row
        proposed = proposed.clamp(min=0).to(bank.device)
        fresh = self._fresh.nonzero()[:, 0].to(bank.device)
        with torch.autocast(bank.device.type, enabled=False):
            scores = torch.einsum("qd,qcd->qc", queries, bank[proposed])
            scores = scores.masked_fill(stale.to(bank.device), float("-inf"))
            scores = torch.cat([scores, queries @ bank[fresh].T], dim=1)
        ids = torch.cat([proposed, fresh.expand(queries.shape[0], -1)], dim=1)
        best, where = torch.topk(scores, k, dim=1)
        return best.to(device), ids.gather(1, where).to(device)
