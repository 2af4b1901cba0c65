"""Train an epsilon-prediction DDPM where no pretrained model exists: unconditional, or class-conditional for
classifier-free guidance (``--conditional``: labels shifted by one, the whole batch dropped to the null class
with probability ``label_dropout``; ``clsp.generate.conditional``).

Standard DDPM training (Ho et al. 2020): diffusers ``UNet2DModel`` + ``DDPMScheduler`` (linear betas
1e-4..0.02 over 1000 steps), MSE on the noise, AdamW with linear warm-up then a constant rate,
gradient clipping and an EMA of the weights, which is what gets saved. Accelerate runs the same code
on a CPU, one GPU or many GPUs and nodes (``accelerate launch``); ``--batch-size`` is the global batch.

Every random draw of a step (which images, flips, timesteps, noise) comes from a generator keyed by
(seed, step, rank), so a run resumed from a checkpoint continues exactly where the killed one was.

Output folder (a ``DDPMPipeline`` folder, readable by ``load_unet`` and ``DDPMPipeline.from_pretrained``)::

    model_index.json  unet/  scheduler/    the EMA model and its noise schedule
    checkpoint.pt                          model, EMA, optimizer, step, RNG states (written atomically)
    samples.png  samples/step-*.png        sample grids drawn with the EMA weights
    training.json                          command, settings, steps, wall time, world size, loss
    tensorboard/                           loss and learning rate
"""

from __future__ import annotations

import logging
import shlex
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import gather_object
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel

from clsp.config import identity, required
from clsp.datasets import get_dataset
from clsp.errors import UserError
from clsp.generate.conditional import drop_labels, embedding_index
from clsp.generate.config import DDPMJob
from clsp.generate.ddpm_presets import build_unet, get_preset, preset_for_dataset
from clsp.generate.unet import load_unet, sample_images, save_grid
from clsp.images import to_float
from clsp.io import load_weights, write_json_atomic
from clsp.log import Rate
from clsp.resume import load_checkpoint, save_checkpoint, set_rng_state, weights_digest
from clsp.runtime import apply_tf32, make_accelerator, progress, resolve_precision

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
GRID_IMAGES = 64


def make_ddpm_scheduler() -> DDPMScheduler:
    """The DDPM linear schedule of the method: betas 1e-4 .. 0.02 over 1000 steps."""
    return DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def resolve_ddpm(job: DDPMJob) -> DDPMJob:
    """A copy with the preset's defaults filled in (and the preset named, not ``auto``)."""
    preset = preset_for_dataset(job.name) if job.preset == "auto" else get_preset(job.preset)
    values = job.model_dump()
    values["preset"] = preset.name
    for name in (f.name for f in fields(preset)):  # the preset's training defaults, by the job's names
        if values.get(name, "") is None:
            values[name] = getattr(preset, name)
    return DDPMJob.model_validate(values)


def resume_settings(job: DDPMJob) -> dict:
    """What a resumed run must match: the settings that shape the result, less ``steps`` (the learning
    rate does not depend on it, so a finished run may be resumed to train longer)."""
    return {key: value for key, value in identity(job).items() if key != "steps"}


def _labels(dataset) -> torch.Tensor:
    """Every training image's class, refused in one line where the dataset has none."""
    labels = dataset.labels() if dataset.has_labels else np.full(len(dataset), -1)
    if len(labels) == 0 or (labels < 0).any():
        raise UserError(f"--conditional needs a class label for every training image, and {dataset.name} "
                        f"({dataset.split}) has none; train without --conditional or on a labelled dataset")
    return torch.from_numpy(np.asarray(labels, dtype=np.int64))


def _images(dataset) -> torch.Tensor:
    """All training images as uint8 ``[N, H, W, C]`` (digits and CIFAR fit in memory many times over)."""
    return torch.from_numpy(dataset.array(np.arange(len(dataset))))


