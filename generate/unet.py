"""Load a diffusers U-Net with its noise schedule, check it fits the data, and draw plain samples.

``--unet`` accepts a local folder (``save_pretrained`` layout, or a ``DDPMPipeline`` folder with
``unet/`` and ``scheduler/``) or a hub id such as ``google/ddpm-cifar10-32``. Every way this can go
wrong (no folder, no cache while offline, a model for other image sizes) ends in one ``UserError``
line rather than a shape error deep inside a forward pass.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

from clsp.datasets import dataset_info
from clsp.errors import UserError, short
from clsp.generate.hub import hub_offline
from clsp.generate.pretrained import shipped_model
from clsp.images import to_uint8
from clsp.io import atomic_path


def resolve_unet(unet: str | None, dataset_name: str, conditional: bool = False) -> str:
    """``unet`` as given, else the dataset's known model (a shipped folder or a hub id; ``conditional``: its
    class-conditional one); refused in one line where the dataset has none."""
    if unet:
        return unet
    info = dataset_info(dataset_name)
    known = (info.default_conditional_unet if conditional else info.default_unet) if info is not None else None
    if known is None:
        option = dataset_name if len(dataset_name) <= 80 else "DATASET"
        kind, flag = ("class-conditional diffusion model", " --conditional") if conditional else ("diffusion model", "")
        raise UserError(f"no {kind} is known for {short(dataset_name)}; train one with `clsp ddpm train "
                        f"--dataset {option}{flag} --out MODEL_DIR` and pass --unet MODEL_DIR")
    folder = shipped_model(known)
    return str(folder) if folder is not None else known


def _local_layout(folder: Path) -> tuple[Path, Path]:
    """(unet folder, scheduler folder) of a save_pretrained or DDPMPipeline folder."""
    unet_dir = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    if not (unet_dir / "config.json").is_file():
        raise UserError(f"{folder} holds no diffusers U-Net (no config.json, nor unet/config.json); "
                        f"pass a folder written by UNet2DModel.save_pretrained or DDPMPipeline.save_pretrained")
    for candidate in (unet_dir, folder, folder / "scheduler"):
        if (candidate / "scheduler_config.json").is_file():
            return unet_dir, candidate
    raise UserError(f"{folder} has a U-Net but no scheduler_config.json (beside it or in scheduler/); "
                    f"write one with DDPMScheduler(...).save_pretrained('{folder}')")


def _from_hub(repo_id: str) -> tuple[UNet2DModel, DDPMScheduler]:
    """A hub repository, flat (config.json at the top, like google/ddpm-cifar10-32) or in pipeline layout."""
    errors, offline = [], hub_offline()
    for unet_sub, sched_sub in ((None, None), ("unet", "scheduler")):
        try:
            with warnings.catch_warnings():  # diffusers passes hub arguments that huggingface_hub deprecates
                warnings.simplefilter("ignore", UserWarning)
                unet = UNet2DModel.from_pretrained(repo_id, subfolder=unet_sub, local_files_only=offline is not None)
                scheduler = DDPMScheduler.from_pretrained(repo_id, subfolder=sched_sub,
                                                          local_files_only=offline is not None)
            return unet, scheduler
        except (OSError, ValueError) as err:  # diffusers raises EnvironmentError (= OSError) for missing files
            errors.append(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
    why = offline or f"downloading it failed: {errors[-1]}"
    raise UserError(f"cannot load U-Net {short(repo_id)}: it is not a local folder nor in the Hugging Face cache, and "
                    f"{why}; download it once with network access or pass a local model folder")


def load_unet(id_or_path: str, device: str | torch.device = "cpu") -> tuple[UNet2DModel, DDPMScheduler]:
    """The U-Net (eval mode, on ``device``) and the DDPM noise schedule from its scheduler config."""
    path = Path(id_or_path).expanduser()
    if path.is_dir():
        unet_dir, sched_dir = _local_layout(path)
        try:
            unet = UNet2DModel.from_pretrained(unet_dir)
            scheduler = DDPMScheduler.from_pretrained(sched_dir)
        except (OSError, ValueError, TypeError) as err:
            raise UserError(f"cannot load the diffusers U-Net in {path}: {str(err).strip().splitlines()[0]}") from None
    elif path.exists() or id_or_path.startswith((".", "/", "~")) or id_or_path.count("/") != 1:
        raise UserError(f"--unet {short(id_or_path)} is neither a model folder nor a hub id like "
                        f"google/ddpm-cifar10-32")
    else:
        unet, scheduler = _from_hub(id_or_path)
    _check_finite(unet, id_or_path)
    return unet.to(device).eval(), scheduler


def _check_finite(unet: UNet2DModel, where: str) -> None:
    """Refuse weights holding NaN or infinity: they sample black images that every later check would pass."""
    for name, tensor in unet.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"the U-Net {where} holds NaN or infinite values in {name[:80]} (a diverged run or an "
                            f"altered file); use another model")


def unet_config(id_or_path: str) -> dict | None:
    """The U-Net's config without loading weights: from a local folder, or from the local hub cache
    (None when a hub model is not cached: then only loading it can tell)."""
    path = Path(id_or_path).expanduser()
    if path.is_dir():
        return dict(UNet2DModel.load_config(_local_layout(path)[0]))
    for subfolder in (None, "unet"):
        try:
            return dict(UNet2DModel.load_config(id_or_path, subfolder=subfolder, local_files_only=True))
        except (OSError, ValueError):
            continue
    return None


def check_compatible(config: dict, image_size: int, channels: int = 3) -> None:
    """Refuse a U-Net (its ``config``) whose image size or channel count does not match the dataset's."""
    name = config.get("_name_or_path") or "the U-Net"
    if config["in_channels"] != channels or config["out_channels"] != channels:
        raise UserError(f"{name} maps {config['in_channels']} to {config['out_channels']} channels but the dataset's "
                        f"images have {channels}; use a model trained on {channels}-channel images")
    size = config["sample_size"]
    size = size if isinstance(size, int) else size[0] if len(set(size)) == 1 else tuple(size)
    if size != image_size:
        fix = f"pass --image-size {size}" if isinstance(size, int) else "use a model for square images"
        raise UserError(f"{name} was trained on {size}x{size} images but the dataset's are "
                        f"{image_size}x{image_size}; {fix} (or train a model with clsp ddpm train)")


