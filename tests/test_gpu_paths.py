"""Code that runs only on GPUs, reached on a CPU: FAISS's GPU search through a stand-in of its API, SyncBatchNorm
over momentum copies, a sampling loop without per-step host copies, and what fp32 means (the tf32 setting)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from clsp.config import fields_with_role
from clsp.runtime import apply_tf32
from clsp.train import neighbours
from clsp.train.backbones import build_backbone
from clsp.train.config import TrainJob
from clsp.train.methods import build_method
from support import make_scheduler, make_tiny_unet
from test_device_augment import aten_ops


class FakeFaissGpu(types.ModuleType):
    """The part of faiss-gpu's API the search uses, searching with torch and recording each call."""

    METRIC_INNER_PRODUCT = 0

    def __init__(self, gpus: int) -> None:
        super().__init__("faiss")
        self.gpus, self.calls = gpus, []

    class StandardGpuResources:
        pass

    def get_num_gpus(self) -> int:
        return self.gpus

    def knn_gpu(self, resources, queries, bank, k, metric=None, device=-1):
        self.calls.append({"resources": resources, "k": k, "metric": metric, "device": device,
                           "dtypes": (queries.dtype, bank.dtype), "contiguous": queries.is_contiguous()})
        scores, indices = torch.topk(queries @ bank.T, k, dim=1)
        return scores, indices.int()  # FAISS returns int64 ids on CPU builds, int32 or int64 on GPU: both handled


@pytest.fixture
def fake_faiss(monkeypatch):
    def install(gpus: int) -> FakeFaissGpu:
        fake = FakeFaissGpu(gpus)
        contrib = types.ModuleType("faiss.contrib")
        for name, module in (("faiss", fake), ("faiss.contrib", contrib),
                             ("faiss.contrib.torch_utils", types.ModuleType("faiss.contrib.torch_utils"))):
            monkeypatch.setitem(sys.modules, name, module)
        neighbours._gpu_resources.cache_clear()
        return fake

    yield install
    neighbours._gpu_resources.cache_clear()


def test_the_faiss_gpu_branch_searches_with_faiss_and_keeps_one_set_of_resources(fake_faiss):
    fake = fake_faiss(gpus=1)
    queries, bank = torch.randn(5, 16), torch.randn(40, 16)
    for _ in range(2):
        scores, indices = neighbours._flat_cuda(queries, bank, 3)
    expected_scores, expected_indices = torch.topk(queries @ bank.T, 3, dim=1)
    assert torch.equal(indices, expected_indices) and indices.dtype == torch.int64
    torch.testing.assert_close(scores, expected_scores)
    assert len(fake.calls) == 2 and fake.calls[0]["resources"] is fake.calls[1]["resources"]
    assert isinstance(fake.calls[0]["resources"], FakeFaissGpu.StandardGpuResources)
    assert fake.calls[0]["metric"] == fake.METRIC_INNER_PRODUCT and fake.calls[0]["k"] == 3


def test_without_a_gpu_faiss_the_search_falls_back_to_torch_with_a_warning(fake_faiss):
    fake = fake_faiss(gpus=0)
    queries, bank = torch.randn(4, 8), torch.randn(20, 8)
    with pytest.warns(UserWarning, match="no GPU support"):
        neighbours._warn_no_faiss_gpu.cache_clear()
        _, indices = neighbours._flat_cuda(queries, bank, 2)
    assert not fake.calls and torch.equal(indices, torch.topk(queries @ bank.T, 2, dim=1).indices)


