"""Speed of the training stage: the data path and full training steps, ResNet-18 at 32x32.

Data path: shards -> real anchors + one drawn positive -> three augmented views, in samples (anchors)
per second, with per-image augmentation in DataLoader workers (``cpu``) and with batched
augmentation on the training device (``device``, kornia). Training: one full step (3 views, forward,
backward, optimiser step) of each method with the CLSP term on, on ready-made views. The projected
CIFAR-10 CLSP epoch (50,000 anchors) is the slower of the two rates at the measured batch size.

    python benchmarks/bench_train.py                                  # CPU: about two minutes
    python benchmarks/bench_train.py --device cuda --batch-size 512 --workers 8 --compile

Real images are digits upsampled to 32x32 (the only data that ships offline); positives are
fabricated (shifted, noised copies), which costs the data path what real positives cost: PNG decode
of k candidates per anchor. Goal on one H200: a CIFAR-10 CLSP epoch in under 10 s.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from clsp.datasets import get_dataset
from clsp.io import write_json_atomic
from clsp.runtime import autocast, resolve_precision
from clsp.shards import schema, writer
from clsp.train.augment import DeviceAugment
from clsp.train.backbones import build_backbone
from clsp.train.data import ContrastiveStream, make_loader, open_shards
from clsp.train.methods import METHODS, build_method
from clsp.train.optim import build_optimizer
from clsp.train.config import TrainJob
from clsp.train.recipes import ViewAugmentation

CIFAR_ANCHORS = 50_000
GOAL_EPOCH_S = 10.0
RESULTS = Path(__file__).parent / "results" / "bench_train.json"


def make_shards(directory: Path, num_anchors: int, k: int, size: int) -> tuple[Path, object]:
    """Shards of the first ``num_anchors`` digits at ``size`` with k fabricated positives each."""
    dataset = get_dataset("digits", image_size=size)
    manifest = writer.init_manifest(directory, dataset=dataset.describe(), generation={"bench": True},
                                    num_anchors=num_anchors, shard_size=256)
    rng = np.random.default_rng(0)
    for index in range(manifest.num_shards):
        anchors = manifest.anchor_range(index)
        images = dataset.array(list(anchors)).astype(np.int16)
        writer.write_shard(directory, index, (
            schema.ShardSample(anchor_index=a, positives=np.clip(
                np.roll(img, 1, axis=0)[None] + rng.integers(-30, 31, size=(k, *img.shape)), 0, 255).astype(np.uint8))
            for a, img in zip(anchors, images)))
    return directory, dataset


def bench_data(shards, dataset, *, augment: str, batch_size: int, workers: int, device: torch.device,
               epochs: int) -> float:
    """Anchors per second through the loader and augmentation (3 views each), after a warm-up epoch."""
    view = ViewAugmentation()
    stream = ContrastiveStream(shards, dataset, batch_size=batch_size, num_workers=workers,
                               views=(view, view) if augment == "cpu" else None)
    device_augment = DeviceAugment(dataset.image_size, dataset.mean, dataset.std, view).to(device) \
        if augment == "device" else None
    count, start = 0, 0.0
    for epoch in range(epochs + 1):
        if epoch == 1:
            _sync(device)
            count, start = 0, time.perf_counter()
        stream.set_epoch(epoch)
        for batch in make_loader(stream, pin_memory=device.type == "cuda"):
            if device_augment is None:
                views = [batch[k].to(device, non_blocking=True) for k in ("x1", "x2", "x3")]
            else:
                anchor = batch["anchor"].to(device, non_blocking=True)
                views = [device_augment(anchor), device_augment(anchor),
                         device_augment(batch["positive"].to(device, non_blocking=True))]
            count += len(views[0])
    _sync(device)
    return count / (time.perf_counter() - start)


def bench_steps(method_name: str, *, batch_size: int, device: torch.device, precision: str, compile_: bool,
                steps: int, warmup: int) -> float:
    """Anchors per second of full training steps (3 views of 32x32, forward + backward + optimiser)."""
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", small_stem=True)
    job = TrainJob(method=method_name, shards="unused", out="unused").resolved("cifar10")
    method = build_method(job, backbone).to(device)
    if compile_:
        method.backbone.compile()
    optimizer = build_optimizer(job.optimizer, method.parameter_groups(job.weight_decay, job.weight_decay_scope),
                                job.lr)
    views = [torch.randn(batch_size, 3, 32, 32, device=device) for _ in range(3)]
    labels = torch.randint(0, 10, (batch_size,), device=device)
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        with autocast(device, precision):
            out = method(*views, labels)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        method.on_train_step_end(i / (warmup + steps))
    _sync(device)
    return steps * batch_size / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 512 on CUDA, 16 on CPU")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--anchors", type=int, default=None, help="anchors in the bench shards")
    parser.add_argument("--candidates", type=int, default=8, help="k positives per anchor")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per method")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch_size or (512 if cuda else 16)
    anchors = args.anchors or (8192 if cuda else 512)
    steps = args.steps or (20 if cuda else 2)
    precision = resolve_precision(args.precision, device)
    torch.backends.cudnn.benchmark = True

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        directory, dataset = make_shards(Path(tmp) / "shards", anchors, args.candidates, 32)
        shards = open_shards(directory)
        for augment in ("cpu", "device"):
            rate = bench_data(shards, dataset, augment=augment, batch_size=min(batch, anchors),
                              workers=args.workers, device=device, epochs=1 if cuda else 1)
            rows.append({"part": "data", "what": f"shards + anchors + 3 views, {augment} augmentation",
                         "augment": augment, "samples_per_s": rate})
            print(f"data ({augment:6s}): {rate:10.0f} anchors/s", flush=True)
    for name in args.methods:
        rate = bench_steps(name, batch_size=batch, device=device, precision=precision, compile_=args.compile,
                           steps=steps, warmup=3 if cuda else 1)
        rows.append({"part": "train", "what": f"{name} + CLSP step, ResNet-18 32x32", "method": name,
                     "samples_per_s": rate})
        print(f"train ({name:6s}): {rate:10.1f} anchors/s", flush=True)

    best_data = max(r["samples_per_s"] for r in rows if r["part"] == "data")
    for row in rows:
        if row["part"] == "train":
            row["cifar10_epoch_s"] = CIFAR_ANCHORS / min(row["samples_per_s"], best_data)
    device_name = torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine()
    print(f"\nResNet-18 32x32, batch {batch}, {precision}{', compiled' if args.compile else ''}, "
          f"{args.workers} workers, k={args.candidates}, on {device_name} ({os.cpu_count()} CPUs)")
    print(f"{'part':6s} {'what':48s} {'anchors/s':>11s} {'CIFAR-10 epoch':>15s}")
    for row in rows:
        epoch = f"{row['cifar10_epoch_s']:.1f} s" if "cifar10_epoch_s" in row else ""
        print(f"{row['part']:6s} {row['what']:48s} {row['samples_per_s']:11.1f} {epoch:>15s}")
    print(f"(projected epoch = 50,000 anchors / min(step rate, best data rate); goal on one H200: "
          f"< {GOAL_EPOCH_S:.0f} s)")
    write_json_atomic(args.out, {
        "device": str(device), "device_name": device_name, "cpus": os.cpu_count(), "precision": precision,
        "compile": args.compile, "batch_size": batch, "workers": args.workers, "anchors": anchors,
        "candidates": args.candidates, "torch": torch.__version__, "python": sys.version.split()[0],
        "goal_cifar10_epoch_s": GOAL_EPOCH_S, "rows": rows,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
