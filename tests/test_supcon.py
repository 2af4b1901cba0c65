"""Supervised contrast (``--method supcon``): the loss against its formula, across ranks, and through clsp-train."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from clsp.train.cli import train
from clsp.train.losses import nt_xent, supcon_loss
from support import TRAIN_ANCHORS as NUM_ANCHORS
from support import make_train_shards, unlabelled_train_shards

TINY = ["--epochs", "1", "--backbone", "resnet-narrow", "--batch-size", "8", "--workers", "0", "--precision", "fp32",
        "--proj-hidden-dim", "64", "--proj-output-dim", "32"]


def supcon_by_hand(z1: torch.Tensor, z2: torch.Tensor, labels: list[int], temperature: float) -> float:
    """Khosla et al.'s L_out written as loops: for each of the 2B views, minus the mean over its positives P(i)
    of log(exp(s_ip / t) / sum_{a != i} exp(s_ia / t))."""
    views = F.normalize(torch.cat([z1, z2]), dim=-1).tolist()
    classes = labels + labels
    total = 0.0
    for i, anchor in enumerate(views):
        sims = [sum(x * y for x, y in zip(anchor, other)) / temperature for other in views]
        denominator = sum(math.exp(s) for a, s in enumerate(sims) if a != i)
        positives = [p for p in range(len(views)) if p != i and classes[p] == classes[i]]
        total -= sum(math.log(math.exp(sims[p]) / denominator) for p in positives) / len(positives)
    return total / len(views)


def test_supcon_loss_is_the_formula_and_nt_xent_with_distinct_labels():
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    labels = [0, 1, 0, 2, 1, 0]
    got = supcon_loss(z1, z2, torch.tensor(labels), 0.2)
    assert got.item() == pytest.approx(supcon_by_hand(z1, z2, labels, 0.2), rel=1e-5)
    assert supcon_loss(z1, z2, torch.arange(6), 0.2).item() == pytest.approx(nt_xent(z1, z2, 0.2).item(), rel=1e-6)
    # the inputs are normalised by the loss itself
    assert supcon_loss(3 * z1, z2, torch.tensor(labels), 0.2).item() == pytest.approx(got.item(), rel=1e-6)


WORLD, LOCAL = 2, 3


def _global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return torch.randn(WORLD * LOCAL, 4, generator=g), torch.randn(WORLD * LOCAL, 4, generator=g), \
        torch.tensor([0, 1, 1, 0, 2, 1])


def _rank_worker(rank: int, store: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
        a_all, b_all, labels = _global_batch()
        a = a_all[rows].clone().requires_grad_(True)
        b = b_all[rows].clone().requires_grad_(True)
        loss = supcon_loss(a, b, labels[rows], 0.2)
        loss.backward()
        torch.save({"loss": loss.detach(), "grad_a": a.grad}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_rank_supcon_equals_the_single_process_loss(tmp_path: Path):
    """Positives and negatives come from every rank: the ranks' mean loss and DDP-averaged gradients are the
    single-process ones on the whole batch (a positive only on the other rank counts)."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    a_all, b_all, labels = _global_batch()
    a = a_all.clone().requires_grad_(True)
    single = supcon_loss(a, b_all, labels, 0.2)
    single.backward()
    assert (sum(r["loss"] for r in results) / WORLD).item() == pytest.approx(single.item(), rel=1e-5)
    for rank, res in enumerate(results):
        torch.testing.assert_close(res["grad_a"] / WORLD, a.grad[rank * LOCAL:(rank + 1) * LOCAL])


@pytest.mark.parametrize("clsp_lambda", ["0", "1"])
def test_clsp_train_runs_supcon_with_and_without_the_clsp_term(tmp_path, clsp_lambda):
    shards = make_train_shards(tmp_path / "shards")
    out = tmp_path / "run"
    result = CliRunner().invoke(train, ["--shards", str(shards), "--out", str(out), "--method", "supcon",
                                        "--clsp-lambda", clsp_lambda, *TINY])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["settings"]["method"] == "supcon" and summary["steps"] == NUM_ANCHORS // 8
    assert summary["settings"]["temperature"] == 0.2 and summary["final"]["loss_base"] > 0
    assert (summary["final"]["loss_clsp"] > 0) == (clsp_lambda == "1")


def test_supcon_without_labels_is_one_error_line(tmp_path):
    shards = unlabelled_train_shards(tmp_path)
    out = tmp_path / "run"
    result = CliRunner().invoke(train, ["--shards", str(shards), "--out", str(out), "--method", "supcon",
                                        "--clsp-lambda", "0", "--data-root", str(tmp_path), *TINY])
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "--method supcon needs a class label" in errors[0], result.output
    assert "Traceback" not in result.output and not out.exists()
