"""Stage 2: contrastive training with synthetic positives, resumable at any checkpointed step.

One code path for CPU, one GPU and many GPUs or nodes (Accelerate); ``clsp_weight=0`` is the
baseline through the same code. What a run leaves in ``out``:

- ``checkpoint.pt``: model (with queues and support set), optimisers, scheduler, probe, RNG states,
  epoch and step, written atomically; a rerun with the same settings resumes from it.
- ``encoder.safetensors`` + ``encoder.json``: the backbone for evaluation and for users' own code.
- ``train_summary.json``, ``loss_curve.png`` and ``tensorboard/`` (each loss term, learning rate,
  nearest-neighbour accuracy, online linear-probe accuracy).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clsp.datasets import DEFAULT_DATA_ROOT
from clsp.errors import UserError
from clsp.io import load_torch, save_torch_atomic, write_json_atomic
from clsp.runtime import make_accelerator, progress, resolve_precision
from clsp.shards import reader
from clsp.train.augment import CROP_MIN_SCALE, FLIP, DeviceAugment, crop_scale
from clsp.train.backbones import build_backbone, export_encoder
from clsp.train.data import DEFAULT_MIX_ANCHORS, ContrastiveStream, make_loader, open_shards, step_seed
from clsp.train.methods import DEFAULT_CLSP_WEIGHT, build_method
from clsp.train.optim import build_optimizer, warmup_cosine

# METHOD.md section 3 (SimCLR and MoCo: the authors' CIFAR settings; NNCLR: solo-learn's).
METHOD_DEFAULTS = {
    "simclr": {"batch_size": 1024, "lr": 0.5, "optimizer": "sgd", "weight_decay": 1e-4},
    "moco": {"batch_size": 512, "lr": 0.3, "optimizer": "sgd", "weight_decay": 1e-4},
    "nnclr": {"batch_size": 256, "lr": 0.4, "optimizer": "lars", "weight_decay": 1e-5},
}
PROBE_LR = 0.1
CHECKPOINT = "checkpoint.pt"
SUMMARY = "train_summary.json"
CURVE = "loss_curve.png"
METRICS = ("loss", "loss_base", "loss_clsp", "nn_acc", "probe_acc")
# Settings a checkpoint must share with the rerun that resumes it.
RESUME_KEYS = ("method", "clsp_weight", "backbone", "batch_size", "lr", "optimizer", "weight_decay", "epochs",
               "warmup_epochs", "seed", "augment", "workers", "world_size", "temperature", "proj_hidden_dim",
               "proj_output_dim", "pred_hidden_dim", "queue_size", "momentum", "mix_anchors", "crop_min_scale",
               "flip")


@dataclass
class TrainConfig:
    """Every setting of a run; None means the method's default from ``METHOD_DEFAULTS`` / METHOD.md."""

    shards: str
    out: str
    method: str = "nnclr"
    clsp_weight: float | None = None
    epochs: int = 1000
    batch_size: int | None = None
    lr: float | None = None
    optimizer: str | None = None
    weight_decay: float | None = None
    warmup_epochs: float = 10.0
    backbone: str = "resnet18"
    data_root: str = DEFAULT_DATA_ROOT
    augment: str | None = None  # None: "device" on CUDA, "cpu" (in the DataLoader workers) otherwise
    crop_min_scale: float = CROP_MIN_SCALE
    flip: bool = FLIP
    workers: int = 4
    precision: str = "auto"
    sync_bn: bool = False
    compile: bool = False
    checkpoint_every: int = 10
    checkpoint_steps: int = 0
    seed: int = 0
    allow_partial: bool = False
    temperature: float = 0.2
    proj_hidden_dim: int | None = None
    proj_output_dim: int | None = None
    pred_hidden_dim: int | None = None
    queue_size: int | None = None
    momentum: float = 0.99
    nn_index: str = "flat"
    mix_anchors: int = DEFAULT_MIX_ANCHORS
    log_every: int = 10
    world_size: int = field(default=1, init=False)

    def resolved(self) -> TrainConfig:
        """A copy with the method's defaults filled in and the settings checked."""
        if self.method not in METHOD_DEFAULTS:
            raise UserError(f"unknown method {self.method!r}; choose one of: {', '.join(METHOD_DEFAULTS)}")
        values = asdict(self)
        for key, default in METHOD_DEFAULTS[self.method].items():
            if values[key] is None:
                values[key] = default
        if values["augment"] is None:
            values["augment"] = "device" if torch.cuda.is_available() else "cpu"
        if values["clsp_weight"] is None:
            values["clsp_weight"] = DEFAULT_CLSP_WEIGHT[self.method]
        world = values.pop("world_size")
        for key in ("epochs", "batch_size", "checkpoint_every", "mix_anchors", "log_every"):
            if values[key] < 1:
                raise UserError(f"--{key.replace('_', '-')} must be at least 1, got {values[key]}")
        for key in ("workers", "checkpoint_steps"):
            if values[key] < 0:
                raise UserError(f"--{key.replace('_', '-')} must be 0 or more, got {values[key]}")
        crop_scale(values["crop_min_scale"])  # checked here, before any data is read
        if values["lr"] <= 0 or values["weight_decay"] < 0 or values["warmup_epochs"] < 0:
            raise UserError("--lr must be positive, --weight-decay and --warmup-epochs 0 or more")
        config = TrainConfig(**values)
        config.world_size = world
        return config


