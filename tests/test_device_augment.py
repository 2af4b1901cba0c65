"""The batched device augmentation: torchvision's distributions, torchvision's pixels, few kernels, no host syncs."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from scipy.stats import ks_2samp
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF

from clsp.train.augment import DeviceAugment, augment_views, view_augmentations
from clsp.train.recipes import ViewAugmentation

_SPEC = importlib.util.spec_from_file_location(
    "aten_ops", Path(__file__).resolve().parent.parent / "benchmarks" / "aten_ops.py")
aten_ops = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(aten_ops)
DRAWS = 4000
MEAN, STD = (0.4, 0.45, 0.5), (0.2, 0.25, 0.3)
def _same_distribution(ours, reference, what: str) -> None:
    result = ks_2samp(ours, reference)
    assert result.pvalue > 1e-3, f"{what}: KS statistic {result.statistic:.3f}, p {result.pvalue:.2g}"


def _near_rate(flags: torch.Tensor, p: float, what: str) -> None:
    rate = flags.float().mean().item()
    assert abs(rate - p) <= 5 * math.sqrt(p * (1 - p) / len(flags)) + 1e-9, f"{what}: rate {rate:.3f}, expected {p}"


@pytest.mark.parametrize("height, width, min_scale", [(32, 32, 0.08), (24, 40, 0.2)])
def test_crops_follow_torchvisions_random_resized_crop(height, width, min_scale):
    view = ViewAugmentation(crop_min_scale=min_scale)
    torch.manual_seed(0)
    boxes = DeviceAugment(32, MEAN, STD, view).draw(DRAWS, height, width)["boxes"]
    image = torch.zeros(3, height, width)
    reference = torch.tensor([T.RandomResizedCrop.get_params(image, [min_scale, 1.0], [3 / 4, 4 / 3])
                              for _ in range(DRAWS)], dtype=torch.float32)
    for name, column in (("scale", lambda b: b[:, 2] * b[:, 3] / (height * width)),
                         ("log aspect", lambda b: (b[:, 3] / b[:, 2]).log()),
                         ("top", lambda b: b[:, 0] / height), ("left", lambda b: b[:, 1] / width)):
        _same_distribution(column(boxes).numpy(), column(reference).numpy(), name)
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= height).all()
    assert (boxes[:, 1] + boxes[:, 3] <= width).all() and (boxes == boxes.round()).all()


def test_jitter_factors_order_and_coins_follow_torchvision():
    view = view_augmentations("nnclr", {})[1]  # the view with solarization (p 0.2)
    assert view.solarize_p > 0
    torch.manual_seed(0)
    params = DeviceAugment(32, MEAN, STD, view).draw(DRAWS, 32, 32)
    jitter = T.ColorJitter(view.brightness, view.contrast, view.saturation, view.hue)
    drawn = [T.ColorJitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
             for _ in range(DRAWS)]
    for k, name in enumerate(("brightness", "contrast", "saturation", "hue")):
        _same_distribution(params["factors"][:, k].numpy(), [d[1 + k] for d in drawn], name)
    # torchvision draws a uniform permutation per image: each step at each position a quarter of the time
    for step in range(4):
        reference = [list(d[0]).index(step) for d in drawn]
        _same_distribution((params["order"] == step).int().argmax(1).numpy(), reference, f"position of step {step}")
    _near_rate(params["applied"], view.jitter_p, "jitter")
    _near_rate(params["grayscale"], view.grayscale_p, "grayscale")
    _near_rate(params["solarize"], view.solarize_p, "solarize")
    _near_rate(params["flip"], 0.5, "flip")
    no_flip = DeviceAugment(32, MEAN, STD, ViewAugmentation(flip=False, solarize_p=0.0)).draw(DRAWS, 32, 32)
    assert not no_flip["flip"].any() and not no_flip["solarize"].any()


def test_each_view_is_torchvisions_functional_ops_with_its_drawn_parameters():
    view = ViewAugmentation(solarize_p=0.5, grayscale_p=0.3)
    augment = DeviceAugment(24, MEAN, STD, view)
    torch.manual_seed(1)
    images = torch.rand(64, 3, 20, 28)
    params = augment.draw(64, 20, 28)
    ours = augment.apply_params(images, params)
    steps = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(len(images)):
        top, left, h, w = (int(v) for v in params["boxes"][i])
        expected = TF.resized_crop(images[i], top, left, h, w, [24, 24], antialias=False)
        if params["flip"][i]:
            expected = TF.horizontal_flip(expected)
        if params["applied"][i]:
            for k in params["order"][i].tolist():
                expected = steps[k](expected, params["factors"][i, k].item())
        if params["grayscale"][i]:
            expected = TF.rgb_to_grayscale(expected, num_output_channels=3)
        if params["solarize"][i]:
            expected = TF.solarize(expected, 0.5)
        expected = TF.normalize(expected, list(MEAN), list(STD))
        torch.testing.assert_close(ours[i], expected, atol=3e-4, rtol=0, msg=f"view {i}")


def test_three_views_of_a_step_take_one_call_of_a_few_hundred_ops_and_no_host_traffic():
    augment = DeviceAugment(32, MEAN, STD, view_augmentations("simclr", {}))
    anchor, positive = (torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8) for _ in range(2))
    with aten_ops.AtenOps() as count:
        x1, x2, x3 = augment_views(augment, anchor, positive)
    # before: about 1,100 aten ops per view and a host copy of the crop's scale each
    assert count.total <= 400, count.ops.most_common(10)
    assert count.host_traffic == 0, count.ops
    assert x1.shape == x2.shape == x3.shape == (8, 3, 32, 32)
    assert not torch.equal(x1, x2)  # the same anchors, their own draws
    # an asymmetric recipe (NNCLR: view 2 alone solarizes) takes one call too
    asymmetric = DeviceAugment(32, MEAN, STD, view_augmentations("nnclr", {}))
    with aten_ops.AtenOps() as count:
        views = augment_views(asymmetric, anchor, None)
    assert views[2] is None and count.total <= 400 and count.host_traffic == 0


def test_an_asymmetric_recipe_draws_each_row_by_its_own_list():
    first, second = view_augmentations("nnclr", {})
    augment = DeviceAugment(32, MEAN, STD, (first, second))
    lists = torch.arange(2).repeat_interleave(DRAWS)
    torch.manual_seed(0)
    params = augment.draw(2 * DRAWS, 32, 32, lists=lists)
    _near_rate(params["solarize"][:DRAWS], first.solarize_p, "view 1 solarize")
    _near_rate(params["solarize"][DRAWS:], second.solarize_p, "view 2 solarize")
    for k, name in ((1, "contrast"), (2, "saturation")):
        for rows, view in ((slice(None, DRAWS), first), (slice(DRAWS, None), second)):
            strength = getattr(view, name)
            factors = params["factors"][rows, k]
            assert factors.min() >= 1 - strength and factors.max() <= 1 + strength
    assert len(DeviceAugment(32, MEAN, STD, (first, first)).views) == 1  # a symmetric recipe: one list