def _step_generator(*key: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


def _batch(images: torch.Tensor, cfg: DDPMJob, step: int, rank: int, world: int, num_timesteps: int,
           labels: torch.Tensor | None = None):
    """This rank's share of the global batch of ``step``: clean images in [-1, 1], timesteps, noise, and for a
    conditional run the class-embedding indices (None otherwise), dropped to the null class for the whole
    global batch at once."""
    n = len(images)
    order = torch.randperm(n, generator=_step_generator(cfg.seed, step))
    batch = torch.arange(required(cfg.batch_size, "batch_size"))
    chosen = order[batch % n][rank::world]  # wraps around when the batch exceeds the data
    x = to_float(images[chosen], signed=True)
    g = _step_generator(cfg.seed, step, rank + 1)
    if cfg.flip:
        flip = torch.rand(len(x), generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    t = torch.randint(0, num_timesteps, (len(x),), generator=g)
    noise = torch.randn(x.shape, generator=g)
    classes = None
    if labels is not None:  # stream 0 of the step: the same draw on every rank
        classes = drop_labels(embedding_index(labels[chosen]), cfg.label_dropout, _step_generator(cfg.seed, step, 0))
    return x, t, noise, classes


def _initial_weights(unet: UNet2DModel, ref: str) -> None:
    """Load ``ref``'s weights into ``unet``; a class embedding the source lacks starts at zero, so a conditional
    model made from an unconditional one predicts what it did for every label."""
    source = load_unet(ref)[0].state_dict()
    target = unet.state_dict()
    new = [key for key in target if key not in source]
    if unet.class_embedding is not None and new == ["class_embedding.weight"]:
        source["class_embedding.weight"] = torch.zeros_like(target["class_embedding.weight"])
    load_weights(unet, source, Path(ref), "pass --init a model of the same preset and image size")


def _save_model(ema: EMAModel, template: UNet2DModel, scheduler: DDPMScheduler, out: Path) -> None:
    """Write the EMA weights as a DDPMPipeline folder, each file renamed into place when complete."""
    ema_unet = UNet2DModel.from_config(template.config)
    ema.copy_to(ema_unet.parameters())
    staging = out / ".model-staging"
    DDPMPipeline(unet=ema_unet, scheduler=scheduler).save_pretrained(staging, safe_serialization=True)
    for rel in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
                "model_index.json"):  # model_index.json last: its presence marks a complete model
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).replace(out / rel)
    for leftover in sorted(staging.rglob("*"), reverse=True):
        leftover.unlink() if leftover.is_file() else leftover.rmdir()
    staging.rmdir()


