"""How the synthetic positive enters the loss (``positive_loss``): the formulas, what each method builds,
collapse, and the refusals."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clsp.errors import UserError
from clsp.train.backbones import build_backbone
from clsp.train.config import TrainJob
from clsp.train.losses import clsp_loss, nnclr_loss, positive_nce, simclr_positive_nce
from clsp.train.methods import build_method, own_settings
from clsp.train.methods.base import REGISTRY

SMALL = {"proj_hidden_dim": 32, "proj_output_dim": 16}
CASES = [(name, loss) for name, cls in REGISTRY.items() for loss in cls.positive_losses]


def _method(name: str, positive_loss: str, clsp_lambda: float = 1.0):
    torch.manual_seed(0)
    sizes = dict(SMALL)
    for small in ("queue_size", "pred_hidden_dim"):
        if small in own_settings(REGISTRY[name]):
            sizes[small] = 32
    job = TrainJob(method=name, shards="unused", out="unused", positive_loss=positive_loss,
                   clsp_lambda=clsp_lambda, **sizes).resolved("digits")
    return build_method(job, build_backbone("resnet-narrow"), 3 if REGISTRY[name].needs_labels else 0)


def _views(batch: int = 8, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 16, 16, generator=g) for _ in range(3)]


def test_positive_nce_is_the_formula_row_by_row():
    g = torch.Generator().manual_seed(0)
    q, p, keys = (F.normalize(torch.randn(n, 5, generator=g), dim=1) for n in (3, 3, 4))
    excluded = torch.zeros(3, 4, dtype=torch.bool)
    excluded[1, 2] = True
    expected = []
    for i in range(3):
        negatives = [float(q[i] @ keys[j]) for j in range(4) if not excluded[i, j]]
        positive = float(q[i] @ p[i])
        expected.append(-positive / 0.2 + math.log(sum(math.exp(s / 0.2) for s in [positive, *negatives])))
    torch.testing.assert_close(positive_nce(q, p, keys, excluded, 0.2), torch.tensor(sum(expected) / 3))


def test_simclr_positive_takes_the_other_images_views_as_negatives():
    g = torch.Generator().manual_seed(0)
    z1, z2, z3 = (F.normalize(torch.randn(4, 6, generator=g), dim=1) for _ in range(3))
    terms = []
    for query in (z1, z2):
        for i in range(4):
            negatives = torch.cat([z1[torch.arange(4) != i], z2[torch.arange(4) != i]])
            logits = torch.cat([(query[i] * z3[i]).sum().view(1), negatives @ query[i]]) / 0.2
            terms.append(-torch.log_softmax(logits, 0)[0])
    torch.testing.assert_close(simclr_positive_nce(z1, z2, z3, 0.2), torch.stack(terms).mean())


@pytest.mark.parametrize(("name", "positive_loss"), CASES)
def test_every_positive_loss_trains_the_backbone(name: str, positive_loss: str):
    method = _method(name, positive_loss)
    x1, x2, x3 = _views()
    out = method(x1, x2, x3, labels=torch.arange(8) % 3)
    assert torch.isfinite(out["loss_clsp"]) and out["loss_clsp"] > 0
    torch.testing.assert_close(out["loss"], out["loss_base"] + out["loss_clsp"])
    out["loss"].backward()
    assert sum(p.grad.abs().sum() for p in method.backbone.parameters() if p.grad is not None) > 0


@pytest.mark.parametrize("name", [name for name, cls in REGISTRY.items() if "infonce" in cls.positive_losses])
def test_infonce_cannot_be_minimised_by_collapse_where_align_can(name: str):
    """With every embedding the same, the alignment term is 0 but an InfoNCE term is log(1 + negatives)."""
    method = _method(name, "infonce")
    same = F.normalize(torch.ones(8, SMALL["proj_output_dim"]), dim=1)
    views = [method.encode(x) for x in _views()]
    for view in views:
        view.z = same
        view.projection = same
    if hasattr(method, "support_set"):  # NNCLR's banks hold random vectors; collapse them too
        method.support_set.embeddings.copy_(same[:1].expand_as(method.support_set.embeddings))
    for queue in ("queue1", "queue2"):
        if hasattr(method, queue):
            getattr(method, queue).embeddings.copy_(same[:1].expand_as(getattr(method, queue).embeddings))
    term = method.positive_term(*views, labels=None)["loss_clsp"]
    assert clsp_loss(same, same) == 0
    assert term > 1.0  # log of at least 3 equal candidates


def test_nnclr_nn_uses_the_synthetic_views_neighbour_in_the_support_set_before_the_push():
    method = _method("nnclr", "nn")
    bank = method.support_set.embeddings.clone()
    x1, x2, x3 = _views()
    labels = torch.arange(8) % 3
    method.support_set.labels.copy_(torch.arange(32) % 3)
    out = method(x1, x2, x3, labels=labels)
    with torch.no_grad():
        v1, v2, v3 = method.encode(x1), method.encode(x2), method.encode(x3)
        neighbours = bank[(v3.z @ bank.T).argmax(1)]
        expected = (nnclr_loss(neighbours, method.predictor(v2.projection), method.temperature)
                    + nnclr_loss(neighbours, method.predictor(v1.projection), method.temperature)) / 2
    torch.testing.assert_close(out["loss_clsp"].detach(), expected, rtol=1e-4, atol=1e-4)
    expected_acc = ((v3.z @ bank.T).argmax(1) % 3 == labels).float().mean()
    torch.testing.assert_close(out["nn_acc_synthetic"], expected_acc)


def test_a_positive_loss_the_method_does_not_implement_is_refused_in_one_line():
    with pytest.raises(UserError, match="positive-loss nn is not implemented by simclr; choose one of: align"):
        TrainJob(method="simclr", shards="unused", out="unused", positive_loss="nn").resolved("digits")


def test_the_recipe_gives_align_unless_the_run_says_otherwise():
    assert TrainJob(method="simclr", shards="u", out="u").resolved("cifar10").positive_loss == "align"
    assert TrainJob(method="moco", shards="u", out="u").resolved("cifar100").positive_loss == "align"
    assert TrainJob(method="nnclr", shards="u", out="u", positive_loss="infonce").resolved(
        "cifar10").positive_loss == "infonce"


def test_nnclr_records_its_neighbours_per_epoch_in_the_summary_and_the_report(tmp_path):
    from click.testing import CliRunner

    from clsp.evaluate.report import neighbour_row, train_summary
    from clsp.train.cli import train
    from support import make_train_shards

    shards = make_train_shards(tmp_path / "shards", num_anchors=64, shard_size=32)
    out = tmp_path / "run"
    result = CliRunner().invoke(train, [
        "--shards", str(shards), "--out", str(out), "--method", "nnclr", "--positive-loss", "nn",
        "--clsp-lambda", "1", "--backbone", "resnet-narrow", "--batch-size", "16", "--workers", "0",
        "--precision", "fp32", "--proj-hidden-dim", "32", "--proj-output-dim", "16", "--pred-hidden-dim", "32",
        "--queue-size", "64", "--epochs", "2", "--warmup-epochs", "1"])
    assert result.exit_code == 0, result.output
    epochs = train_summary(out)["per_epoch"]
    assert len(epochs) == 2
    assert all(0 <= e["nn_acc"] <= 1 and 0 <= e["nn_acc_synthetic"] <= 1 for e in epochs)
    row = neighbour_row("clsp", str(out))
    assert row is not None and row[0] == "clsp"
    assert row[1] == pytest.approx(100 * epochs[0]["nn_acc"]) and row[3] == pytest.approx(100 * epochs[-1]["nn_acc"])
    assert row[4] == pytest.approx(100 * epochs[-1]["nn_acc_synthetic"])
