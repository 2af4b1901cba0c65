"""Stage 2: contrastive training with synthetic positives, resumable at any checkpointed step.

One code path for CPU, one GPU and many GPUs or nodes (Accelerate); ``clsp_lambda=0`` is the
baseline through the same code. What a run leaves in ``out``:

- ``checkpoint.pt``: model (with queues, support set and online probe), optimisers, scheduler, RNG states,
  epoch and step, written atomically; a rerun with the same settings resumes from it.
- ``encoder.safetensors`` + ``encoder.json``: the backbone for evaluation and for users' own code.
- ``train_summary.json``, ``loss_curve.png`` and ``tensorboard/`` (each loss term, learning rate,
  nearest-neighbour accuracy, online linear-probe accuracy).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from clsp.config import fields_with_role, identity, required
from clsp.errors import UserError
from clsp.io import check_creatable, load_weights, remove_stale_temporaries, write_json_atomic
from clsp.log import Rate
from clsp.resume import load_checkpoint, save_checkpoint, set_rng_state, weights_digest
from clsp.runtime import apply_tf32, make_accelerator, progress, resolve_precision
from clsp.shards import reader
from clsp.train.augment import DeviceAugment, augment_views, view_augmentations
from clsp.train.backbones import EncoderCard, build_backbone, export_encoder, feature_dim
from clsp.train.collapse import CollapseMonitor
from clsp.train.config import TrainJob
from clsp.train.data import ContrastiveStream, make_loader, open_shards, step_seed
from clsp.train.methods import Method, build_method
from clsp.train.optim import build_optimizer, warmup_cosine
from clsp.train.recipes import normalisation, probe_lr
from clsp.train.schedules import clsp_lambda_at
from clsp.train.summary import plot_losses, summary_line

CHECKPOINT = "checkpoint.pt"
SUMMARY = "train_summary.json"
CURVE = "loss_curve.png"


def resolve_augment(augment: str, device: torch.device) -> str:
    """``auto``: the batched augmentation on a CUDA device, else the per-image one in the DataLoader workers."""
    return ("device" if device.type == "cuda" else "cpu") if augment == "auto" else augment


def run_settings(job: TrainJob, device: torch.device) -> dict[str, Any]:
    """The settings a run's result records and a resumed run must match: those that shape it
    (``clsp.config.identity``), with precision and augmentation as this machine resolves their ``auto``."""
    return {**identity(job), "precision": resolve_precision(job.precision, device),
            "augment": resolve_augment(job.augment, device)}


class Trainer:
    """Builds everything a run needs from a ``TrainJob`` and runs it (``Trainer(job).fit()``)."""

    def __init__(self, job: TrainJob, start_over: bool = False) -> None:
        self.start_over = start_over  # a checkpoint of other settings in ``out`` is passed over (clsp run's own dirs)
        self.accelerator = make_accelerator(job.precision)
        apply_tf32(job.tf32)
        self.world_size = self.accelerator.num_processes
        self.out = Path(job.out)
        for directory in (job.out, job.decoded_cache_dir):
            if directory is not None:
                check_creatable(directory)  # refused before anything is written, not at the first cache write
        self.device = self.accelerator.device
        self.rank = self.accelerator.process_index
        # the data's identity first: shards of other data are refused before they are verified
        manifest = reader.read_manifest(job.shards)
        self.dataset = reader.load_dataset(manifest, job.data_root)
        self.config = job = job.resolved(self.dataset.name)
        clsp_lambda = required(job.clsp_lambda, "clsp_lambda")  # the recipe's where the run leaves it unset
        # the recipe's statistics (NNCLR's CIFAR-10 std is not the authors'): used by the augmentation and
        # recorded in the encoder card, so evaluation normalises as training did
        self.dataset.mean, self.dataset.std = normalisation(job.method, self.dataset.name,
                                                            (self.dataset.mean, self.dataset.std))
        if job.batch_size % self.world_size or job.batch_size < 2 * self.world_size:  # a contrastive loss needs two
            raise UserError(f"--batch-size {job.batch_size} is the global batch and does not split over "
                            f"{self.world_size} processes with at least 2 samples each; use a multiple of "
                            f"{self.world_size}, at least {2 * self.world_size}")
        self.batch_size = job.batch_size // self.world_size
        self.shards = open_shards(job.shards, allow_partial=job.allow_partial)
        if job.validation:  # the validation images stay unseen: their anchors are skipped
            from dataclasses import replace

            from clsp.datasets import validation_indices

            held = validation_indices(self.dataset, job.validation)[1]
            self.shards = replace(self.shards, held_out=frozenset(held.tolist()))
        self.image_size = self.dataset.image_size
        self.augment = resolve_augment(job.augment, self.device)
        views = view_augmentations(job.method, job.model_dump())
        choice_params: dict[str, dict[str, Any]] = {"top-m": {"m": job.positive_top_m},
                                                    "score-weighted": {"tau": job.positive_tau}}
        self.stream = ContrastiveStream(
            self.shards, self.dataset, batch_size=self.batch_size, seed=job.seed, rank=self.rank,
            world_size=self.world_size, num_workers=job.workers, positives=clsp_lambda > 0,
            views=views if self.augment == "cpu" else None, choice=job.positive_choice,
            choice_params=choice_params.get(job.positive_choice, {}),
            cache_dir=job.decoded_cache_dir, source=job.positive_source)
        if job.positive_source != "synthetic" and job.positive_choice != "uniform":
            raise UserError(f"--positive-choice {job.positive_choice} chooses among the shards' candidates, which "
                            f"--positive-source {job.positive_source} does not use; leave --positive-choice uniform")
        if job.positive_choice != "uniform" and clsp_lambda > 0 and not manifest.generation.get("scores"):
            raise UserError(f"--positive-choice {job.positive_choice} needs the candidates' scores, which the shards "
                            f"in {job.shards} do not hold; generate them with clsp-gen --scores (the default)")
        self.labelled = self.dataset.has_labels and bool((self.stream.labels >= 0).all())

        torch.manual_seed(job.seed)
        self.stem = job.stem or ("small" if self.image_size <= 64 else "imagenet")
        backbone = build_backbone(job.backbone, self.stem)
        method = build_method(job, backbone, self.dataset.num_classes if self.labelled else 0)
        if job.sync_bn and self.world_size > 1:
            method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
        if job.compile:
            method.backbone.compile()
        groups = method.parameter_groups(required(job.weight_decay, "weight_decay"),
                                         required(job.weight_decay_scope, "weight_decay_scope"))
        optimizer = build_optimizer(required(job.optimizer, "optimizer"), groups, required(job.lr, "lr"))
        self.steps_per_epoch = self.stream.steps
        self.total_steps = self.steps_per_epoch * job.epochs
        self.lambda_ramp_steps = round(job.clsp_lambda_ramp_epochs * self.steps_per_epoch)
        self.scheduler = warmup_cosine(optimizer, unit=required(job.schedule_unit, "schedule_unit"),
                                       warmup_epochs=required(job.warmup_epochs, "warmup_epochs"),
                                       epochs=job.epochs, steps_per_epoch=self.steps_per_epoch,
                                       start_lr=required(job.warmup_start_lr, "warmup_start_lr"))
        probe_optimizer = method.probe_optimizer()  # the method's online probe (None on unlabelled data)
        self.model, self.optimizer, *probe = self.accelerator.prepare(
            method, optimizer, *([probe_optimizer] if probe_optimizer is not None else []))
        self.probe_optimizer = probe[0] if probe else None
        self.device_augment = None if self.augment == "cpu" else DeviceAugment(
            self.image_size, self.dataset.mean, self.dataset.std, views).to(self.device)
        self.epoch, self.step_in_epoch, self.elapsed = 0, 0, 0.0
        self.history: list[list[float]] = []  # per step: global step, loss, loss_base, loss_clsp (rank 0)
        self.epoch_metrics: dict[str, float] = {}
        self.per_epoch: list[dict[str, float]] = []  # every epoch's metrics, for the summary (nn_acc over training)
        self.metrics = type(method).logged_metrics()
        self.collapse = CollapseMonitor(required(job.proj_output_dim, "proj_output_dim"),
                                        type(method).loss_at_collapse(required(job.batch_size, "batch_size")))

    # ---- state -------------------------------------------------------------------------------------
    @property
    def method(self) -> Method:
        return self.accelerator.unwrap_model(self.model)

    @property
    def global_step(self) -> int:
        return self.epoch * self.steps_per_epoch + self.step_in_epoch

    def _settings(self) -> dict:
        """The resolved settings a resumed run must match (``run_settings``), and the process count, which
        splits the epoch."""
        return {**run_settings(self.config, self.device), "world_size": self.world_size}

    def save(self) -> None:
        """Checkpoint (main process; every rank waits for it)."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            save_checkpoint(self.out / CHECKPOINT, {
                "model": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                **({"probe_optimizer": self.probe_optimizer.state_dict()} if self.probe_optimizer else {}),
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch, "elapsed": self.elapsed,
                "history": torch.tensor(self.history, dtype=torch.float64).reshape(-1, 4),
                "epoch_metrics": self.epoch_metrics, "per_epoch": self.per_epoch,
                "collapse_z_std": self.collapse.z_std}, self._settings())
        self.accelerator.wait_for_everyone()

    def maybe_resume(self) -> bool:
        """Load ``out/checkpoint.pt`` when there is one; refuse one written with other settings."""
        state = load_checkpoint(self.out / CHECKPOINT, self._settings(), self.start_over)
        if state is None:
            return False
        fix = "delete it to start the run over, or pass another --out"
        load_weights(self.method, state["model"], self.out / CHECKPOINT, fix)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.probe_optimizer is not None:
            self.probe_optimizer.load_state_dict(state["probe_optimizer"])
        set_rng_state(state["rng"])
        self.epoch, self.step_in_epoch, self.elapsed = state["epoch"], state["step_in_epoch"], state["elapsed"]
        self.history = state["history"].tolist()
        self.epoch_metrics = state["epoch_metrics"]
        self.per_epoch = list(state["per_epoch"])
        self.collapse.z_std = list(state["collapse_z_std"])
        return True

    # ---- one step ------------------------------------------------------------------------------------
    def _views(self, batch: dict, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if self.device_augment is None:
            x3 = batch.get("x3")
            return (batch["x1"].to(self.device, non_blocking=True), batch["x2"].to(self.device, non_blocking=True),
                    None if x3 is None else x3.to(self.device, non_blocking=True))
        cuda = self.device.type == "cuda"
        with torch.random.fork_rng(devices=[self.device.index or 0] if cuda else [], device_type=self.device.type):
            torch.manual_seed(step_seed(self.config.seed, self.epoch, self.rank, step))
            positive = batch.get("positive")
            return augment_views(self.device_augment, batch["anchor"].to(self.device, non_blocking=True),
                                 None if positive is None else positive.to(self.device, non_blocking=True))

    def _train_step(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        x1, x2, x3 = self._views(batch, step)
        labels = batch["label"].to(self.device, non_blocking=True) if self.labelled else None
        self.model.train()
        self.method.clsp_lambda = clsp_lambda_at(self.global_step, self.total_steps,
                                                 required(self.config.clsp_lambda, "clsp_lambda"),
                                                 self.lambda_ramp_steps)
        out = self.model(x1, x2, x3, labels)
        optimizers = [self.optimizer] + ([self.probe_optimizer] if self.probe_optimizer is not None else [])
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        # the probe's loss reaches only the probe (its features are detached): one backward for both
        self.accelerator.backward(out["loss"] + out["loss_probe"] if "loss_probe" in out else out["loss"])
        self.optimizer.step()
        self.scheduler.step()
        self.method.on_train_step_end((self.global_step + 1) / self.total_steps)
        if self.probe_optimizer is not None:
            self.probe_optimizer.step()
        return {k: out[k].detach().float() for k in self.metrics if k in out}

    # ---- the run ----------------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train (resuming when a checkpoint exists), export the encoder, write the summary."""
        config, acc = self.config, self.accelerator
        if acc.is_main_process:  # temporaries of a killed run: removed once their writer is gone
            remove_stale_temporaries(self.out, CHECKPOINT)
        resumed = self.maybe_resume()
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.global_step if resumed else 0)
        started = time.perf_counter()
        elapsed0 = self.elapsed
        while self.epoch < config.epochs:
            self._run_epoch(started, elapsed0)
        return self._finish()

    def _run_epoch(self, started: float, elapsed0: float) -> None:
        config, acc = self.config, self.accelerator
        self.stream.set_epoch(self.epoch, self.step_in_epoch)
        loader = make_loader(self.stream, pin_memory=self.device.type == "cuda")
        sums: dict[str, torch.Tensor] = {}
        counted = 0
        pending: list[tuple[int, dict[str, torch.Tensor]]] = []
        rate = Rate(self.steps_per_epoch * (config.epochs - self.epoch), self.step_in_epoch)
        bar = progress(total=self.steps_per_epoch, desc=f"epoch {self.epoch + 1}/{config.epochs}",
                       main_process=acc.is_main_process, unit="step")
        bar.update(self.step_in_epoch)
        for batch in loader:
            metrics = self._train_step(batch, self.step_in_epoch)
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0) + value
            counted += 1
            pending.append((self.global_step, metrics))
            self.step_in_epoch += 1
            bar.update(1)
            if len(pending) >= config.log_every:
                self._log_steps(pending, bar)
            if config.checkpoint_steps and self.step_in_epoch % config.checkpoint_steps == 0 \
                    and self.step_in_epoch < self.steps_per_epoch:
                self._log_steps(pending, bar)
                self.elapsed = elapsed0 + time.perf_counter() - started
                self.save()
        bar.close()
        self._log_steps(pending, bar)
        if sums:  # the epoch's mean of each metric over steps and ranks
            keys = [k for k in self.metrics if k in sums]
            means = acc.reduce(torch.stack([sums[k] for k in keys]) / counted, reduction="mean").tolist()
            self.epoch_metrics = dict(zip(keys, means))
            self.per_epoch.append(self.epoch_metrics)
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        if acc.is_main_process:
            for key, mean in self.epoch_metrics.items():
                self.writer.add_scalar(f"epoch/{key}", mean, self.epoch)
            self._log_epoch(rate.describe(self.steps_per_epoch, "img", scale=required(config.batch_size, "batch_size")))
        if sums:
            self._check_collapse()
        if self.epoch % config.checkpoint_every == 0 or self.epoch == config.epochs:
            self.elapsed = elapsed0 + time.perf_counter() - started
            self.save()

    def _log_epoch(self, speed: str) -> None:
        """One line per epoch for logs without a progress bar (a batch job's output file)."""
        terms = ", ".join(f"{key} {value:.4f}" for key, value in self.epoch_metrics.items() if key.startswith("loss"))
        logging.getLogger(__name__).info(f"epoch {self.epoch}/{self.config.epochs}: {terms or 'no steps'}, "
                                         f"lr {self.scheduler.get_last_lr()[0]:.4g}, {speed}")

    def _check_collapse(self) -> None:
        """Record the epoch's z_std; warn in one line when the epoch sat at collapse (or stop, if asked to)."""
        z_std = self.epoch_metrics["z_std"]
        if not self.collapse.observe(z_std):
            return
        line = self.collapse.warning(str(self.out), self.epoch, z_std, self.epoch_metrics.get("loss_base"))
        if self.config.stop_on_collapse:
            raise UserError(f"{line}; stopped (--stop-on-collapse), no encoder written: ramp lambda in "
                            "(--clsp-lambda-ramp-epochs), lower --clsp-lambda or --lr, and train into a new --out")
        if self.accelerator.is_main_process:
            logging.getLogger(__name__).warning(line)

    def _log_steps(self, pending: list, bar) -> None:
        """Write the buffered steps' scalars (one device sync per ``log_every`` steps)."""
        if not pending:
            return
        lr = self.scheduler.get_last_lr()[0]
        names = [(step, key) for step, metrics in pending for key in metrics]
        values = torch.stack([value for _, metrics in pending for value in metrics.values()]).tolist()
        for (step, key), value in zip(names, values):
            if key.startswith("loss") and not np.isfinite(value):
                raise UserError(f"the {key.replace('_', ' ')} became {value} at step {step} of {self.out}: the "
                                f"learning rate ({self.config.lr:g}) or lambda ({self.config.clsp_lambda:g}) is "
                                "likely too high; lower --lr or --clsp-lambda and train into a new --out")
        if self.accelerator.is_main_process:
            rows: dict[int, dict[str, float]] = {}
            for (step, key), value in zip(names, values):
                rows.setdefault(step, {})[key] = value
                self.writer.add_scalar(f"train/{key}", value, step)
            for step, row in rows.items():
                self.history.append([step, row["loss"], row["loss_base"], row["loss_clsp"]])
            self.writer.add_scalar("train/lr", lr, pending[-1][0])
            bar.set_postfix(loss=f"{rows[pending[-1][0]]['loss']:.3f}", lr=f"{lr:.3g}")
        pending.clear()

    def _finish(self) -> dict:
        config, acc = self.config, self.accelerator
        backbone = self.method.backbone
        if not all(torch.isfinite(p).all() for p in backbone.parameters()):
            raise UserError(f"the weights of {self.out} are not finite after training; lower --lr or --clsp-lambda "
                            "and train again into a new --out (no encoder was written)")
        from accelerate.utils import gather_object

        checksums = gather_object([weights_digest(backbone)])
        settings = run_settings(config, self.device)
        summary = {
            "method": config.method, "clsp_lambda": config.clsp_lambda, "backbone": config.backbone,
            "dataset": self.shards.store.manifest.dataset.model_dump(), "epochs": config.epochs,
            "steps": self.global_step,
            "batch_size": config.batch_size, "world_size": self.world_size, "anchors": self.shards.num_anchors,
            "anchors_per_epoch": self.steps_per_epoch * required(config.batch_size, "batch_size"),
            "precision": settings["precision"],
            "settings": {**config.model_dump(exclude=fields_with_role(config, "location")), **settings},
            "time_s": round(self.elapsed, 2), "final": self.epoch_metrics, "per_epoch": self.per_epoch,
            "rank_checksums": checksums,
            "ranks_in_sync": len(set(checksums)) == 1, "collapse": self.collapse.record(),
        }
        if acc.is_main_process:
            card = EncoderCard(backbone=config.backbone, stem=self.stem, feature_dim=feature_dim(backbone),
                               method=config.method, clsp_lambda=config.clsp_lambda,
                               dataset=self.shards.store.manifest.dataset.model_dump(), image_size=self.image_size,
                               mean=list(self.dataset.mean), std=list(self.dataset.std),
                               probe_lr=probe_lr(config.method, self.dataset.name,
                                                 required(config.clsp_lambda, "clsp_lambda")),
                               settings=settings)
            export_encoder(backbone, self.out, card)
            write_json_atomic(self.out / SUMMARY, summary)
            plot_losses(self.history, self.out / CURVE, self.steps_per_epoch)
            self.writer.close()
            print(summary_line(summary, self.out), flush=True)
        acc.wait_for_everyone()
        return summary


def train(job: TrainJob, start_over: bool = False) -> dict:
    """Run (or resume) one training run and return its summary; ``start_over``: see ``load_checkpoint``."""
    return Trainer(job, start_over).fit()