def _draw_grid(ema: EMAModel, template: UNet2DModel, scheduler: DDPMScheduler, out: Path, step: int,
               seed: int, device: torch.device) -> None:
    ema_unet = UNet2DModel.from_config(template.config).to(device)
    ema.copy_to(ema_unet.parameters())
    images = sample_images(ema_unet.eval(), scheduler, GRID_IMAGES, steps=50, seed=seed)
    scale = max(1, 128 // images.shape[1])
    save_grid(images, out / "samples" / f"step-{step:07d}.png", nrow=8, scale=scale)
    save_grid(images, out / "samples.png", nrow=8, scale=scale)


def train_ddpm(job: DDPMJob, start_over: bool = False) -> dict:
    """Train (or resume) and return the summary also written to ``training.json``; ``start_over``: see
    ``load_checkpoint``."""
    cfg = resolve_ddpm(job)
    steps, batch_size = required(cfg.steps, "steps"), required(cfg.batch_size, "batch_size")
    peak_lr, warmup_steps = required(cfg.lr, "lr"), required(cfg.warmup_steps, "warmup_steps")
    out = Path(cfg.out)
    precision = resolve_precision(cfg.precision)
    accelerator = make_accelerator(precision)
    apply_tf32(job.tf32)
    rank, world = accelerator.process_index, accelerator.num_processes
    if cfg.batch_size % world:
        raise UserError(f"--batch-size {cfg.batch_size} does not split over {world} processes; "
                        f"use a multiple of {world}")
    dataset = get_dataset(cfg.name, split=cfg.split, root=cfg.data_root, image_size=cfg.image_size)
    labels = _labels(dataset) if cfg.conditional else None
    classes = int(dataset.num_classes or labels.max() + 1) if labels is not None else 0
    image_size = dataset.image_size
    cfg = cfg.replace(image_size=image_size)
    settings = resume_settings(cfg)
    preset = get_preset(cfg.preset)
    torch.manual_seed(cfg.seed)
    unet = build_unet(preset, image_size, classes)
    if cfg.init:
        _initial_weights(unet, cfg.init)
    scheduler = make_ddpm_scheduler()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=peak_lr, weight_decay=0.0)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay)

    step, elapsed, resumed_from = 0, 0.0, None
    ckpt_path = out / CHECKPOINT
    state = load_checkpoint(ckpt_path, settings, start_over)
    if state is not None:
        load_weights(unet, state["model"], ckpt_path, "delete it to start the run over, or pass another --out")
        optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        step, elapsed, resumed_from = int(state["step"]), float(state["elapsed_s"]), int(state["step"])
        set_rng_state(state["rng"])
        log.info(f"resumed from {ckpt_path} at step {step}")

    model, optimizer = accelerator.prepare(unet, optimizer)
    ema.to(accelerator.device)
    images = _images(dataset)

    writer = None
    if accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        out.mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(str(out / "tensorboard"), purge_step=step)  # drops what a lost or replaced run logged
    params = sum(p.numel() for p in unet.parameters())
    kind = f"{classes}-class conditional " if classes else ""
    log.info(f"training {preset.name} {kind}U-Net ({params / 1e6:.2f}M params) on {cfg.name} "
             f"({len(dataset)} images, {image_size}x{image_size}) for {cfg.steps} steps, global batch "
             f"{cfg.batch_size}, {world} process(es), {precision}; from step {step}")

    def checkpoint() -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_checkpoint(ckpt_path, {
                "model": accelerator.unwrap_model(model).state_dict(), "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(), "step": step, "elapsed_s": elapsed + time.time() - started,
            }, settings)
        accelerator.wait_for_everyone()

    started = time.time()
    rate = Rate(steps, step)
    recent: list[float] = []
    model.train()
    bar = progress(total=cfg.steps, desc="ddpm train", main_process=accelerator.is_main_process, unit="step")
    bar.update(step)
    while step < steps:
        lr = peak_lr * min(1.0, (step + 1) / max(1, warmup_steps))  # linear warm-up, then constant
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, t, noise, y = _batch(images, cfg, step, rank, world, scheduler.config.num_train_timesteps, labels)
        x, t, noise = x.to(accelerator.device), t.to(accelerator.device), noise.to(accelerator.device)
        noisy = scheduler.add_noise(x, noise, t)
        with accelerator.autocast():
            pred = model(noisy, t, class_labels=None if y is None else y.to(accelerator.device)).sample
        loss = F.mse_loss(pred.float(), noise)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(accelerator.unwrap_model(model).parameters())
        step += 1
        bar.update(1)
        value = accelerator.reduce(loss.detach(), reduction="mean").item()
        recent = (recent + [value])[-100:]
        if writer is not None and step % cfg.log_every == 0:
            writer.add_scalar("train/loss", value, step)
            writer.add_scalar("train/lr", lr, step)
            bar.set_postfix(loss=f"{np.mean(recent):.4f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            checkpoint()
            log.info(f"step {step}/{cfg.steps}: loss {np.mean(recent):.4f} (mean of last {len(recent)}), lr {lr:.3g}, "
                     f"{rate.describe(step, 'img', scale=batch_size)}; checkpoint saved")
        if accelerator.is_main_process and (step % cfg.sample_every == 0 or step == cfg.steps):
            _draw_grid(ema, unet, scheduler, out, step, cfg.seed, accelerator.device)
    bar.close()
    if not recent:  # nothing left to train: the run was already complete
        log.info(f"{out} is already trained to step {step}; pass a larger --steps to train longer")

    summary = {
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "config": cfg.model_dump(), "preset": preset.name, "unet_config": dict(unet.config), "parameters": params,
        "conditional": bool(classes), "num_classes": classes,
        "dataset": dataset.describe(), "steps": step, "world_size": world, "precision": precision,
        "device": str(accelerator.device), "wall_time_s": round(elapsed + time.time() - started, 1),
        "resumed_from_step": resumed_from, "final_loss": float(np.mean(recent)) if recent else None,
        "weights_sha256_by_rank": gather_object([weights_digest(accelerator.unwrap_model(model))]),
    }
    if accelerator.is_main_process:
        _save_model(ema, unet, scheduler, out)
        write_json_atomic(out / "training.json", summary)
        if writer is not None:  # made on the main process
            writer.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary
