"""FAISS neighbours: exact search equals brute force, approximate indexes keep a high recall, and a memory
bank (full of random unit vectors from the start) returns its own rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clsp.errors import UserError
from clsp.train.memory import SupportSet
from clsp.train.neighbours import nearest_neighbours


def _random(n: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


@pytest.mark.parametrize("queries,bank_size,k", [(1, 7, 1), (16, 300, 1), (64, 2000, 5)])
def test_flat_search_equals_brute_force_topk(queries: int, bank_size: int, k: int):
    q, bank = _random(queries, 32, seed=0), _random(bank_size, 32, seed=1)
    scores, indices = nearest_neighbours(q, bank, k=k, index="flat")
    expected_scores, expected_indices = torch.topk(q @ bank.T, k, dim=1)
    assert indices.dtype == torch.int64 and indices.shape == (queries, k)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flat_search_on_cuda_equals_brute_force_topk():
    q, bank = _random(64, 32, seed=0).cuda(), _random(5000, 32, seed=1).cuda()
    scores, indices = nearest_neighbours(q, bank, k=3)
    expected_scores, expected_indices = torch.topk(q @ bank.T, 3, dim=1)
    assert indices.is_cuda and torch.equal(indices, expected_indices)
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=1e-4)


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_indexes_find_the_true_neighbour_on_clustered_data(index: str):
    g = torch.Generator().manual_seed(2)
    centres = torch.randn(40, 32, generator=g)
    bank = F.normalize(centres.repeat_interleave(100, dim=0) + 0.3 * torch.randn(4000, 32, generator=g), dim=1)
    queries = F.normalize(bank[::20] + 0.05 * torch.randn(200, 32, generator=g), dim=1)
    _, exact = nearest_neighbours(queries, bank, index="flat")
    scores, approx = nearest_neighbours(queries, bank, index=index)
    recall = (approx[:, 0] == exact[:, 0]).float().mean().item()
    assert recall >= 0.95, f"{index} recall@1 {recall:.3f}"
    torch.testing.assert_close(scores[:, 0], (queries * bank[approx[:, 0]]).sum(1), rtol=0, atol=1e-5)


def test_bad_arguments_are_refused():
    q, bank = _random(2, 4, seed=0), _random(3, 4, seed=1)
    with pytest.raises(UserError, match="flat, ivf, hnsw"):
        nearest_neighbours(q, bank, index="annoy")
    with pytest.raises(ValueError, match="k=4"):
        nearest_neighbours(q, bank, k=4)
    with pytest.raises(ValueError, match="share D"):
        nearest_neighbours(q, _random(3, 5, seed=1))


@pytest.mark.parametrize("index", ["flat", "hnsw"])
def test_a_pushed_row_is_its_own_nearest_neighbour(index: str):
    support = SupportSet(size=16, dim=4, index=index)
    stored = torch.eye(4)[:2]  # e0, e1; the other 14 slots keep their random unit vectors
    support.push(stored, labels=torch.tensor([3, 5]))
    bank, bank_labels = support.contents()
    assert bank.shape == (16, 4) and bank_labels.shape == (16,)
    assert (bank_labels == -1).sum().item() == 14
    neighbours, labels = support.nearest(stored)
    torch.testing.assert_close(neighbours, stored)
    assert labels.tolist() == [3, 5]


def test_a_fresh_support_set_returns_one_of_its_random_unit_vectors():
    torch.manual_seed(0)
    support = SupportSet(size=4, dim=2)
    bank, bank_labels = support.contents()
    torch.testing.assert_close(bank.norm(dim=1), torch.ones(4))
    assert bank_labels.tolist() == [-1] * 4
    query = torch.ones(1, 2)
    neighbours, labels = support.nearest(query)
    torch.testing.assert_close(neighbours, bank[(query @ bank.T).argmax(dim=1)])
    assert labels.tolist() == [-1]


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_an_approximate_support_set_follows_the_bank_as_it_is_overwritten(index: str):
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(30, 16, generator=g)

    def batch(n: int) -> torch.Tensor:
        picks = torch.randint(0, 30, (n,), generator=g)
        return F.normalize(centres[picks] + 0.3 * torch.randn(n, 16, generator=g), dim=1)

    support, hits, total = SupportSet(size=1024, dim=16, index=index), 0, 0
    for step in range(20):  # fills the set, then overwrites it once more (several index rebuilds)
        support.push(batch(96), labels=torch.full((96,), step))
        queries = batch(32)
        neighbours, labels = support.nearest(queries)
        bank, bank_labels = support.contents()
        _, exact = nearest_neighbours(queries, bank)
        hits += (neighbours == bank[exact[:, 0]]).all(dim=1).sum().item()
        total += len(queries)
        # whatever is returned is a row the set holds now, with its current label
        found = (neighbours @ bank.T).argmax(dim=1)
        torch.testing.assert_close(neighbours, bank[found])
        assert torch.equal(labels, bank_labels[found])
    assert hits / total >= 0.95, f"{index} recall@1 {hits / total:.3f}"