class Trainer:
    """Builds everything a run needs from a ``TrainConfig`` and runs it (``Trainer(config).fit()``)."""

    def __init__(self, config: TrainConfig) -> None:
        self.accelerator = make_accelerator(config.precision)
        self.config = config = config.resolved()
        config.world_size = self.accelerator.num_processes
        self.out = Path(config.out)
        self.device = self.accelerator.device
        self.rank = self.accelerator.process_index
        # the data's identity first: shards of other data are refused before they are verified
        self.dataset = reader.load_dataset(reader.read_manifest(config.shards), config.data_root)
        self.shards = open_shards(config.shards, allow_partial=config.allow_partial)
        self.image_size = self.dataset.image_size
        self.stream = ContrastiveStream(
            self.shards, self.dataset, batch_size=config.batch_size, seed=config.seed, rank=self.rank,
            world_size=config.world_size, num_workers=config.workers, augment=config.augment,
            positives=config.clsp_weight > 0, mix_anchors=config.mix_anchors,
            crop_min_scale=config.crop_min_scale, flip=config.flip)
        self.labelled = self.dataset.has_labels and bool((self.stream.labels >= 0).all())

        torch.manual_seed(config.seed)
        self.small_stem = self.image_size <= 64
        backbone = build_backbone(config.backbone, small_stem=self.small_stem)
        method = build_method(config.method, backbone, clsp_weight=config.clsp_weight,
                              temperature=config.temperature, proj_hidden_dim=config.proj_hidden_dim,
                              proj_output_dim=config.proj_output_dim, pred_hidden_dim=config.pred_hidden_dim,
                              queue_size=config.queue_size, momentum=config.momentum, nn_index=config.nn_index)
        if config.sync_bn and config.world_size > 1:
            method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
        if config.compile:
            method.backbone.compile()
        optimizer = build_optimizer(config.optimizer, method.parameter_groups(config.weight_decay), config.lr)
        self.steps_per_epoch = self.stream.steps
        self.total_steps = self.steps_per_epoch * config.epochs
        warmup = min(self.total_steps, round(config.warmup_epochs * self.steps_per_epoch))
        self.scheduler = warmup_cosine(optimizer, warmup_steps=warmup, total_steps=self.total_steps)
        probe = nn.Linear(backbone.feature_dim, max(1, self.dataset.num_classes))
        probe_optimizer = torch.optim.SGD(probe.parameters(), lr=PROBE_LR, momentum=0.9)
        self.model, self.optimizer, self.probe, self.probe_optimizer = self.accelerator.prepare(
            method, optimizer, probe, probe_optimizer)
        self.device_augment = (DeviceAugment(self.image_size, self.dataset.mean, self.dataset.std,
                                             crop_min_scale=config.crop_min_scale, flip=config.flip).to(self.device)
                               if config.augment == "device" else None)
        self.epoch, self.step_in_epoch, self.elapsed = 0, 0, 0.0
        self.history: list[list[float]] = []  # per step: global step, loss, loss_base, loss_clsp (rank 0)
        self.epoch_metrics: dict[str, float] = {}

    # ---- state -------------------------------------------------------------------------------------
    @property
    def method(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    @property
    def global_step(self) -> int:
        return self.epoch * self.steps_per_epoch + self.step_in_epoch

    def _settings(self) -> dict:
        values = asdict(self.config)
        return {key: values[key] for key in RESUME_KEYS}

    def state_dict(self) -> dict:
        np_state = np.random.get_state()
        rng = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
               "numpy_pos": int(np_state[2])}
        if torch.cuda.is_available():
            rng["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
        return {"model": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "probe": self.accelerator.unwrap_model(self.probe).state_dict(),
                "probe_optimizer": self.probe_optimizer.state_dict(), "rng": rng, "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch, "elapsed": self.elapsed, "settings": self._settings(),
                "history": torch.tensor(self.history, dtype=torch.float64).reshape(-1, 4),
                "epoch_metrics": self.epoch_metrics}

    def save(self) -> None:
        """Write the checkpoint atomically (main process; every rank holds the same state)."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            save_torch_atomic(self.out / CHECKPOINT, self.state_dict())

    def maybe_resume(self) -> bool:
        """Load ``out/checkpoint.pt`` when there is one; refuse one written with other settings."""
        path = self.out / CHECKPOINT
        if not path.is_file():
            return False
        state = load_torch(path)
        ours = self._settings()
        diffs = [f"{k}: {state['settings'].get(k)!r} -> {ours[k]!r}" for k in RESUME_KEYS
                 if state["settings"].get(k) != ours[k]]
        if diffs:
            raise UserError(f"{path} is from a run with other settings ({'; '.join(diffs[:3])}); rerun with "
                            f"those settings to resume it, or pass another --out")
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.accelerator.unwrap_model(self.probe).load_state_dict(state["probe"])
        self.probe_optimizer.load_state_dict(state["probe_optimizer"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(("MT19937", rng["numpy_keys"].numpy().astype(np.uint32), rng["numpy_pos"], 0, 0.0))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(rng["cuda"]))
        self.epoch, self.step_in_epoch, self.elapsed = state["epoch"], state["step_in_epoch"], state["elapsed"]
        self.history = state["history"].tolist()
        self.epoch_metrics = state["epoch_metrics"]
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
            anchor = batch["anchor"].to(self.device, non_blocking=True)
            x1, x2 = self.device_augment(anchor), self.device_augment(anchor)
            positive = batch.get("positive")
            x3 = None if positive is None else self.device_augment(positive.to(self.device, non_blocking=True))
        return x1, x2, x3

    def _train_step(self, batch: dict, step: int) -> dict[str, torch.Tensor]:
        x1, x2, x3 = self._views(batch, step)
        labels = batch["label"].to(self.device, non_blocking=True) if self.labelled else None
        self.model.train()
        out = self.model(x1, x2, x3, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(out["loss"])
        self.optimizer.step()
        self.scheduler.step()
        self.method.on_train_step_end((self.global_step + 1) / self.total_steps)
        metrics = {k: out[k].detach().float() for k in ("loss", "loss_base", "loss_clsp", "nn_acc") if k in out}
        if self.labelled:
            logits = self.probe(out["features"].float())
            probe_loss = F.cross_entropy(logits, labels)
            self.probe_optimizer.zero_grad(set_to_none=True)
            self.accelerator.backward(probe_loss)
            self.probe_optimizer.step()
            metrics["probe_acc"] = (logits.detach().argmax(1) == labels).float().mean()
        return metrics

    # ---- the run ----------------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train (resuming when a checkpoint exists), export the encoder, write the summary."""
        config, acc = self.config, self.accelerator
        resumed = self.maybe_resume()
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.global_step if resumed else None)
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
            keys = [k for k in METRICS if k in sums]
            means = acc.reduce(torch.stack([sums[k] for k in keys]) / counted, reduction="mean").tolist()
            self.epoch_metrics = dict(zip(keys, means))
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        if acc.is_main_process:
            for key, value in self.epoch_metrics.items():
                self.writer.add_scalar(f"epoch/{key}", value, self.epoch)
        if self.epoch % config.checkpoint_every == 0 or self.epoch == config.epochs:
            self.elapsed = elapsed0 + time.perf_counter() - started
            self.save()

    def _log_steps(self, pending: list, bar) -> None:
        """Write the buffered steps' scalars (one device sync per ``log_every`` steps)."""
        if not pending:
            return
        lr = self.scheduler.get_last_lr()[0]
        names = [(step, key) for step, metrics in pending for key in metrics]
        values = torch.stack([value for _, metrics in pending for value in metrics.values()]).tolist()
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
        digest = hashlib.sha256()
        for param in backbone.parameters():
            digest.update(param.detach().float().cpu().numpy().tobytes())
        from accelerate.utils import gather_object

        checksums = gather_object([digest.hexdigest()[:16]])
        summary = {
            "method": config.method, "clsp_weight": config.clsp_weight, "backbone": config.backbone,
            "dataset": self.shards.manifest["dataset"], "epochs": config.epochs, "steps": self.global_step,
            "batch_size": config.batch_size, "world_size": config.world_size,
            "anchors": self.shards.num_anchors,
            "anchors_per_epoch": self.steps_per_epoch * config.batch_size * config.world_size,
            "precision": resolve_precision(config.precision, self.device), "augment": config.augment,
            "crop_min_scale": config.crop_min_scale, "flip": config.flip,
            "time_s": round(self.elapsed, 2), "final": self.epoch_metrics, "rank_checksums": checksums,
            "ranks_in_sync": len(set(checksums)) == 1,
        }
        if acc.is_main_process:
            arch = {"backbone": config.backbone, "small_stem": self.small_stem, "method": config.method,
                    "clsp_weight": config.clsp_weight, "dataset": self.shards.manifest["dataset"],
                    "image_size": self.image_size, "mean": list(self.dataset.mean), "std": list(self.dataset.std),
                    "epochs": config.epochs, "crop_min_scale": config.crop_min_scale, "flip": config.flip}
            export_encoder(backbone, self.out, arch)
            write_json_atomic(self.out / SUMMARY, summary)
            plot_losses(self.history, self.out / CURVE, self.steps_per_epoch)
            self.writer.close()
            print(summary_line(summary, self.out), flush=True)
        acc.wait_for_everyone()
        return summary


