"""A method is one registered class: a toy BYOL-like method (an online view pulled onto a momentum target)
registered here trains through clsp-train with its recipe, its momentum pairs and the online probe every
method owns, and the settings it takes are refused for the methods that do not take them; a method in a file
of its own, with a setting, a metric and a display name of its own, passes the method tests unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import Tensor, nn

from clsp.io import load_torch
from clsp.train.cli import train
from clsp.train.heads import simclr_projector
from clsp.train.methods import method_only_settings, registered
from clsp.train.methods.base import REGISTRY, EncodedView, Method, own, register
from clsp.train.recipes import RECIPES, Recipe, ViewAugmentation
from support import make_train_shards


class Align(Method):
    """View 1's projection pulled onto view 2's through a momentum copy (BYOL without its predictor)."""

    name = "toy"
    recipe = Recipe(batch_size=8, lr=0.05, optimizer="sgd", weight_decay=0.0, weight_decay_scope="all",
                    clsp_lambda=0.5, probe_lr=1.0, augmentation=ViewAugmentation(crop_min_scale=0.5, flip=False),
                    forward="separate", schedule_unit="epoch", warmup_start_lr=1e-3, warmup_epochs=0,
                    proj_hidden_dim=32, proj_output_dim=16)

    def __init__(self, backbone: nn.Module, *, clsp_lambda: float, temperature: float, proj_hidden_dim: int,
                 proj_output_dim: int, momentum: Annotated[float, own(0.99, "target coefficient", ge=0, le=1)],
                 momentum_end: Annotated[float, own(1.0, "target coefficient at the end", ge=0, le=1)],
                 forward_mode: str = "separate") -> None:
        projector = simclr_projector(backbone.feature_dim, proj_hidden_dim, proj_output_dim)
        super().__init__(backbone, projector, clsp_lambda=clsp_lambda, temperature=temperature,
                         forward_mode=forward_mode, momentum=momentum, momentum_end=momentum_end)
        self.target_backbone, self.target_projector = self.momentum_copy(backbone), self.momentum_copy(projector)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.target_backbone), (self.projector, self.target_projector)]

    def base_loss(self, v1: EncodedView, v2: EncodedView, labels: Tensor | None) -> dict[str, Tensor]:
        with torch.no_grad():
            target = F.normalize(self.target_projector(self.target_backbone(v2.images)).float(), dim=-1)
        return {"loss_base": (2 - 2 * (v1.z * target).sum(1)).mean()}


@pytest.fixture
def toy():
    register(Align)
    yield Align
    del REGISTRY["toy"], RECIPES["toy"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_train_shards(tmp_path_factory.mktemp("plugin-shards"), num_anchors=16, shard_size=16)


def _train(shards: Path, out: Path, *options: str):
    return CliRunner().invoke(train, ["--shards", str(shards), "--out", str(out), "--backbone", "resnet-narrow",
                                      "--epochs", "1", "--workers", "0", "--precision", "fp32", "--augment", "cpu",
                                      *options])


def test_an_unregistered_method_is_refused_in_one_line(shards, tmp_path):
    result = _train(shards, tmp_path / "run", "--method", "toy")
    assert result.exit_code == 1 and result.output.startswith("Error: --method: unknown method 'toy'")
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_a_registered_method_trains_through_clsp_train(toy, shards, tmp_path):
    assert "toy" in registered() and method_only_settings()["momentum"] == ("moco", "toy")
    out = tmp_path / "run"
    # momentum 0: the base class's EMA makes each target an exact copy of its online module after every step
    result = _train(shards, out, "--method", "toy", "--momentum", "0", "--momentum-end", "0")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["method"] == "toy" and summary["steps"] == 2
    assert summary["batch_size"] == 8 and summary["settings"]["crop_min_scale"] == 0.5  # the toy's recipe
    assert summary["clsp_lambda"] == 0.5 and 0 < summary["final"]["loss_clsp"]
    assert 0.0 <= summary["final"]["probe_acc"] <= 1.0  # the probe every method owns
    checkpoint = load_torch(out / "checkpoint.pt")
    model = checkpoint["model"]
    assert model["probe.weight"].shape == (10, model["projector.0.weight"].shape[1])  # digits' 10 classes
    assert "probe_optimizer" in checkpoint
    for online, target in (("backbone.conv1.weight", "target_backbone.conv1.weight"),
                           ("projector.0.weight", "target_projector.0.weight")):
        assert torch.equal(model[online], model[target]), online
    assert json.loads((out / "encoder.json").read_text())["method"] == "toy"


def test_a_methods_own_settings_are_refused_for_other_methods(toy, shards, tmp_path):
    owners = method_only_settings()
    others = [name for name, takers in owners.items() if "toy" not in takers]
    assert others and {"momentum", "momentum_end"} <= {name for name, takers in owners.items() if "toy" in takers}
    refused = _train(shards, tmp_path / "run", "--method", "toy", f"--{others[0].replace('_', '-')}", "64")
    assert refused.exit_code == 1
    assert f"applies only to {' and '.join(owners[others[0]])}, not to toy" in refused.output
    plain = next(name for name in registered() if name not in owners["momentum"])
    refused = _train(shards, tmp_path / "run", "--method", plain, "--momentum", "0.5")
    assert refused.exit_code == 1
    assert f"--momentum applies only to {' and '.join(owners['momentum'])}, not to {plain}" in refused.output


def test_a_second_method_under_a_taken_name_is_refused(toy):
    class Other(Align):
        pass

    with pytest.raises(ValueError, match="'toy' is registered already"):
        register(Other)


# A method as a contributor would write it, in one file: the alignment-and-uniformity loss of Wang and Isola
# (2020), with a setting of its own (the uniformity weight), a metric of its own and a display name.
ONE_FILE_METHOD = '''
from __future__ import annotations

from typing import Annotated

import torch
from torch import Tensor, nn

from clsp.train.heads import simclr_projector
from clsp.train.methods.base import EncodedView, Method, own, register
from clsp.train.recipes import ForwardMode, Recipe, ViewAugmentation


@register
class AlignUniform(Method):
    name = "align-uniform"
    display_name = "AlignUniform"
    metrics = ("alignment",)
    recipe = Recipe(batch_size=8, lr=0.05, optimizer="sgd", weight_decay=0.0, weight_decay_scope="all",
                    clsp_lambda=0.5, probe_lr=1.0, augmentation=ViewAugmentation(), forward="separate",
                    schedule_unit="epoch", warmup_start_lr=1e-3, warmup_epochs=0)

    def __init__(self, backbone: nn.Module, *, clsp_lambda: float, temperature: float, proj_hidden_dim: int,
                 proj_output_dim: int,
                 uniformity_weight: Annotated[float, own(1.0, "weight of the uniformity term", gt=0, le=100)],
                 forward_mode: ForwardMode = "separate") -> None:
        projector = simclr_projector(backbone.feature_dim, proj_hidden_dim, proj_output_dim)
        super().__init__(backbone, projector, clsp_lambda=clsp_lambda, temperature=temperature,
                         forward_mode=forward_mode)
        self.uniformity_weight = uniformity_weight

    def base_loss(self, v1: EncodedView, v2: EncodedView, labels: Tensor | None) -> dict[str, Tensor]:
        alignment = (v1.z - v2.z).pow(2).sum(1).mean()
        uniformity = torch.pdist(torch.cat([v1.z, v2.z])).pow(2).mul(-2).exp().mean().log()
        return {"loss_base": alignment + self.uniformity_weight * uniformity, "alignment": alignment.detach()}
'''


def test_a_method_in_one_file_passes_the_method_tests(tmp_path):
    """Imported before anything else, as a file in clsp/train/methods would be, the method gets its option and
    runs every method-parametrised test, training through clsp-train included; no other file changes."""
    (tmp_path / "align_uniform.py").write_text(ONE_FILE_METHOD)
    tests = Path(__file__).parent
    code = ("import sys, align_uniform, pytest; from clsp.train.config import TrainSettings; "
            "assert 'uniformity_weight' in TrainSettings.model_fields; sys.exit(pytest.main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(tests)]), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code, "-q", "-p", "no:cacheprovider", "-k", "align-uniform",
                             str(tests / "test_methods.py"), str(tests / "test_method_plugins.py")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    passed = int(result.stdout.strip().splitlines()[-1].split(" passed")[0].split()[-1])
    assert passed >= 8, result.stdout[-2000:]


@pytest.mark.parametrize("name", registered())
def test_every_method_trains_through_clsp_train_and_reports_its_metrics(name: str, shards, tmp_path):
    out = tmp_path / "run"
    result = _train(shards, out, "--method", name, "--batch-size", "8", "--proj-hidden-dim", "32",
                    "--proj-output-dim", "16")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "train_summary.json").read_text())
    method = REGISTRY[name]  # the method's own metrics too (those of other positive losses: test_positive_loss.py)
    assert set(method.logged_metrics()) - set(method.positive_metrics) <= set(summary["final"])
    assert summary["collapse"]["loss_at_collapse"] == REGISTRY[name].loss_at_collapse(8)
