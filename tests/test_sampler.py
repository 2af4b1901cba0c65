"""The interpolated U-Net split and the interpolated DDIM sampler (METHOD.md section 2)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from clsp.errors import UserError
from clsp.generate import interpolated_noise_prediction, sample_positives
from clsp.generate import sampler as sampler_module
from clsp.generate.cli import gen
from clsp.generate.ddim import ddim_scheduler, ddim_update, timestep_pairs
from clsp.generate.unet_split import encode, num_skips, time_embedding
from support import make_scheduler, make_tiny_unet


def _load_bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_generate.py"
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _unet(**overrides) -> UNet2DModel:
    """Tiny U-Nets of the configurations the split must follow (skip blocks, fourier time, no mid block...)."""
    torch.manual_seed(0)
    config = dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                  down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                  norm_num_groups=4)
    config.update(overrides)
    return UNet2DModel(**config).eval()


VARIANTS = {
    "skip-blocks": dict(down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
                        up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D"), norm_num_groups=8,
                        block_out_channels=(32, 32)),
    "fourier-centered": dict(time_embedding_type="fourier", center_input_sample=True),
    "no-mid-attention": dict(add_attention=False, layers_per_block=2),
    "no-mid-block": dict(mid_block_type=None),
    "learned-time": dict(time_embedding_type="learned", num_train_timesteps=1000),
}


def _inputs(unet: UNet2DModel, rows: int = 3, seed: int = 0):
    size = unet.config.sample_size
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 3, size, size, generator=gen), torch.randn(rows, 3, size, size, generator=gen))


@pytest.mark.parametrize("attention", [True, False])
@pytest.mark.parametrize("layers_per_block", [1, 2])
@pytest.mark.parametrize("sample_size", [16, 32])
def test_w_one_is_exactly_the_plain_unet(attention, layers_per_block, sample_size):
    unet = make_tiny_unet(sample_size=sample_size, attention=attention, layers_per_block=layers_per_block).eval()
    x, anchor = _inputs(unet)
    for t in (7, torch.tensor(500), torch.tensor([999, 10, 400])):
        with torch.inference_mode():
            plain = unet(x, t).sample
        assert torch.equal(interpolated_noise_prediction(unet, x, t, anchor, 1.0), plain)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_w_one_exact_and_mix_matches_hook_reference_on_other_configs(variant):
    unet = _unet(**VARIANTS[variant])
    x, anchor = _inputs(unet)
    t = torch.tensor(321)
    with torch.inference_mode():
        plain = unet(x, t).sample
    assert torch.equal(interpolated_noise_prediction(unet, x, t, anchor, 1.0), plain)
    mixed = interpolated_noise_prediction(unet, x, t, anchor, 0.3)
    assert mixed.shape == plain.shape and not torch.allclose(mixed, plain)
    if unet.mid_block is not None:  # the reference hooks the mid block
        with torch.inference_mode():
            reference = _load_bench().naive_interpolated_noise_prediction(unet, x, t, anchor, 0.3)
        torch.testing.assert_close(mixed, reference, rtol=1e-4, atol=1e-5)


def test_decoder_input_is_the_linear_mix_of_the_two_bottlenecks():
    unet = make_tiny_unet(layers_per_block=2).eval()
    x, anchor = _inputs(unet)
    seen = {}
    unet.mid_block.register_forward_hook(lambda m, args, out: seen.__setitem__("mid", out.clone()))
    unet.up_blocks[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("decoder_in", args[0].clone()))
    for w in (0.0, 0.25, 0.5, 0.9):
        interpolated_noise_prediction(unet, x, 250, anchor, w)
        h, h_anchor = seen["mid"][:3], seen["mid"][3:]
        torch.testing.assert_close(seen["decoder_in"], w * h + (1 - w) * h_anchor, rtol=1e-5, atol=1e-6)
        if w == 0.0:  # the anchor's bottleneck alone
            assert torch.equal(seen["decoder_in"], h_anchor)
    # the bottleneck of each half is the plain encoder's: the anchor's half equals a pass on the anchor alone
    interpolated_noise_prediction(unet, anchor, 250, anchor, 1.0)
    torch.testing.assert_close(seen["decoder_in"], h_anchor, rtol=1e-5, atol=1e-6)


def test_skips_come_from_the_sample_alone():
    unet = make_tiny_unet().eval()
    x, anchor = _inputs(unet)
    # the same anchor with another sample changes the output; another anchor at w = 1 does not
    a = interpolated_noise_prediction(unet, x, 100, anchor, 0.0)
    b = interpolated_noise_prediction(unet, x.flip(0), 100, anchor, 0.0).flip(0)
    assert not torch.allclose(a, b)
    assert torch.equal(interpolated_noise_prediction(unet, x, 100, anchor, 1.0),
                       interpolated_noise_prediction(unet, x, 100, anchor.flip(0), 1.0))


def test_fewer_anchor_rows_are_shared_by_consecutive_samples():
    unet = make_tiny_unet().eval()
    x, _ = _inputs(unet, rows=6)
    _, anchor = _inputs(unet, rows=2, seed=1)
    shared = interpolated_noise_prediction(unet, x, 600, anchor, 0.2)
    repeated = interpolated_noise_prediction(unet, x, 600, anchor.repeat_interleave(3, dim=0), 0.2)
    torch.testing.assert_close(shared, repeated, rtol=1e-5, atol=1e-6)


def _bottleneck_only_reference(unet, sample, timestep, anchor_sample, w, mix_depth=0):
    """METHOD.md's bottleneck-only interpolation through diffusers' own ``UNet2DModel.forward``, independent of
    ``unet_split``: the anchors' mid-block output is recorded, then mixed into the samples' own forward by a hook
    on the mid block; the skips stay the samples' own."""
    assert mix_depth == 0
    if w == 1.0:
        return unet(sample, timestep).sample
    recorded = []
    hook = unet.mid_block.register_forward_hook(lambda module, args, out: recorded.append(out))
    unet(anchor_sample, timestep)
    hook.remove()
    h_anchor = recorded[0].repeat_interleave(sample.shape[0] // anchor_sample.shape[0], dim=0)
    hook = unet.mid_block.register_forward_hook(lambda module, args, out: torch.lerp(h_anchor, out, w))
    try:
        return unet(sample, timestep).sample
    finally:
        hook.remove()


@pytest.mark.parametrize("share", [False, True])
def test_depth_zero_is_the_bottleneck_only_sampler(tiny_unet, monkeypatch, share):
    scheduler, anchors = make_scheduler(), _anchors(2)
    kwargs = dict(num_candidates=3, w=0.1, steps=4, precision="fp32", share_anchor_pass=share)
    x, anchor = _inputs(tiny_unet)
    with torch.inference_mode():
        torch.testing.assert_close(interpolated_noise_prediction(tiny_unet, x, 400, anchor, 0.1),
                                   _bottleneck_only_reference(tiny_unet, x, torch.tensor(400), anchor, 0.1),
                                   rtol=1e-5, atol=1e-6)
    new = sample_positives(tiny_unet, scheduler, anchors, generator=_gens(4, 5), **kwargs)
    monkeypatch.setattr(sampler_module, "interpolated_noise_prediction", _bottleneck_only_reference)
    old = sample_positives(tiny_unet, scheduler, anchors, generator=_gens(4, 5), **kwargs)
    torch.testing.assert_close(new, old, rtol=1e-4, atol=1e-4)


def _decoder_skips(unet, call) -> tuple[torch.Tensor, ...]:
    """The skips the decoder consumed in ``call()``, in the encoder's order (shallowest first)."""
    seen = []
    hooks = [block.register_forward_pre_hook(lambda m, args: seen.append(args[1])) for block in unet.up_blocks]
    call()
    for hook in hooks:
        hook.remove()
    return tuple(res for block_res in reversed(seen) for res in block_res)


@pytest.mark.parametrize("depth", [1, 2, 5])
def test_mix_depth_mixes_the_deepest_skips_with_the_anchors_own(depth):
    unet = make_tiny_unet(layers_per_block=2).eval()
    x, anchor = _inputs(unet)
    w = 0.3
    with torch.inference_mode():
        _, emb = time_embedding(unet, 250, x)
        _, own = encode(unet, x, emb)
        _, anchors = encode(unet, anchor, emb)
    skips = _decoder_skips(unet, lambda: interpolated_noise_prediction(unet, x, 250, anchor, w, mix_depth=depth))
    assert len(skips) == len(own) == num_skips(unet) == 6
    for i, (got, mine, theirs) in enumerate(zip(skips, own, anchors)):
        want = w * mine + (1 - w) * theirs if i >= len(own) - depth else mine
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(interpolated_noise_prediction(unet, x, 250, anchor, w, mix_depth=depth),
                              interpolated_noise_prediction(unet, x, 250, anchor, w))


def test_mix_depth_at_w_one_is_still_the_plain_unet_and_all_skips_at_w_zero_ignore_the_sample():
    unet = make_tiny_unet().eval()
    x, anchor = _inputs(unet)
    full = num_skips(unet)
    with torch.inference_mode():
        plain = unet(x, 300).sample
    assert torch.equal(interpolated_noise_prediction(unet, x, 300, anchor, 1.0, mix_depth=full), plain)
    # w = 0 with every skip mixed: the decoder sees the anchor's features alone, whatever the sample
    a = interpolated_noise_prediction(unet, x, 300, anchor, 0.0, mix_depth=full)
    b = interpolated_noise_prediction(unet, x.flip(0), 300, anchor, 0.0, mix_depth=full)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_mix_depth_with_a_shared_anchor_pass():
    unet = make_tiny_unet().eval()
    x, _ = _inputs(unet, rows=6)
    _, anchor = _inputs(unet, rows=2, seed=1)
    shared = interpolated_noise_prediction(unet, x, 600, anchor, 0.2, mix_depth=3)
    repeated = interpolated_noise_prediction(unet, x, 600, anchor.repeat_interleave(3, dim=0), 0.2, mix_depth=3)
    torch.testing.assert_close(shared, repeated, rtol=1e-5, atol=1e-6)
    scheduler, anchors = make_scheduler(), _anchors(2)
    kwargs = dict(steps=3, precision="fp32", share_anchor_pass=True, generator=_gens(0, 1))
    deep = sample_positives(unet, scheduler, anchors, 4, mix_depth=3, **kwargs)
    assert deep.shape == (2, 4, 3, 16, 16) and deep.abs().max() <= 1
    assert not torch.allclose(deep, sample_positives(unet, scheduler, anchors, 4, **kwargs))


def test_timestep_pairs_follow_method():
    pairs = timestep_pairs(1000, 100)
    assert len(pairs) == 100 and pairs[0] == (999, 989) and pairs[-1] == (9, -1)
    assert timestep_pairs(1000, 3) == [(999, 665), (665, 332), (332, -1)]
    assert timestep_pairs(1000, 1000)[-2:] == [(1, 0), (0, -1)]


def test_timestep_pairs_are_ddim_trailing_spacing_where_steps_divide_the_training_timesteps():
    """Where S divides T diffusers' own trailing spacing is METHOD.md's rule (and step()'s t - T // S its t_next);
    elsewhere it is not, which is why each step sets its previous alpha_bar (generate/ddim.py)."""
    for steps in (1, 2, 8, 100, 250, 1000, 3, 7):
        trailing = DDIMScheduler(timestep_spacing="trailing")
        trailing.set_timesteps(steps)
        same = trailing.timesteps.tolist() == [t for t, _ in timestep_pairs(1000, steps)]
        assert same == (1000 % steps == 0), steps


@pytest.mark.parametrize("t, t_next", [(999, 499), (665, 332), (400, 300), (123, 23), (9, -1)])
def test_one_update_is_ddim_scheduler_step_to_t_next(t, t_next):
    """Any gap, as METHOD.md's rule makes them: the scheduler that steps exactly from t to t_next agrees."""
    gen = torch.Generator().manual_seed(t)
    output, x, z = (torch.randn(2, 3, 4, 4, generator=gen) for _ in range(3))
    stock = DDIMScheduler(clip_sample=False)
    stock.alphas_cumprod = stock.alphas_cumprod.double()  # the sampler's alpha_bar precision
    stock.set_timesteps(1000 // (t - t_next))
    want = stock.step(output, t, x, eta=0.3, variance_noise=z).prev_sample
    got = ddim_update(ddim_scheduler(make_scheduler()), output, t, t_next, x, 0.3, None if t_next < 0 else z)
    assert torch.equal(got, want)


def _plain_ddim_loop(unet, config, rows: int, k: int, steps: int, eta: float, seed: int,
                     float64: bool = True) -> torch.Tensor:
    """The independent oracle: diffusers' DDIMScheduler with trailing spacing (METHOD.md's timesteps where
    ``steps`` divides T) stepping the plain U-Net, with the sampler's random draws in its order."""
    scheduler = DDIMScheduler.from_config(config, timestep_spacing="trailing")
    if float64:
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    scheduler.set_timesteps(steps)
    gen, shape = torch.Generator().manual_seed(seed), (rows, k, 3, 16, 16)
    x = torch.randn(shape, generator=gen).flatten(0, 1)
    with torch.inference_mode():
        for i, t in enumerate(scheduler.timesteps):
            torch.randn(shape, generator=gen)  # the anchor's noise, which w = 1 ignores
            output = unet(x, t).sample
            z = torch.randn(shape, generator=gen).flatten(0, 1) if eta > 0 and i < steps - 1 else torch.zeros_like(x)
            x = scheduler.step(output, t, x, eta=eta, variance_noise=z).prev_sample
    return x.clamp(-1, 1).reshape(shape)


def _method_scheduler(**fields) -> DDPMScheduler:
    """The model's scheduler of METHOD.md section 2 (linear 1e-4 .. 0.02, T = 1000), without per-step clipping."""
    return DDPMScheduler.from_config(make_scheduler().config, **{"clip_sample": False, **fields})


@pytest.mark.parametrize("steps, eta", [(1, 0.0), (2, 0.5), (5, 0.1), (8, 1.0)])
def test_w_one_is_bit_for_bit_a_plain_ddim_scheduler_loop(tiny_unet, steps, eta):
    scheduler = _method_scheduler()
    out = sample_positives(tiny_unet, scheduler, _anchors(2), 2, w=1.0, steps=steps, eta=eta,
                           generator=torch.Generator().manual_seed(5), precision="fp32")
    assert torch.equal(out, _plain_ddim_loop(tiny_unet, scheduler.config, 2, 2, steps, eta, seed=5))
    # diffusers' float32 alpha_bar differs from the sampler's float64 in rounding only
    float32 = _plain_ddim_loop(tiny_unet, scheduler.config, 2, 2, steps, eta, seed=5, float64=False)
    torch.testing.assert_close(out, float32, rtol=0, atol=1e-4)


HONOURED = {
    "v-prediction": dict(prediction_type="v_prediction"),
    "sample-prediction": dict(prediction_type="sample"),
    "cosine-betas": dict(beta_schedule="squaredcos_cap_v2"),
    "trained-betas": dict(trained_betas=torch.linspace(2e-4, 0.03, 1000).tolist()),
    "zero-terminal-snr": dict(rescale_betas_zero_snr=True, prediction_type="v_prediction"),
    "500-timesteps": dict(num_train_timesteps=500),
}


@pytest.mark.parametrize("name", sorted(HONOURED))
def test_the_models_noise_process_and_prediction_type_are_honoured(tiny_unet, name):
    scheduler = _method_scheduler(**HONOURED[name])
    kwargs = dict(w=1.0, steps=4, eta=0.3, precision="fp32")
    out = sample_positives(tiny_unet, scheduler, _anchors(1), 2, generator=torch.Generator().manual_seed(1), **kwargs)
    assert torch.equal(out, _plain_ddim_loop(tiny_unet, scheduler.config, 1, 2, 4, 0.3, seed=1))
    default = sample_positives(tiny_unet, _method_scheduler(), _anchors(1), 2,
                               generator=torch.Generator().manual_seed(1), **kwargs)
    assert not torch.allclose(out, default, atol=1e-3)  # the field matters


def test_the_configs_sampling_options_give_way_to_methods(tiny_unet):
    """clip_sample (the shipped digits model's true), timestep_spacing and steps_offset do not change the positives:
    METHOD.md section 2 clips only the final image and fixes the timesteps."""
    kwargs = dict(num_candidates=2, w=0.5, steps=4, eta=0.2, precision="fp32")
    base = sample_positives(tiny_unet, _method_scheduler(), _anchors(2), generator=_gens(0, 1), **kwargs)
    for fields in (dict(clip_sample=True), dict(clip_sample=True, clip_sample_range=0.5),
                   dict(timestep_spacing="linspace", steps_offset=1), dict(timestep_spacing="leading")):
        assert torch.equal(sample_positives(tiny_unet, _method_scheduler(**fields), _anchors(2), generator=_gens(0, 1),
                                            **kwargs), base), fields
    # honouring clip_sample would have clipped x0 at every step: a different result
    clipped = _plain_ddim_loop(tiny_unet, make_scheduler().config, 2, 2, 4, 0.0, seed=0)
    plain = sample_positives(tiny_unet, make_scheduler(), _anchors(2), 2, w=1.0, steps=4, eta=0.0,
                             generator=torch.Generator().manual_seed(0), precision="fp32")
    assert not torch.allclose(plain, clipped, atol=1e-3)


@pytest.mark.parametrize("steps", [3, 7])
def test_steps_that_do_not_divide_t_visit_methods_timesteps(tiny_unet, steps):
    seen = []
    hook = tiny_unet.time_proj.register_forward_hook(lambda m, args, out: seen.append(int(args[0][0])))
    sample_positives(tiny_unet, make_scheduler(), _anchors(1), 1, w=1.0, steps=steps, generator=_gens(0),
                     precision="fp32")
    hook.remove()
    assert seen == [t for t, _ in timestep_pairs(1000, steps)]


REFUSED = {
    "thresholding": (dict(thresholding=True), "thresholding: true"),
    "set_alpha_to_one": (dict(set_alpha_to_one=False), "set_alpha_to_one: false"),
    "variance_type": (dict(variance_type="learned_range"), 'variance_type: "learned_range"'),
    "beta_schedule": (dict(beta_schedule="sigmoid"), 'beta_schedule: "sigmoid"'),
    "prediction_type": (dict(prediction_type="flow"), 'prediction_type: "flow"'),
    "rescale_betas_zero_snr": (dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr: true"),
}


@pytest.mark.parametrize("field", sorted(REFUSED))
def test_a_scheduler_field_the_sampler_cannot_honour_is_one_error_line(field, tmp_path):
    fields, needle = REFUSED[field]
    model = tmp_path / "model"
    make_tiny_unet().save_pretrained(model)
    make_scheduler().save_pretrained(model)
    path = model / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    result = CliRunner().invoke(gen, ["--dataset", "digits", "--limit", "2", "--candidates", "1", "--steps", "2",
                                      "--shards", str(tmp_path / "s"), "--unet", str(model)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], result.output
    assert not list((tmp_path / "s").glob("*"))  # refused before anything is written


def _anchors(rows: int, size: int = 16, seed: int = 3) -> torch.Tensor:
    return torch.rand(rows, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_sampler_shapes_range_and_determinism(tiny_unet):
    scheduler, anchors = make_scheduler(), _anchors(2)
    kwargs = dict(num_candidates=3, steps=8, precision="fp32")
    first = sample_positives(tiny_unet, scheduler, anchors, generator=torch.Generator().manual_seed(0), **kwargs)
    again = sample_positives(tiny_unet, scheduler, anchors, generator=torch.Generator().manual_seed(0), **kwargs)
    other = sample_positives(tiny_unet, scheduler, anchors, generator=torch.Generator().manual_seed(1), **kwargs)
    assert first.shape == (2, 3, 3, 16, 16) and first.dtype == torch.float32
    assert first.min() >= -1 and first.max() <= 1
    assert torch.equal(first, again) and not torch.allclose(first, other)
    assert not torch.allclose(first[:, 0], first[:, 1])  # each candidate has its own x_T
    auto = sample_positives(tiny_unet, scheduler, anchors, generator=_gens(0, 1), num_candidates=2, steps=4)
    assert auto.shape == (2, 2, 3, 16, 16) and auto.abs().max() <= 1  # default precision (bf16 where supported)


def test_per_anchor_generators_make_candidates_independent_of_the_batch(tiny_unet):
    scheduler, anchors = make_scheduler(), _anchors(3)
    kwargs = dict(num_candidates=2, steps=6, precision="fp32")
    batch = sample_positives(tiny_unet, scheduler, anchors, generator=_gens(10, 11, 12), **kwargs)
    alone = sample_positives(tiny_unet, scheduler, anchors[1:2], generator=_gens(11), **kwargs)
    reordered = sample_positives(tiny_unet, scheduler, anchors.flip(0), generator=_gens(12, 11, 10), **kwargs)
    torch.testing.assert_close(alone[0], batch[1], rtol=0, atol=1e-3)
    torch.testing.assert_close(reordered.flip(0), batch, rtol=0, atol=1e-3)
    assert torch.equal(batch, sample_positives(tiny_unet, scheduler, anchors, generator=_gens(10, 11, 12), **kwargs))


def test_w_pulls_candidates_towards_the_anchor_bottleneck(tiny_unet):
    scheduler, anchors = make_scheduler(), _anchors(2)
    kwargs = dict(num_candidates=2, steps=5, precision="fp32")
    plain = sample_positives(tiny_unet, scheduler, anchors, w=1.0, generator=_gens(0, 1), **kwargs)
    pulled = sample_positives(tiny_unet, scheduler, anchors, w=0.1, generator=_gens(0, 1), **kwargs)
    other_anchor = sample_positives(tiny_unet, scheduler, anchors.flip(0), w=0.1, generator=_gens(0, 1), **kwargs)
    assert not torch.allclose(plain, pulled) and not torch.allclose(pulled, other_anchor)


def test_share_anchor_pass(tiny_unet):
    scheduler, anchors = make_scheduler(), _anchors(2)
    kwargs = dict(steps=4, precision="fp32")
    # with one candidate there is nothing to share: identical draws, identical result
    one = sample_positives(tiny_unet, scheduler, anchors, 1, generator=_gens(0, 1), share_anchor_pass=True, **kwargs)
    assert torch.equal(one, sample_positives(tiny_unet, scheduler, anchors, 1, generator=_gens(0, 1), **kwargs))
    rows = []
    hook = tiny_unet.mid_block.register_forward_hook(lambda m, args, out: rows.append(out.shape[0]))
    shared = sample_positives(tiny_unet, scheduler, anchors, 4, generator=_gens(0, 1), share_anchor_pass=True,
                              **kwargs)
    sample_positives(tiny_unet, scheduler, anchors, 4, generator=_gens(0, 1), **kwargs)
    hook.remove()
    assert shared.shape == (2, 4, 3, 16, 16) and shared.abs().max() <= 1
    assert rows == [8 + 2] * 4 + [8 + 8] * 4  # encoder rows per step: candidates + anchors


def test_sampling_uses_eval_mode_and_restores_the_callers_mode():
    unet = _unet(dropout=0.5).train()
    scheduler, anchors = make_scheduler(), _anchors(1)
    runs = [sample_positives(unet, scheduler, anchors, 2, steps=3, generator=_gens(0), precision="fp32")
            for _ in range(2)]
    assert torch.equal(*runs) and unet.training


@pytest.mark.parametrize("call, message", [
    (lambda u, s, a: sample_positives(u, s, a, 2, w=-0.1), "w must be in [0, 1]"),
    (lambda u, s, a: sample_positives(u, s, a, 2, w=1.5), "w must be in [0, 1]"),
    (lambda u, s, a: sample_positives(u, s, a, 0), "num_candidates must be at least 1"),
    (lambda u, s, a: sample_positives(u, s, a, 2, mix_depth=5), "mix_depth must be an integer from 0"),
    (lambda u, s, a: sample_positives(u, s, a, 2, mix_depth=-1), "to 4 (every skip"),
    (lambda u, s, a: interpolated_noise_prediction(u, a, 10, a, 0.5, mix_depth=1.5), "got 1.5"),
    (lambda u, s, a: sample_positives(u, s, a, 2, steps=0), "steps must be between 1 and"),
    (lambda u, s, a: sample_positives(u, s, a, 2, steps=1001), "1000 training timesteps"),
    (lambda u, s, a: sample_positives(u, s, a, 2, eta=-1), "eta must be in [0, 1]"),
    (lambda u, s, a: sample_positives(u, s, a[:, :1], 2), "anchors must be [batch, 3, 16, 16]"),
    (lambda u, s, a: sample_positives(u, s, _anchors(2, size=32), 2), "anchors must be [batch, 3, 16, 16]"),
    (lambda u, s, a: sample_positives(u, s, a[0], 2), "anchors must be [batch, 3, 16, 16]"),
    (lambda u, s, a: sample_positives(u, s, (a + 1) * 127.5, 2), "scaled to [-1, 1]"),
    (lambda u, s, a: sample_positives(u, s, a, 2, generator=_gens(0)), "got 1 generators for 2 anchors"),
    (lambda u, s, a: sample_positives(torch.nn.Conv2d(3, 3, 1), s, a, 2), "needs a diffusers UNet2DModel"),
    (lambda u, s, a: sample_positives(_unet(num_class_embeds=10), s, a, 2), "class-conditional"),
    (lambda u, s, a: sample_positives(u, object(), a, 2), "has no diffusers config"),
    (lambda u, s, a: interpolated_noise_prediction(u, a, 10, a[:, :, :8], 0.5), "anchor_sample must be"),
    (lambda u, s, a: interpolated_noise_prediction(u, a, 10, a[:1].expand(3, -1, -1, -1), 0.5), "not a multiple"),
    (lambda u, s, a: interpolated_noise_prediction(u, a, 10, a, 2.0), "w must be in [0, 1]"),
])
def test_bad_inputs_give_one_line_user_errors(tiny_unet, call, message):
    with pytest.raises(UserError) as error:
        call(tiny_unet, make_scheduler(), _anchors(2))
    assert message in str(error.value) and "\n" not in str(error.value)
