"""The registered methods on a tiny backbone: the training-step contract, the CLSP term, memory banks, momentum.

The parametrised tests take every registered method, so a new method file is tested with no change here."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from clsp.errors import UserError
from clsp.train.backbones import build_backbone
from clsp.train.config import TrainJob
from clsp.train.losses import clsp_loss
from clsp.train.memory import FIFOQueue
from clsp.train.methods import build_method, method_only_settings, registered
from clsp.train.methods.base import REGISTRY, ema_update, own_settings, running_stats_kept
from clsp.train.recipes import RECIPES
from clsp.train.schedules import cosine_momentum

SMALL = {"proj_hidden_dim": 32, "proj_output_dim": 16}
METHODS = registered()


def _job(name: str, dataset: str = "digits", **settings) -> TrainJob:
    return TrainJob(method=name, shards="unused", out="unused", **settings).resolved(dataset)


def _small_method(name: str, **kwargs):
    torch.manual_seed(0)
    classes = 3 if REGISTRY[name].needs_labels else 0  # SupCon is built only for labelled data
    # the authors' term, whatever a recipe's digits entry says (the other positive losses: test_positive_loss.py)
    settings = {**SMALL, "positive_loss": "align", **kwargs}
    return build_method(_job(name, **settings), build_backbone("resnet-narrow"), classes)


def _views(n: int = 3, batch: int = 8, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 16, 16, generator=g) for _ in range(n)]


def _count_backbone_calls(method) -> list[int]:
    """[calls, images] through the backbone, counted as they happen."""
    calls = [0, 0]

    def count(module, inputs, output):
        calls[0] += 1
        calls[1] += len(inputs[0])

    method.backbone.register_forward_hook(count)
    return calls


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("with_x3", [True, False])
def test_forward_backward_gives_finite_losses_and_backbone_gradients(name: str, with_x3: bool):
    method = _small_method(name)
    calls = _count_backbone_calls(method)
    x1, x2, x3 = _views()
    labels = torch.arange(8) % 3
    out = method(x1, x2, x3 if with_x3 else None, labels=labels)
    views = 3 if with_x3 else 2
    assert calls == ([1, 8 * views] if RECIPES[name].forward == "joint" else [views, 8 * views])
    assert {"loss", "loss_base", "loss_clsp", "features"} <= out.keys()
    assert out.keys() - {"features", "loss_probe"} <= set(REGISTRY[name].logged_metrics())  # none is dropped
    assert out["features"].shape == (8, method.backbone.feature_dim) and not out["features"].requires_grad
    for key in ("loss", "loss_base", "loss_clsp"):
        assert out[key].ndim == 0 and torch.isfinite(out[key])
    expected = out["loss_base"] + RECIPES[name].clsp_lambda * out["loss_clsp"]
    torch.testing.assert_close(out["loss"], expected)
    assert (out["loss_clsp"] > 0) if with_x3 else (out["loss_clsp"] == 0)
    out["loss"].backward()
    grads = [p.grad for p in method.backbone.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    method.on_train_step_end(0.5)


@pytest.mark.parametrize("name", METHODS)
def test_clsp_lambda_zero_skips_view_three(name: str):
    method = _small_method(name, clsp_lambda=0.0)
    calls = _count_backbone_calls(method)
    out = method(*_views(), labels=torch.zeros(8, dtype=torch.long))
    assert calls[1] == 16  # the two real views only, in one or two calls
    assert out["loss_clsp"] == 0
    torch.testing.assert_close(out["loss"], out["loss_base"])


def test_the_clsp_term_uses_the_projections_of_view_one_and_three():
    method = _small_method("simclr", clsp_lambda=2.0)
    x1, x2, x3 = _views()
    method.eval()  # deterministic BatchNorm, so the projections can be recomputed
    out = method(x1, x2, x3)
    z1, z3 = method.encode(x1).z, method.encode(x3).z
    torch.testing.assert_close(out["loss_clsp"], (2 - 2 * (z1 * z3).sum(1)).mean())
    same = method(x1, x2, x1)
    assert same["loss_clsp"].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_a_setting_of_other_methods_is_refused(name: str):
    for setting, owners in method_only_settings().items():
        if name not in owners:
            value = own_settings(REGISTRY[owners[0]])[setting][1].default  # valid, so only the owner is wrong
            with pytest.raises(UserError, match=f"{setting.replace('_', '-')} applies only to {' and '.join(owners)}"):
                _job(name, **{setting: value})


def test_recipe_heads_and_memories():
    backbone = build_backbone("resnet-narrow")
    nnclr = build_method(_job("nnclr", "cifar10"), backbone)  # the paper recipe (digits has a smaller memory)
    linears = [m for m in nnclr.projector if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(backbone.feature_dim, 2048), (2048, 2048),
                                                                  (2048, 256)]
    assert isinstance(nnclr.projector[-1], nn.BatchNorm1d)
    assert [m.out_features for m in nnclr.predictor if isinstance(m, nn.Linear)] == [4096, 256]
    # solo-learn's support set starts full of random unit vectors
    assert nnclr.support_set.embeddings.shape == (65536, 256)
    torch.testing.assert_close(nnclr.support_set.embeddings.norm(dim=1), torch.ones(65536))
    assert nnclr.clsp_lambda == 1.0 and nnclr.temperature == 0.2
    moco = build_method(_job("moco", "cifar10"), build_backbone("resnet-narrow"))
    assert moco.queue1.embeddings.shape == (32768, 256) and moco.clsp_lambda == 0.5
    assert (moco.base_momentum, moco.end_momentum) == (0.99, 0.999)
    for method in ("simclr", "moco"):  # the authors' projector: 512-4096-256, ReLU, no BatchNorm
        built = build_method(_job(method), build_backbone("resnet18"))
        assert [type(m) for m in built.projector] == [nn.Linear, nn.ReLU, nn.Linear]
        assert [(m.in_features, m.out_features) for m in built.projector if isinstance(m, nn.Linear)] == \
            [(512, 4096), (4096, 256)]


def test_fifo_queue_wraps_around_and_keeps_the_newest_rows():
    queue = FIFOQueue(size=5, dim=1)
    assert queue.contents()[0].shape == (5, 1) and queue.labels.tolist() == [-1] * 5
    queue.push(torch.tensor([[1.0], [2.0], [3.0]]), labels=torch.tensor([1, 2, 3]))
    assert queue.contents()[0][:3, 0].tolist() == [1, 2, 3]
    slots = queue.push(torch.tensor([[4.0], [5.0], [6.0]]))
    assert slots.tolist() == [3, 4, 0] and int(queue.ptr) == 1
    assert queue.embeddings[:, 0].tolist() == [6, 2, 3, 4, 5]
    assert queue.labels.tolist() == [-1, 2, 3, -1, -1]
    queue.push(torch.arange(10.0, 17.0).unsqueeze(1))  # more rows than slots: the last five stay
    assert sorted(queue.embeddings[:, 0].tolist()) == [12, 13, 14, 15, 16]
    restored = FIFOQueue(size=5, dim=1)
    restored.load_state_dict(queue.state_dict())
    assert torch.equal(restored.embeddings, queue.embeddings) and int(restored.ptr) == int(queue.ptr)


def test_the_queue_hands_out_copies_that_a_push_leaves_as_they_were():
    queue = FIFOQueue(size=4, dim=2)
    embeddings, labels = queue.contents()
    before = embeddings.clone()
    queue.push(torch.ones(4, 2), labels=torch.arange(4))
    assert torch.equal(embeddings, before) and labels.tolist() == [-1] * 4
    assert torch.equal(queue.contents()[0], torch.ones(4, 2))


def test_moco_queue_starts_full_of_unit_vectors_and_receives_the_keys():
    method = _small_method("moco", queue_size=32)
    torch.testing.assert_close(method.queue1.embeddings.norm(dim=1), torch.ones(32))
    x1, x2, _ = _views()
    keys1, keys2 = method.keys(x1), method.keys(x2)
    method(x1, x2)
    torch.testing.assert_close(method.queue1.embeddings[:8], keys1)
    torch.testing.assert_close(method.queue2.embeddings[:8], keys2)
    assert int(method.queue1.ptr) == 8


def test_momentum_schedule_and_update_math():
    assert cosine_momentum(0.99, 0.999, 0.0) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 0.999, 0.5) == pytest.approx(0.9945)
    assert cosine_momentum(0.99, 0.999, 1.0) == pytest.approx(0.999)
    assert cosine_momentum(0.99, 0.999, 0.25) == pytest.approx(0.999 - 0.009 * (math.cos(math.pi / 4) + 1) / 2)
    online, target = nn.Linear(3, 2), nn.Linear(3, 2)
    before = [p.detach().clone() for p in target.parameters()]
    ema_update(target, online, 0.9)
    for t, b, o in zip(target.parameters(), before, online.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o)


def test_moco_momentum_network_follows_the_online_one_and_is_not_trained():
    method = _small_method("moco", momentum=0.9, momentum_end=0.9, queue_size=32)
    trainable = {id(p) for group in method.parameter_groups(1e-4) for p in group["params"]}
    momentum_params = list(method.momentum_backbone.parameters()) + list(method.momentum_projector.parameters())
    assert all(not p.requires_grad and id(p) not in trainable for p in momentum_params)
    for online_param, momentum_param in zip(method.backbone.parameters(), method.momentum_backbone.parameters()):
        torch.testing.assert_close(online_param, momentum_param)
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)
    online = dict(method.backbone.named_parameters())
    before = {k: v.detach().clone() for k, v in method.momentum_backbone.named_parameters()}
    method.on_train_step_end(0.0)
    assert method.momentum == pytest.approx(0.9)
    for key, param in method.momentum_backbone.named_parameters():
        torch.testing.assert_close(param, 0.9 * before[key] + 0.1 * online[key])
    assert "momentum_backbone.conv1.weight" in method.state_dict() and "queue2.embeddings" in method.state_dict()


def test_nnclr_support_set_and_nearest_neighbour_accuracy():
    method = _small_method("nnclr", queue_size=32, pred_hidden_dim=32)
    x1, x2, _ = _views()
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    first = method(x1, x2, labels=labels)
    assert first["nn_acc"].item() == 0.0  # the random initial entries carry no label
    assert method.support_set.labels[:8].tolist() == labels.tolist()
    stored = method.support_set.embeddings[:8].clone()
    # Same images again: each view-1 projection finds itself (BatchNorm uses the same batch statistics),
    # so the accuracy is the agreement between the stored labels and the ones given now.
    relabelled = torch.roll(labels, 1)
    second = method(x1, x2, labels=relabelled)
    assert second["nn_acc"].item() == pytest.approx((labels == relabelled).float().mean().item())
    torch.testing.assert_close(method.support_set.embeddings[8:16], stored)
    for _ in range(3):  # 40 rows pushed into 32 slots: the oldest are overwritten
        method(x1, x2, labels=labels)
    assert int(method.support_set.ptr) == 8
    assert "support_set.embeddings" in method.state_dict()


def test_nnclr_with_an_approximate_index_trains():
    method = _small_method("nnclr", nn_index="hnsw", queue_size=32, pred_hidden_dim=32)
    for step in range(3):
        out = method(*_views(2, seed=step), labels=torch.arange(8) % 2)
        out["loss"].backward()
    assert torch.isfinite(out["loss"]) and "nn_acc" in out


def test_sgd_recipes_decay_every_parameter():
    method = _small_method("simclr")
    groups = method.parameter_groups(1e-4, "all")
    assert [g["name"] for g in groups] == ["decay"] and groups[0]["weight_decay"] == 1e-4
    assert len(groups[0]["params"]) == len([p for p in method.parameters() if p.requires_grad])
    assert RECIPES["simclr"].weight_decay_scope == RECIPES["moco"].weight_decay_scope == "all"


def test_parameter_groups_exclude_bias_and_norm_from_weight_decay():
    method = _small_method("nnclr", queue_size=32, pred_hidden_dim=32)
    assert RECIPES["nnclr"].weight_decay_scope == "weights"
    groups = {g["name"]: g for g in method.parameter_groups(1e-5, "weights")}
    assert groups["decay"]["weight_decay"] == 1e-5 and groups["decay"]["lars_exclude"] is False
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["no_decay"]["lars_exclude"] is True
    assert all(p.ndim > 1 for p in groups["decay"]["params"])
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    assert id(method.backbone.bn1.weight) in no_decay and id(method.projector[0].bias) in no_decay
    grouped = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in method.parameters() if p.requires_grad)


def _running_stats(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: buffer.clone() for name, buffer in module.named_buffers()
            if name.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("mode", ["joint", "separate"])
def test_batchnorm_running_statistics_after_a_step(name: str, mode: str):
    """Separate: those of the two real views alone; joint: those of the concatenation of the three views.
    The expected values come from a copy with plain BatchNorm fed the same tensors."""
    method = _small_method(name, forward=mode)
    reference = copy.deepcopy(method)
    x1, x2, x3 = _views()
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    method.train()
    out = method(x1, x2, x3, labels=torch.arange(8) % 3)
    out["loss"].backward()
    optimizer.step()
    reference.train()
    with torch.no_grad():  # the real views through the method's own loss (a predictor, momentum copies), no view 3
        if mode == "joint":
            v1, v2, _ = reference.encode_joint([x1, x2, x3])
        else:
            v1, v2 = reference.encode(x1), reference.encode(x2)
        reference.base_loss(v1, v2, torch.arange(8) % 3)
    expected, got = _running_stats(reference), _running_stats(method)
    assert expected
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], msg=key)
    # the synthetic view is normalised with its own batch statistics in the separate pass (training-mode
    # BatchNorm, the reference's weights are those before the step)
    with torch.no_grad():
        v1, _, v3 = reference.encode_joint([x1, x2, x3]) if mode == "joint" else map(reference.encode, (x1, x2, x3))
    torch.testing.assert_close(out["loss_clsp"], clsp_loss(v1.z, v3.z))


@pytest.mark.parametrize("name", METHODS)
def test_joint_and_separate_passes_give_the_same_loss_without_batch_statistics(name: str):
    method = _small_method(name)
    x1, x2, x3 = _views()
    labels = torch.arange(8) % 3
    losses = {}
    for mode in ("joint", "separate"):
        copied = copy.deepcopy(method)  # the same weights, queues and support set for both
        copied.forward_mode = mode
        copied.eval()  # BatchNorm normalises with its running statistics: the grouping of the views cannot matter
        losses[mode] = copied(x1, x2, x3, labels=labels)
    for key in ("loss", "loss_base", "loss_clsp"):
        torch.testing.assert_close(losses["joint"][key], losses["separate"][key], msg=key)
    # in training mode the grouping is what BatchNorm normalises with, so the two differ
    trained = {}
    for mode in ("joint", "separate"):
        copied = copy.deepcopy(method)
        copied.forward_mode = mode
        trained[mode] = copied.train()(x1, x2, x3, labels=labels)["loss"]
    assert not torch.allclose(trained["joint"], trained["separate"])


def test_running_stats_kept_restores_the_layers():
    layer = nn.BatchNorm1d(4)
    with running_stats_kept(nn.Sequential(layer)):
        layer(torch.randn(16, 4) + 5.0)
        assert layer.track_running_stats is False
    assert layer.track_running_stats is True
    assert torch.equal(layer.running_mean, torch.zeros(4)) and int(layer.num_batches_tracked) == 0
    layer(torch.randn(16, 4) + 5.0)
    assert layer.running_mean.mean() > 0.3 and int(layer.num_batches_tracked) == 1
