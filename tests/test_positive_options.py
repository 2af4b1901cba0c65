"""Options for better positives: candidate scores, choice policies, loss weights and the lambda ramp."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clsp.errors import UserError
from clsp.generate.scoring import bottleneck_agreement
from clsp.train.positive_choice import POSITIVE_CHOICES, choose, score_weighted, uniform
from clsp.train.schedules import clsp_lambda_at
from support import make_scheduler


def _images(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


# ---- candidate scores ----

def test_scores_rank_a_near_copy_above_an_unrelated_image_and_a_copy_at_one(tiny_unet):
    anchors = _images(3)
    near = (anchors + 0.1 * _images(3, seed=1)).clamp(-1, 1)
    candidates = torch.stack([anchors, near, _images(3, seed=2)], dim=1)
    scores = bottleneck_agreement(tiny_unet, make_scheduler(), anchors, candidates, generator=_gens(0, 1, 2),
                                  precision="fp32")
    assert scores.shape == (3, 3) and scores.dtype == np.float32
    assert np.all(scores >= -1) and np.all(scores <= 1)
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert np.all(scores[:, 1] > scores[:, 2])


def test_scores_cost_one_encoder_pass_per_image_and_no_decoder(tiny_unet):
    anchors, candidates = _images(4), _images(4, 5, seed=1)
    encoded, decoded = [], []
    tiny_unet.mid_block.register_forward_hook(lambda m, args, out: encoded.append(out.shape[0]))
    tiny_unet.up_blocks[0].register_forward_hook(lambda m, args, out: decoded.append(1))
    whole = bottleneck_agreement(tiny_unet, make_scheduler(), anchors, candidates, generator=_gens(*range(4)),
                                 precision="fp32")
    assert sum(encoded) == 4 * (5 + 1) and not decoded
    chunked = bottleneck_agreement(tiny_unet, make_scheduler(), anchors, candidates, generator=_gens(*range(4)),
                                   batch_size=7, precision="fp32")
    assert max(encoded[1:]) == 7
    np.testing.assert_allclose(chunked, whole, atol=1e-5)


def test_scores_depend_on_the_anchors_own_generator_only(tiny_unet):
    anchors, candidates = _images(3), _images(3, 2, seed=1)
    kwargs = dict(timestep=400, precision="fp32")
    batch = bottleneck_agreement(tiny_unet, make_scheduler(), anchors, candidates, generator=_gens(7, 8, 9), **kwargs)
    alone = bottleneck_agreement(tiny_unet, make_scheduler(), anchors[1:2], candidates[1:2], generator=_gens(8),
                                 **kwargs)
    other = bottleneck_agreement(tiny_unet, make_scheduler(), anchors, candidates, generator=_gens(1, 2, 3), **kwargs)
    np.testing.assert_allclose(alone[0], batch[1], atol=1e-5)
    assert not np.allclose(batch, other)


@pytest.mark.parametrize("call, message", [
    (lambda u, a, c: bottleneck_agreement(u, make_scheduler(), a, c[0]), "candidates must be [n, k, C, H, W]"),
    (lambda u, a, c: bottleneck_agreement(u, make_scheduler(), a[:1], c), "candidates must be [n, k, C, H, W]"),
    (lambda u, a, c: bottleneck_agreement(u, make_scheduler(), a, c, timestep=1000), "in [0, 999]"),
    (lambda u, a, c: bottleneck_agreement(u, make_scheduler(), a, c, batch_size=0), "batch_size must be"),
    (lambda u, a, c: bottleneck_agreement(torch.nn.Conv2d(3, 3, 1), make_scheduler(), a, c), "UNet2DModel"),
])
def test_bad_scoring_inputs_give_one_line_user_errors(tiny_unet, call, message):
    with pytest.raises(UserError) as error:
        call(tiny_unet, _images(2), _images(2, 3, seed=1))
    assert message in str(error.value) and "\n" not in str(error.value)


# ---- choice policies ----

def test_uniform_picks_what_the_plain_draw_picked():
    u = np.random.default_rng(0).random(10_000)
    np.testing.assert_array_equal(uniform(u, None, 8), (u * 8).astype(np.int64))
    assert uniform(np.array(np.nextafter(1.0, 0.0)), None, 3) == 2
    picked = choose("uniform", None, np.random.default_rng(5), num_candidates=4)
    assert picked.shape == () and int(picked) == int(np.random.default_rng(5).random() * 4)
    counts = np.bincount(choose("uniform", np.zeros((20_000, 4)), np.random.default_rng(1)), minlength=4)
    np.testing.assert_allclose(counts / 20_000, 0.25, atol=0.02)


@pytest.mark.parametrize("m", [1, 2, 5])
def test_top_m_never_draws_below_the_m_th_best_and_draws_all_of_the_top_m(m):
    scores = np.random.default_rng(2).normal(size=(4000, 8))
    picked = choose("top-m", scores, np.random.default_rng(3), m=m)
    chosen = np.take_along_axis(scores, picked[:, None], axis=1)[:, 0]
    m_th_best = np.sort(scores, axis=1)[:, -m]
    assert picked.shape == (4000,) and np.all(chosen >= m_th_best)
    rank = (scores > chosen[:, None]).sum(1)  # 0 = the best
    np.testing.assert_allclose(np.bincount(rank, minlength=m) / 4000, 1 / m, atol=0.03)


def test_score_weighted_follows_the_softmax_and_tau_interpolates_to_argmax_and_uniform():
    scores = np.array([0.9, 0.7, 0.2, -0.5])
    u = np.random.default_rng(4).random(40_000)
    rows = np.broadcast_to(scores, (len(u), 4))
    for tau in (0.1, 0.5):
        expected = np.exp(scores / tau) / np.exp(scores / tau).sum()
        frequencies = np.bincount(score_weighted(u, rows, 4, tau=tau), minlength=4) / len(u)
        np.testing.assert_allclose(frequencies, expected, atol=0.01)
    assert np.all(score_weighted(u, rows, 4, tau=1e-3) == 0)
    np.testing.assert_allclose(np.bincount(score_weighted(u, rows, 4, tau=1e3), minlength=4) / len(u), 0.25,
                               atol=0.01)


@pytest.mark.parametrize("call, message", [
    (lambda: choose("nearest", np.zeros((2, 4)), np.random.default_rng()), "uniform, top-m, score-weighted"),
    (lambda: choose("top-m", None, np.random.default_rng(), num_candidates=4), "needs candidate scores"),
    (lambda: choose("top-m", np.zeros((2, 4)), np.random.default_rng(), m=5), "1 <= m <= k = 4"),
    (lambda: choose("score-weighted", np.zeros(4), np.random.default_rng(), tau=0), "tau > 0"),
    (lambda: choose("uniform", np.zeros((2, 4)), np.random.default_rng(), num_candidates=8), "k = num_candidates"),
    (lambda: choose("uniform", None, np.random.default_rng()), "pass num_candidates"),
])
def test_bad_choices_give_one_line_user_errors(call, message):
    with pytest.raises(UserError) as error:
        call()
    assert message in str(error.value) and "\n" not in str(error.value)


def test_every_registered_policy_returns_valid_indices_of_the_scores_batch_shape():
    scores = np.random.default_rng(6).normal(size=(3, 5, 6))
    for name in POSITIVE_CHOICES:
        picked = choose(name, scores, np.random.default_rng(7))
        assert picked.shape == (3, 5) and picked.min() >= 0 and picked.max() < 6, name


# ---- lambda schedule ----

def test_lambda_ramps_linearly_from_zero_then_holds():
    values = [clsp_lambda_at(step, 1000, 0.8, 100) for step in range(1000)]
    assert values[0] == 0.0 and values[50] == pytest.approx(0.4) and values[100] == 0.8 and values[-1] == 0.8
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert clsp_lambda_at(0, 1000, 0.8, 0) == 0.8  # no ramp: METHOD.md's constant lambda


@pytest.mark.parametrize("args, message", [
    ((0, 100, 1.0, 101), "between 0 and the run's 100 steps"),
    ((0, 100, -1.0, 10), "lambda must be >= 0"),
    ((-1, 100, 1.0, 10), "step must be >= 0"),
])
def test_bad_lambda_schedules_give_user_errors(args, message):
    with pytest.raises(UserError, match=message):
        clsp_lambda_at(*args)


# ---- the options wired into the stages --------------------------------------------------------------------


def test_generation_stores_scores_and_refuses_mixing_deeper_than_the_model(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from clsp.generate.cli import gen
    from clsp.generate.sampler import num_skips
    from clsp.generate.unet import load_unet
    from clsp.shards.reader import ShardDirectory

    common = ["--dataset", "digits", "--unet", str(tiny_model_dir), "--limit", "4", "--shard-size", "4",
              "--candidates", "3", "--steps", "2", "--precision", "fp32", "--no-preview"]
    done = CliRunner().invoke(gen, [*common, "--shards", str(tmp_path / "s"), "--mix-depth", "1"])
    assert done.exit_code == 0, done.output
    store = ShardDirectory.open(tmp_path / "s")
    assert store.manifest.generation["mix_depth"] == 1 and store.manifest.generation["scores"] is True
    for sample in store.samples():
        assert sample.scores.shape == (3,) and np.all(np.abs(sample.scores) <= 1)
    deepest = num_skips(load_unet(str(tiny_model_dir))[0])
    refused = CliRunner().invoke(gen, [*common, "--shards", str(tmp_path / "t"), "--mix-depth", str(deepest + 1)])
    assert refused.exit_code == 1 and f"exceeds the {deepest} skip connections" in refused.output
    assert not (tmp_path / "t" / "shard-000000.tar").exists()


def _scored_shards(directory, num_anchors: int = 16, k: int = 4):
    """Shards whose candidate j is the constant image 40 * j, scored so that candidate (a mod k) is best."""
    from clsp.datasets import get_dataset
    from clsp.shards import schema, writer

    dataset = get_dataset("digits")
    manifest = writer.init_manifest(directory, dataset=dataset.describe(), generation={"scores": True},
                                    num_anchors=num_anchors, shard_size=8)
    size = dataset.image_size
    for index in range(manifest.num_shards):
        samples = []
        for a in manifest.anchor_range(index):
            positives = np.stack([np.full((size, size, 3), 40 * j, np.uint8) for j in range(k)])
            scores = np.full(k, -0.5, np.float32)
            scores[a % k] = 0.9
            samples.append(schema.ShardSample(anchor_index=a, positives=positives, scores=scores))
        writer.write_shard(directory, index, samples)
    return dataset


def test_top_m_choice_in_the_stream_draws_only_the_best_scored_candidates(tmp_path):
    from clsp.train.data import ContrastiveStream, make_loader, open_shards

    dataset = _scored_shards(tmp_path / "s")
    shards = open_shards(tmp_path / "s")
    picked = {"uniform": set(), "top-m": set()}
    for policy in picked:
        stream = ContrastiveStream(shards, dataset, batch_size=8, choice=policy,
                                   choice_params={"m": 1} if policy == "top-m" else {})
        for epoch in range(4):
            stream.set_epoch(epoch)
            for batch in make_loader(stream):
                for anchor, positive in zip(batch["index"].tolist(), batch["positive"]):
                    candidate = int(positive[0, 0, 0]) // 40
                    picked[policy].add(candidate)
                    if policy == "top-m":
                        assert candidate == anchor % 4  # the best-scored one, every time
    assert picked["top-m"] == {0, 1, 2, 3} and picked["uniform"] == {0, 1, 2, 3}


def test_lambda_ramp_starts_training_at_zero_and_reaches_lambda(tmp_path):
    from clsp.train.config import TrainJob
    from clsp.train.trainer import Trainer

    _scored_shards(tmp_path / "s", num_anchors=32)
    job = TrainJob(shards=str(tmp_path / "s"), out=str(tmp_path / "o"), backbone="resnet-narrow", epochs=2,
                   batch_size=8, workers=0, precision="fp32", proj_hidden_dim=32, proj_output_dim=16,
                   clsp_lambda=0.5, clsp_lambda_ramp_epochs=1, log_every=1, allow_partial=True)
    trainer = Trainer(job)
    trainer.fit()
    history = np.asarray(trainer.history)  # step, loss, loss_base, loss_clsp
    assert history[0, 3] == 0 and history[0, 1] == pytest.approx(history[0, 2])  # lambda 0: view 3 not even run
    ramp = trainer.lambda_ramp_steps
    assert ramp == trainer.steps_per_epoch == 4
    late = history[history[:, 0] >= ramp]
    assert np.all(late[:, 3] > 0)
    np.testing.assert_allclose(late[:, 1], late[:, 2] + 0.5 * late[:, 3], rtol=1e-5)