def test_sync_batchnorm_keeps_every_momentum_pair_aligned():
    job = TrainJob(method="moco", shards="unused", out="unused", proj_hidden_dim=32, proj_output_dim=16,
                   queue_size=64).resolved("digits")
    method = nn.SyncBatchNorm.convert_sync_batchnorm(build_method(job, build_backbone("resnet-narrow")))
    pairs = method.momentum_pairs()
    assert pairs
    for online, target in pairs:
        norms = [[type(m) for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
                 for module in (online, target)]
        assert norms[0] == norms[1] and set(norms[0]) <= {nn.SyncBatchNorm}
        assert [(n, p.shape) for n, p in online.named_parameters()] == \
            [(n, p.shape) for n, p in target.named_parameters()]
        with torch.no_grad():  # online and copy apart, so the update's pairing shows in its result
            for p in online.parameters():
                p.add_(torch.randn_like(p))
    before = [[p.clone() for p in target.parameters()] for _, target in pairs]
    method.on_train_step_end(0.0)
    m = method.momentum
    for (online, target), old in zip(pairs, before):
        for o, t, b in zip(online.parameters(), target.parameters(), old):
            torch.testing.assert_close(t, m * b + (1 - m) * o)


def test_the_sampling_loop_copies_nothing_from_the_host_per_step():
    from clsp.generate import sample_positives

    unet, scheduler = make_tiny_unet(), make_scheduler()
    anchors = torch.rand(2, 3, 16, 16) * 2 - 1

    def host_traffic(steps: int) -> int:
        with aten_ops.AtenOps() as count:
            sample_positives(unet, scheduler, anchors, 2, steps=steps, generator=torch.Generator().manual_seed(0),
                             precision="fp32")
        return count.host_traffic

    assert host_traffic(2) == host_traffic(5)  # prepared once, whatever the number of steps


def test_unconditional_samples_draw_with_a_generator_on_the_models_device(monkeypatch):
    from diffusers.configuration_utils import FrozenDict

    from clsp.generate import sampler
    from clsp.generate.unet import sample_images

    made = []

    class Recording:  # stands for torch.Generator: a CUDA one cannot be made here
        def __init__(self, device: str | torch.device = "cpu") -> None:
            made.append(torch.device(device))

        def manual_seed(self, seed: int) -> Recording:
            return self

    class Drawn(Exception):
        pass

    def sample_positives(*args, **kwargs):
        raise Drawn

    monkeypatch.setattr(torch, "Generator", Recording)
    monkeypatch.setattr(sampler, "sample_positives", sample_positives)
    on_gpu = types.SimpleNamespace(config=FrozenDict(sample_size=16, in_channels=3),  # a U-Net's config type
                                   device=torch.device("cuda", 0))
    with pytest.raises(Drawn):
        sample_images(on_gpu, make_scheduler(), 2, steps=2)
    assert made == [torch.device("cuda", 0)]


@pytest.mark.parametrize("mode, conv, matmul", [("conv", True, False), ("all", True, True), ("none", False, False)])
def test_tf32_is_a_recorded_setting_applied_to_both_switches(mode, conv, matmul):
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        apply_tf32(mode)
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (conv, matmul)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    from clsp.generate.config import GenerateSettings

    assert TrainJob.model_fields["tf32"].default == "conv"  # the authors' fp32: PyTorch's defaults on their GPUs
    assert "tf32" in fields_with_role(TrainJob, "result") and "tf32" in fields_with_role(GenerateSettings, "result")


@pytest.mark.parametrize("name", ["sgd", "lars"])
def test_the_foreach_update_cudas_default_is_the_per_parameter_one(name):
    from clsp.train.optim import build_optimizer

    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(7))]
    copies = [nn.Parameter(p.detach().clone()) for p in params]
    start = [p.detach().clone() for p in params]
    ours = build_optimizer(name, [{"params": params[:1], "weight_decay": 1e-5},
                                  {"params": params[1:], "weight_decay": 0.0}], lr=0.4)
    looped = build_optimizer(name, [{"params": copies[:1], "weight_decay": 1e-5},
                                    {"params": copies[1:], "weight_decay": 0.0}], lr=0.4)
    assert all(group["foreach"] for group in ours.param_groups)
    for group in looped.param_groups:
        group["foreach"] = False
    for _ in range(4):
        for p, q in zip(params, copies):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        ours.step()
        looped.step()
    for p, q, p0 in zip(params, copies, start):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
        assert not torch.allclose(p, p0)  # the updates did move the weights