def summary_line(summary: dict, out: Path) -> str:
    final = summary["final"]
    name = summary["method"] + (f"+CLSP(lambda={summary['clsp_weight']:g})" if summary["clsp_weight"] else "")
    parts = [f"loss {final.get('loss', float('nan')):.4f} (base {final.get('loss_base', float('nan')):.4f}, "
             f"clsp {final.get('loss_clsp', float('nan')):.4f})"]
    for key, label in (("probe_acc", "online probe"), ("nn_acc", "nn acc")):
        if key in final:
            parts.append(f"{label} {100 * final[key]:.1f}%")
    sync = "" if summary["ranks_in_sync"] else " WARNING: ranks ended with different weights"
    return (f"trained {name} {summary['backbone']} on {summary['dataset']['name']}/{summary['dataset']['split']}: "
            f"{summary['epochs']} epochs, {summary['steps']} steps x {summary['world_size']} process(es), "
            f"{', '.join(parts)}, {summary['time_s']:.1f} s -> {out / 'encoder.safetensors'}{sync}")


def plot_losses(history: list[list[float]], path: Path, steps_per_epoch: int) -> None:
    """Loss terms against training step, with epochs on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = np.asarray(history, dtype=np.float64).reshape(-1, 4)
    fig, ax = plt.subplots(figsize=(7, 4))
    window = max(1, min(50, len(data) // 20))
    kernel = np.ones(window) / window
    for column, label in ((1, "total"), (2, "base"), (3, "CLSP term")):
        if len(data) >= window:
            ax.plot(data[window - 1:, 0], np.convolve(data[:, column], kernel, mode="valid"), label=label)
    ax.set_xlabel(f"step ({steps_per_epoch} per epoch)")
    ax.set_ylabel("loss" + (f" (moving mean of {window})" if window > 1 else ""))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    from clsp.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def train(config: TrainConfig) -> dict:
    """Run (or resume) one training run and return its summary."""
    return Trainer(config).fit()
