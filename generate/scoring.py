"""How well does each synthetic candidate agree with its anchor? A score per candidate, to choose positives.

The score is the cosine similarity of the diffusion model's own bottlenecks (mid-block output of the U-Net
encoder, METHOD.md section 2's E) of the anchor and of the candidate, both noised to the same timestep with the same
noise. The bottleneck is what the sampler pulls towards the anchor, so it measures how far that pull got;
sharing the noise makes the score depend on the images alone. It costs one encoder pass per image, no
decoder, and needs no model beyond the one that drew the candidates. On the shipped digits model its ROC AUC
for "the candidate keeps the anchor's class" is 0.85 at t = 50, 100 and 200 alike (0.75 at t = 500, where
the noise hides the digit), hence the default t = 100. A class-conditional model encodes with its null class,
so the score compares the images, not the label they were drawn for.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from clsp.errors import UserError
from clsp.generate.conditional import NULL_CLASS
from clsp.generate.ddim import ddim_scheduler, q_sample
from clsp.generate.sampler import Generators
from clsp.generate.unet_split import check_splittable, encode, eval_mode, time_embedding
from clsp.runtime import autocast


def _check(unet: UNet2DModel, anchors: torch.Tensor, candidates: torch.Tensor, timestep: int, steps: int,
           batch_size: int) -> None:
    if anchors.ndim != 4 or candidates.ndim != 5 or candidates.shape[0] != anchors.shape[0] \
            or candidates.shape[2:] != anchors.shape[1:]:
        raise UserError(f"candidates must be [n, k, C, H, W] for anchors [n, C, H, W], got {list(candidates.shape)} "
                        f"and {list(anchors.shape)}")
    if not 0 <= timestep < steps:
        raise UserError(f"the scoring timestep must be in [0, {steps - 1}], got {timestep}")
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")


@torch.inference_mode()
def bottleneck_agreement(unet: UNet2DModel, scheduler, anchors: torch.Tensor, candidates: torch.Tensor,
                         timestep: int = 100, generator: Generators = None, batch_size: int = 256,
                         precision: str = "auto") -> np.ndarray:
    """Cosine similarity ``[n, k]`` (float32, in [-1, 1]) of each candidate's bottleneck to its anchor's.

    ``anchors`` ``[n, C, H, W]`` and ``candidates`` ``[n, k, C, H, W]`` are images in [-1, 1]. Each anchor and
    its k candidates are noised to ``timestep`` with one shared noise draw (from ``generator``, one per anchor
    or a single one, as in ``sample_positives``), then encoded ``batch_size`` images at a time.
    """
    check_splittable(unet)
    ddim = ddim_scheduler(scheduler, unet.device)
    _check(unet, anchors, candidates, timestep, ddim.config.num_train_timesteps, batch_size)
    if isinstance(generator, tuple):
        generator = list(generator)
    device = unet.device
    n, k = candidates.shape[:2]
    images = torch.cat([anchors[:, None], candidates], dim=1).to(device=device, dtype=torch.float32)
    noise = randn_tensor((n, 1, *images.shape[2:]), generator=generator, device=device, dtype=torch.float32)
    noised = q_sample(ddim, images, noise, timestep).flatten(0, 1)
    bottlenecks = []
    with eval_mode(unet), autocast(device, precision):
        for chunk in noised.split(batch_size):
            null = torch.full((len(chunk),), NULL_CLASS, device=device) if unet.class_embedding is not None else None
            _, emb = time_embedding(unet, timestep, chunk, null)  # a conditional model's: of the null class
            bottlenecks.append(encode(unet, chunk, emb)[0].flatten(1).float())
    features = F.normalize(torch.cat(bottlenecks), dim=1).reshape(n, k + 1, -1)
    cosine = (features[:, 1:] * features[:, :1]).sum(-1).clamp(-1.0, 1.0)
    return cosine.cpu().numpy().astype(np.float32)
