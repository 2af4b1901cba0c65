"""The DDIM side of METHOD.md section 2: the model's noise process in a diffusers ``DDIMScheduler``.

The update and the forward noising are ``DDIMScheduler.step`` and ``DDIMScheduler.add_noise``, built from the
model's own scheduler config. Each field of that config is honoured, fixed by METHOD.md, or refused with one
error line naming it:

- the noise process the model was trained with, and what its output means, are honoured:
  ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule``, ``trained_betas``,
  ``rescale_betas_zero_snr``, ``prediction_type`` (epsilon, v_prediction or sample). Refused: a beta schedule
  ``DDIMScheduler`` does not know, a zero terminal SNR with epsilon prediction (x0 would divide by zero at the
  first step), a ``variance_type`` whose model also predicts its variance.
- the sampling options are METHOD.md's, as a pipeline's call arguments would be: the timesteps are the
  authors' rule whatever ``timestep_spacing`` and ``steps_offset`` say, and the predicted x0 is not clipped
  at each step whatever ``clip_sample`` and ``clip_sample_range`` say (the sampler clips only the final image
  to [-1, 1]). These are inference defaults that ``save_pretrained`` writes into every DDPM config (the shipped
  digits model's ``leading``, 0 and ``true`` are ``DDPMScheduler``'s defaults), not properties of the model.
- options that would change METHOD.md's update are refused: ``thresholding: true`` (dynamic thresholding of
  x0 at every step) and ``set_alpha_to_one: false`` (METHOD.md's last step returns x0, which is alpha_bar 1).

The authors' timesteps, ``int(linspace(-1, T - 1, S + 1))`` reversed, are ``DDIMScheduler``'s "trailing"
spacing only when S divides T, and ``step`` always goes from t to ``t - T // S``. So each step states its own
previous alpha_bar: the scheduler is set to one inference step, which makes ``step`` take its previous alpha_bar
from ``final_alpha_cumprod`` at every t, and ``ddim_update`` sets that to alpha_bar of METHOD.md's t_next
(1 past the last step, as ``set_alpha_to_one`` does). Where S divides T this is bit for bit ``DDIMScheduler``
with trailing spacing (tests/test_sampler.py compares the two).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler

from clsp.errors import UserError

PREDICTIONS = ("epsilon", "v_prediction", "sample")
# The overrides that make a DDIMScheduler's step METHOD.md's: no per-step clipping or thresholding, x0 at the end.
METHOD_SAMPLING = {"clip_sample": False, "thresholding": False, "set_alpha_to_one": True}


def _refuse(field: str, value: Any, why: str) -> UserError:
    return UserError(f"the diffusion model's scheduler config has {field}: {json.dumps(value)}, which the sampler "
                     f"cannot honour: {why}")


def ddim_scheduler(scheduler: Any, device: torch.device | str = "cpu") -> DDIMScheduler:
    """A ``DDIMScheduler`` with the noise process of ``scheduler`` (the model's DDPM or DDIM scheduler) and
    METHOD.md's sampling options, its alpha_bar on ``device``, ready for ``ddim_update``; refuses a config field it
    cannot honour."""
    config = getattr(scheduler, "config", None)
    if config is None:
        raise UserError(f"the scheduler {type(scheduler).__name__} has no diffusers config; pass the model's "
                        "DDPMScheduler or DDIMScheduler")
    config = dict(config)
    if config.get("thresholding", False):
        raise _refuse("thresholding", config["thresholding"], "METHOD.md section 2 does not threshold x0 at each "
                      "step; set it to false")
    if not config.get("set_alpha_to_one", True):
        raise _refuse("set_alpha_to_one", False, "METHOD.md section 2's last step returns x0 (alpha_bar 1); set it "
                      "to true")
    if str(config.get("variance_type", "fixed_small")).startswith("learned"):
        raise _refuse("variance_type", config["variance_type"], "the model also predicts its variance, DDIM uses "
                      "a model that predicts the noise (or v, or x0) only")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise _refuse("prediction_type", prediction, f"DDIMScheduler knows {', '.join(PREDICTIONS)}")
    try:
        ddim = DDIMScheduler.from_config(config, **METHOD_SAMPLING)
    except NotImplementedError:
        raise _refuse("beta_schedule", config.get("beta_schedule"), "DDIMScheduler knows linear, scaled_linear "
                      "and squaredcos_cap_v2, or trained_betas") from None
    if prediction == "epsilon" and float(ddim.alphas_cumprod[-1]) == 0.0:
        raise _refuse("rescale_betas_zero_snr", config.get("rescale_betas_zero_snr"), "alpha_bar is 0 at the last "
                      "timestep, where an epsilon-prediction model cannot give x0; use a v_prediction model")
    # alpha_bar in float64 where the device has it (not MPS): step()'s coefficients (sqrt(alpha_bar),
    # sqrt(1 - alpha_bar), sigma) are computed in double precision and rounded once, onto the float32 samples
    device = torch.device(device)
    ddim.alphas_cumprod = ddim.alphas_cumprod.to(device, torch.float32 if device.type == "mps" else torch.float64)
    ddim.set_timesteps(1)  # t - T // 1 < 0 for every t: step() takes the previous alpha_bar from final_alpha_cumprod
    return ddim


def timestep_pairs(num_train_timesteps: int, steps: int) -> list[tuple[int, int]]:
    """Consecutive (t, t_next) of ``int(linspace(-1, T - 1, S + 1))`` reversed; the last t_next is -1."""
    times = np.linspace(-1, num_train_timesteps - 1, steps + 1).astype(np.int64)[::-1].tolist()
    return list(zip(times[:-1], times[1:]))


def q_sample(scheduler: DDIMScheduler, images: torch.Tensor, noise: torch.Tensor,
             timestep: int | torch.Tensor) -> torch.Tensor:
    """``sqrt(alpha_bar_t) * images + sqrt(1 - alpha_bar_t) * noise`` (METHOD.md section 2's a_t), by add_noise.

    A sampling loop passes ``timestep`` as a tensor already on the images' device: add_noise moves it there
    otherwise, a host-to-device copy (and on CUDA a stream sync) per call."""
    return scheduler.add_noise(images, noise, torch.as_tensor(timestep))


def ddim_update(scheduler: DDIMScheduler, model_output: torch.Tensor, timestep: int, next_timestep: int,
                sample: torch.Tensor, eta: float, noise: torch.Tensor | None) -> torch.Tensor:
    """x at ``next_timestep`` from x at ``timestep`` by ``DDIMScheduler.step`` (x0 when ``next_timestep`` < 0).

    ``noise`` is the eta noise z of this step, needed where ``eta`` > 0 (without it ``step`` would draw from
    torch's global generator); the last step's variance is zero, so it takes none."""
    last = next_timestep < 0
    alphas = scheduler.alphas_cumprod
    scheduler.final_alpha_cumprod = alphas.new_ones(()) if last else alphas[next_timestep]
    return scheduler.step(model_output, timestep, sample, eta=0.0 if last else eta, variance_noise=noise).prev_sample
