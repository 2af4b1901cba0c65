"""Speed of the training stage fed from the device: the trainer's own step, and a CIFAR-10-sized epoch.

Each method is built by ``clsp.train.trainer.Trainer`` exactly as ``clsp-train`` builds it (device
augmentation, the method's defaults, the CLSP term, the online probe) and every step is the trainer's
``_train_step``; batches come from a ``DeviceDataset`` (all anchors and positives as uint8 on the
device, positives drawn by index per step), so no CPU core sits between the data and the GPU. Reported
per method: the feed rate, the step rate (3 augmented views, forward, backward, optimiser, probe),
the projected CIFAR-10 epoch (50,000 anchors at the slower of the two) and a measured epoch over
``--anchors`` anchors (50,000 on CUDA: a real CIFAR-10-sized epoch; scaled to 50,000 when smaller).

    python benchmarks/bench_train.py --precision fp32                       # CPU: about a minute
    python benchmarks/bench_train.py --device cuda --batch-size 512 --compile

The dataset is synthetic 32x32 RGB written as an image folder (so it loads the way user data loads,
with no package beyond the training stage's own); the pixel values do not change the cost.
Goal on one H200: a CIFAR-10 CLSP epoch in under 10 s.
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
from PIL import Image

from bench_datapath import synthetic_dataset, write_shards
from clsp.datasets import get_dataset
from clsp.io import write_json_atomic
from clsp.train.config import TrainJob
from clsp.train.device_data import DeviceDataset
from clsp.train.methods import METHODS
from clsp.train.trainer import Trainer

CIFAR_ANCHORS = 50_000
GOAL_EPOCH_S = 10.0
RESULTS = Path(__file__).parent / "results" / "bench_train.json"


def image_folder_shards(directory: Path, images: int, k: int, size: int) -> Path:
    """An image folder of ``images`` synthetic pictures in 10 classes and its shards; returns the shards."""
    rng = np.random.default_rng(0)
    synthetic = synthetic_dataset(images, size, rng)
    for index, (image, label) in enumerate(zip(synthetic.images, synthetic.targets)):
        path = directory / "images" / f"class{label}" / f"{index:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
    dataset = get_dataset(f"imagefolder:{directory / 'images'}")
    write_shards(directory / "shards", dataset, k, shard_size=256, rng=rng)
    return directory / "shards"


def resident_data(anchors: int, k: int, size: int, device: torch.device) -> DeviceDataset:
    """A CIFAR-sized device-resident set of random uint8 anchors and positives (10 classes)."""
    generator = torch.Generator(device=device).manual_seed(0)
    pixels = torch.randint(0, 256, (anchors * (k + 1), size, size, 3), generator=generator, device=device,
                           dtype=torch.uint8)
    return DeviceDataset(pixels[:anchors], pixels[anchors:].view(anchors, k, size, size, 3),
                         torch.arange(anchors, device=device) % 10, device)


def bench_method(trainer: Trainer, data: DeviceDataset, *, batch_size: int, steps: int, warmup: int) -> dict:
    """Feed rate, step rate and one measured epoch (anchors per second and seconds)."""
    device = trainer.device
    generator = torch.Generator(device=device).manual_seed(0)
    rows = torch.arange(batch_size, device=device)
    batch = data.batch(rows, generator)
    for step in range(warmup):
        trainer._train_step(batch, step)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        data.batch(rows, generator)
    _sync(device)
    feed = steps * batch_size / (time.perf_counter() - start)
    start = time.perf_counter()
    for step in range(steps):
        trainer._train_step(batch, warmup + step)
    _sync(device)
    step_rate = steps * batch_size / (time.perf_counter() - start)
    start = time.perf_counter()
    count = 0
    for step, loaded in enumerate(data.batches(batch_size, generator)):
        trainer._train_step(loaded, step)
        count += batch_size
    _sync(device)
    epoch_s = time.perf_counter() - start
    return {"feed_samples_per_s": feed, "step_samples_per_s": step_rate,
            "projected_cifar10_epoch_s": CIFAR_ANCHORS / min(feed, step_rate),
            "measured_epoch_anchors": count, "measured_epoch_s": epoch_s,
            "measured_cifar10_epoch_s": epoch_s * CIFAR_ANCHORS / count}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda, or cpu (which the trainer then uses wherever CUDA is absent)")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 512 on CUDA, 8 on CPU")
    parser.add_argument("--anchors", type=int, default=None, help="anchors of the measured epoch "
                        "(default: 50,000 on CUDA, two batches on CPU)")
    parser.add_argument("--candidates", type=int, default=8, help="k positives per anchor")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per method (default 20 CUDA, 1 CPU)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda != torch.cuda.is_available():
        parser.error("the trainer trains on CUDA whenever it is present: --device must match")
    batch = args.batch_size or (512 if cuda else 8)
    anchors = args.anchors or (CIFAR_ANCHORS if cuda else 2 * batch)
    steps = args.steps or (20 if cuda else 1)
    torch.backends.cudnn.benchmark = True

    device_name = torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine()
    data = resident_data(anchors, args.candidates, 32, device)
    report = {"command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]), "device": str(device),
              "device_name": device_name, "cpus": os.cpu_count(), "compile": args.compile, "batch_size": batch,
              "anchors": anchors, "candidates": args.candidates, "steps": steps, "device_dataset_bytes": data.nbytes,
              "torch": torch.__version__, "python": sys.version.split()[0], "goal_cifar10_epoch_s": GOAL_EPOCH_S,
              "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        shards = image_folder_shards(Path(tmp), max(batch, 16), args.candidates, 32)
        for name in args.methods:
            job = TrainJob(shards=str(shards), out=str(Path(tmp) / name), method=name, batch_size=batch,
                           augment="device", workers=0, precision=args.precision, compile=args.compile,
                           data_root=tmp, epochs=1)
            trainer = Trainer(job)
            row = {"method": name, "what": f"{name} + CLSP (lambda {trainer.config.clsp_lambda:g}), ResNet-18 32x32",
                   **bench_method(trainer, data, batch_size=batch, steps=steps, warmup=3 if cuda else 1)}
            print(f"{name:6s}: step {row['step_samples_per_s']:10.1f} anchors/s, measured epoch "
                  f"{row['measured_epoch_s']:.2f} s", flush=True)
            report["rows"].append(row)
            report["mixed_precision"] = trainer.accelerator.mixed_precision
            report["goal_met"] = all(r["measured_cifar10_epoch_s"] < GOAL_EPOCH_S for r in report["rows"])
            write_json_atomic(args.out, report)  # after each method: a run cut short keeps what it measured
    print_table(report)
    print(f"wrote {args.out}")


def print_table(report: dict) -> None:
    print(f"\nResNet-18 32x32 via Trainer._train_step, batch {report['batch_size']}, mixed precision "
          f"{report['mixed_precision']}{', compiled' if report['compile'] else ''}, k={report['candidates']}, "
          f"device-resident data ({report['device_dataset_bytes'] / 2**30:.2f} GiB), on {report['device_name']} "
          f"({report['cpus']} CPUs)")
    print(f"{'what':40s} {'feed/s':>10s} {'step/s':>9s} {'projected':>10s} {'measured':>18s}")
    for row in report["rows"]:
        print(f"{row['what']:40s} {row['feed_samples_per_s']:10.0f} {row['step_samples_per_s']:9.1f} "
              f"{row['projected_cifar10_epoch_s']:9.1f}s {row['measured_cifar10_epoch_s']:9.1f}s "
              f"({row['measured_epoch_anchors']} anchors)")
    print(f"(CIFAR-10 epoch = 50,000 anchors; projected at min(feed, step), measured over the anchors shown and "
          f"scaled; goal on one H200: < {GOAL_EPOCH_S:.0f} s)")


if __name__ == "__main__":
    main()
