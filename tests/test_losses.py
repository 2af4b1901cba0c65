"""Losses against hand-computed small cases, and cross-rank gathering in a real 2-process gloo group."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clsp.train.distributed import gather, get_rank, get_world_size
from clsp.train.losses import clsp_loss, moco_loss, nnclr_loss, nt_xent
from clsp.train.memory import FIFOQueue


def _unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return sum(float(x) * float(y) for x, y in zip(a, b))


def test_nt_xent_matches_the_formula_on_three_pairs():
    z1, z2, t = _unit(3, 4, seed=0), _unit(3, 4, seed=1), 0.2
    views = list(z1) + list(z2)  # sample i has views i and i + 3
    terms = []
    for i, anchor in enumerate(views):
        positive = views[(i + 3) % 6]
        denominator = sum(math.exp(_dot(anchor, other) / t) for j, other in enumerate(views) if j != i)
        terms.append(-math.log(math.exp(_dot(anchor, positive) / t) / denominator))
    assert nt_xent(z1, z2, t).item() == pytest.approx(sum(terms) / 6, rel=1e-10)
    # inputs are normalised inside: scaling the rows changes nothing
    assert nt_xent(3 * z1, 0.5 * z2, t).item() == pytest.approx(sum(terms) / 6, rel=1e-10)


def test_moco_loss_matches_the_formula():
    q, k, queue, t = _unit(2, 4, seed=2), _unit(2, 4, seed=3), _unit(3, 4, seed=4), 0.2
    expected = 0.0
    for i in range(2):
        positive = math.exp(_dot(q[i], k[i]) / t)
        negatives = sum(math.exp(_dot(q[i], n) / t) for n in queue)
        expected += -math.log(positive / (positive + negatives)) / 2
    assert moco_loss(q, k, queue, t).item() == pytest.approx(expected, rel=1e-10)


def test_nnclr_loss_matches_the_formula():
    nn, p, t = _unit(3, 4, seed=5), _unit(3, 4, seed=6), 0.2
    expected = 0.0
    for i in range(3):
        row = [math.exp(_dot(nn[i], p[j]) / t) for j in range(3)]
        expected += -math.log(row[i] / sum(row)) / 3
    assert nnclr_loss(nn, p, t).item() == pytest.approx(expected, rel=1e-10)


def test_clsp_term_is_two_minus_two_cosine_with_gradient_into_both_views():
    z1 = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    z3 = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    loss = clsp_loss(z1, z3)
    expected = (2 - 2 * F.cosine_similarity(z1, z3, dim=-1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    loss.backward()
    assert z1.grad.abs().sum() > 0 and z3.grad.abs().sum() > 0
    assert clsp_loss(z1, 2 * z1).item() == pytest.approx(0.0, abs=1e-12)


def test_losses_compute_in_float32_inside_bf16_autocast():
    z1, z2 = torch.randn(6, 8), torch.randn(6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = nt_xent(z1, z2), moco_loss(z1, z2, z2), nnclr_loss(z1, z2), clsp_loss(z1, z2)
    outside = nt_xent(z1, z2), moco_loss(z1, z2, z2), nnclr_loss(z1, z2), clsp_loss(z1, z2)
    for a, b in zip(inside, outside):
        assert a.dtype == torch.float32 and a.item() == pytest.approx(b.item(), rel=1e-6)


def test_losses_take_their_tensors_as_keywords_and_still_compute_in_float32():
    z1, z2 = torch.randn(6, 8).bfloat16(), torch.randn(6, 8).bfloat16()
    by_keyword = nt_xent(z1=z1, z2=z2, temperature=0.5), clsp_loss(z1=z1, z3=z2)
    by_position = nt_xent(z1.float(), z2.float(), 0.5), clsp_loss(z1.float(), z2.float())
    for a, b in zip(by_keyword, by_position):
        assert a.dtype == torch.float32 and a.item() == pytest.approx(b.item(), rel=1e-6)


def test_gather_is_the_identity_without_a_process_group():
    x = torch.randn(4, 3, requires_grad=True)
    assert gather(x) is x and get_rank() == 0 and get_world_size() == 1


# ---------------------------------------------------------------- two real processes (gloo)

WORLD, LOCAL_BATCH, DIM = 2, 3, 5


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(WORLD * LOCAL_BATCH, DIM, generator=g), torch.randn(WORLD * LOCAL_BATCH, DIM, generator=g)


def _rank_worker(rank: int, store: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        a_all, b_all = _global_batch()
        a = a_all[rows].clone().requires_grad_(True)
        b = b_all[rows].clone().requires_grad_(True)
        gathered = gather(a)
        (gathered * torch.arange(1.0, WORLD * LOCAL_BATCH + 1).unsqueeze(1)).sum().backward()
        weighted_grad = a.grad.clone()
        a.grad = None
        simclr = nt_xent(a, b, 0.2)
        simclr.backward()
        nnclr = nnclr_loss(a.detach(), b, 0.2)
        queue = FIFOQueue(8, DIM)
        queue.push(a, labels=torch.full((LOCAL_BATCH,), rank))
        torch.save({"world": get_world_size(), "gathered": gathered.detach(), "weighted_grad": weighted_grad,
                    "simclr": simclr.detach(), "simclr_grad_a": a.grad, "simclr_grad_b": b.grad,
                    "nnclr": nnclr.detach(), "queue": queue.state_dict()}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_rank_gather_and_losses_equal_the_single_process_ones(tmp_path: Path):
    import torch.multiprocessing as mp

    mp.spawn(_rank_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    a_all, b_all = _global_batch()
    a_single, b_single = a_all.clone().requires_grad_(True), b_all.clone().requires_grad_(True)
    single = nt_xent(a_single, b_single, 0.2)
    single.backward()
    for rank, res in enumerate(results):
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        assert res["world"] == WORLD
        assert res["gathered"].shape == (WORLD * LOCAL_BATCH, DIM)
        torch.testing.assert_close(res["gathered"], a_all)
        # gradient of sum(row_weight * gathered) reaches the local slice, summed over both ranks' losses
        local_weights = torch.arange(1.0, WORLD * LOCAL_BATCH + 1)[rows].unsqueeze(1).expand(-1, DIM)
        torch.testing.assert_close(res["weighted_grad"], WORLD * local_weights)
        # with DDP's gradient averaging, per-rank gradients reproduce the single-process gradient
        torch.testing.assert_close(res["simclr_grad_a"] / WORLD, a_single.grad[rows])
        torch.testing.assert_close(res["simclr_grad_b"] / WORLD, b_single.grad[rows])
        # the queue received the rows of both ranks, in rank order, with their labels
        torch.testing.assert_close(res["queue"]["embeddings"][: WORLD * LOCAL_BATCH], a_all)
        assert res["queue"]["labels"][: WORLD * LOCAL_BATCH].tolist() == [0] * LOCAL_BATCH + [1] * LOCAL_BATCH
    mean_simclr = sum(res["simclr"] for res in results) / WORLD
    assert mean_simclr.item() == pytest.approx(single.item(), rel=1e-5)
    mean_nnclr = sum(res["nnclr"] for res in results) / WORLD
    assert mean_nnclr.item() == pytest.approx(nnclr_loss(a_all, b_all, 0.2).item(), rel=1e-5)