def sample_images(unet: UNet2DModel, scheduler: DDPMScheduler, num_images: int, *, steps: int = 50,
                  eta: float = 0.0, seed: int = 0, batch_size: int = 256, precision: str = "fp32") -> np.ndarray:
    """Plain DDIM samples as uint8 ``[n, H, W, C]``: for sample grids, FID and quality checks.

    The sampler's own DDIM loop at w = 1 (the anchor is ignored, so its input is a blank image): one
    timestep rule and one update for plain and interpolated sampling. A class-conditional model draws the
    classes in turn (image i of class i mod C) with the authors' guidance."""
    from clsp.generate.conditional import AUTHORS_GUIDANCE, num_classes
    from clsp.generate.sampler import sample_positives

    size = unet.config.sample_size
    shape = (unet.config.in_channels, *((size, size) if isinstance(size, int) else size))
    generator = torch.Generator(device=unet.device).manual_seed(seed)  # on the model's device: no host draws
    out = []
    for start in range(0, num_images, batch_size):
        blank = torch.zeros((min(batch_size, num_images - start), *shape))
        classes = num_classes(unet)
        labels = torch.arange(start, start + len(blank)) % classes if classes else None
        images = sample_positives(unet, scheduler, blank, 1, w=1.0, steps=steps, eta=eta, generator=generator,
                                  precision=precision, labels=labels, guidance=AUTHORS_GUIDANCE if classes else None)
        out.append(to_uint8(images[:, 0]))
    return np.concatenate(out)


def save_grid(images: np.ndarray, path: str | os.PathLike, nrow: int | None = None, scale: int = 1) -> None:
    """Write uint8 ``[n, H, W, C]`` images as one PNG grid (atomically), upscaled ``scale`` times."""
    from PIL import Image
    from torchvision.utils import make_grid

    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    nrow = nrow or max(1, int(np.ceil(np.sqrt(len(images)))))
    grid = make_grid(tensor, nrow=nrow, padding=1, pad_value=255).permute(1, 2, 0).numpy()
    img = Image.fromarray(grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
