"""Speed of the training data path per CPU core, part by part, against 2,000 anchors/s per core.

A GPU step of ResNet-18 at 32x32 takes far less time than one CPU core needs to feed it, so the input
pipeline sets the epoch time. This measures, with torch and the process on one thread and
``ContrastiveStream`` without workers (a worker process does the same work on its own core):

- reading shards: the sha256 check against the manifest, and the bounded tar read of every member;
- decoding the k PNG positives of an anchor, or only the drawn one; loading the real anchors by index;
- augmenting 3 views: per image with torchvision v2 on the CPU, batched (clsp.train.augment) on the device;
- end to end, to uint8 batches on the device (augmentation left to the device): the stream as the
  trainer uses it (epoch 1 decodes the drawn positives into the in-memory cache, epoch 2 the other
  candidates, later epochs index it), the stream as it was before the cache (every shard read and
  every sample decoded each epoch), the stream when the cache is not kept (each epoch decodes what it
  draws), the cache's later epochs in memory and memory-mapped, and the device-resident dataset.

    OMP_NUM_THREADS=1 python benchmarks/bench_datapath.py                     # CPU: about a minute
    python benchmarks/bench_datapath.py --device cuda --anchors 4096 --batch-size 512

Images are synthetic CIFAR-sized RGB (smooth fields plus noise, so their PNGs are about the size of
CIFAR's); the parts on the CPU are timed by this process's CPU time (a shared machine's neighbours do
not count), the parts on a GPU by wall time.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads: one thread is one core

import argparse
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clsp.datasets import ArrayDataset, ImageDataset
from clsp.io import write_json_atomic
from clsp.shards import reader, schema, writer
from clsp.train.augment import DeviceAugment, augment_images, cpu_transform
from clsp.train.data import ContrastiveStream, ShardSet, make_loader, open_shards, plan_epoch
from clsp.train.decoded_cache import DecodedShards
from clsp.train.device_data import DeviceDataset
from clsp.train.recipes import ViewAugmentation

GOAL_PER_CORE = 2000.0  # anchors/s from shards to device-ready uint8 batches
RESULTS = Path(__file__).parent / "results" / "bench_datapath.json"


def synthetic_images(count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``[count, size, size, 3]``: smooth random colour fields plus pixel noise."""
    coarse = torch.from_numpy(rng.integers(0, 256, (count, 3, 4, 4)).astype(np.float32))
    smooth = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    noisy = smooth + torch.from_numpy(rng.normal(0, 12, smooth.shape).astype(np.float32))
    return noisy.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def synthetic_dataset(anchors: int, size: int, rng: np.random.Generator) -> ArrayDataset:
    """A labelled in-memory dataset of synthetic CIFAR-like images (10 classes)."""
    return ArrayDataset(name="synthetic", split="train", num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3,
                        images=synthetic_images(anchors, size, rng), targets=np.arange(anchors) % 10)


def write_shards(directory: Path, dataset: ImageDataset, k: int, shard_size: int, rng: np.random.Generator) -> ShardSet:
    """Shards of every anchor of ``dataset`` with k synthetic positives each."""
    manifest = writer.init_manifest(directory, dataset=dataset.describe(), generation={"bench": True},
                                    num_anchors=len(dataset), shard_size=shard_size)
    size, labels = dataset.image_size, dataset.labels()
    for shard in range(manifest.num_shards):
        rows = manifest.anchor_range(shard)
        positives = synthetic_images(len(rows) * k, size, rng).reshape(len(rows), k, size, size, 3)
        writer.write_shard(directory, shard, (schema.ShardSample(anchor_index=a, positives=p, label=int(labels[a]))
                                              for a, p in zip(rows, positives)))
    return open_shards(directory)


class UncachedStream(ContrastiveStream):
    """The stream as it was before the decoded cache: each chunk reads the shards it spans and decodes
    every sample (all k candidates), keeping the positives its anchors drew."""

    def _read_chunk(self, anchors: np.ndarray):
        draws = np.random.default_rng([self.seed, self.epoch, 1]).random(self.shards.store.manifest.num_anchors)
        position = {int(a): i for i, a in enumerate(anchors)}
        height, width = self.shards.store.manifest.image_shape
        positives = np.empty((len(anchors), height, width, 3), np.uint8)
        images, stored = np.zeros_like(positives), np.zeros(len(anchors), bool)
        for sample in self.shards.store.samples(sorted({int(a) // self.shards.shard_size for a in anchors})):
            i = position.get(sample.anchor_index)
            if i is not None:
                positives[i] = sample.positives[int(draws[sample.anchor_index] * len(sample.positives))]
                if sample.anchor is not None:
                    images[i], stored[i] = sample.anchor, True
        return positives, images, stored


def to_device(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> uint8 ``[B, 3, H, W]`` on the device (what the trainer augments)."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device, non_blocking=True)


class Timer:
    """Best-of-``repeats`` anchors per second; process CPU time unless a GPU does the work."""

    def __init__(self, device: torch.device, repeats: int) -> None:
        self.device, self.repeats = device, repeats

    def rate(self, run: Callable[[], object], anchors: int, *, on_device: bool = False,
             once: bool = False) -> tuple[float, str]:
        wall = on_device and self.device.type == "cuda"
        now = time.perf_counter if wall else time.process_time
        best = float("inf")
        for _ in range(1 if once else self.repeats):
            self.sync()
            start = now()
            run()
            self.sync()
            best = min(best, now() - start)
        return anchors / best, "wall" if wall else "cpu"

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def measure(args: argparse.Namespace, device: torch.device, work: Path) -> tuple[list[dict], dict]:
    rng = np.random.default_rng(0)
    dataset = synthetic_dataset(args.anchors, args.image_size, rng)
    shards = write_shards(work / "shards", dataset, args.candidates, args.shard_size, rng)
    store, shape = shards.store, shards.store.manifest.image_shape
    n, batch = shards.num_anchors, args.batch_size
    plan = plan_epoch(shards, seed=0, epoch=0, batch_size=batch)
    steps = [plan.anchors(s) for s in range(len(plan.batches))]
    per_epoch = len(steps) * batch
    draws = np.random.default_rng(1).random(n)
    timer = Timer(device, args.repeats)
    rows: list[dict] = []

    def row(part: str, what: str, run: Callable[[], object], anchors: int, *, on_device: bool = False,
            end_to_end: bool = False, once: bool = False) -> None:
        rate, clock = timer.rate(run, anchors, on_device=on_device, once=once)
        rows.append({"part": part, "what": what, "anchors_per_s": rate, "clock": clock, "end_to_end": end_to_end,
                     **({"meets_goal": rate >= GOAL_PER_CORE} if end_to_end else {})})
        print(f"{part:24s} {rate:12.0f} anchors/s ({clock})", flush=True)

    def epoch(stream: ContrastiveStream, number: int = 0) -> None:
        stream.set_epoch(number)
        for loaded in make_loader(stream):
            for key in ("anchor", "positive"):
                loaded[key].to(device, non_blocking=True)

    def cached_epoch(decoded: DecodedShards) -> None:
        for anchors in steps:
            positives, _, _ = decoded.drawn(anchors, draws[anchors])
            to_device(dataset.array(anchors), device)
            to_device(positives, device)

    def read_tars() -> list:
        out = []
        for s in shards.shards:
            with open(store.shard_path(s), "rb") as stream:  # a local store: its locations are paths
                out += [(key, members) for key, members, _ in reader.tar_samples(stream, shape, store.shard_path(s))]
        return out

    raw = read_tars()
    records = [(key, schema.check_sample(key, members, candidates=None, where="bench"), members)
               for key, members in raw]
    row("verify_sha256", "sha256 of every shard against the manifest",
        lambda: [store.check_shard(s) for s in shards.shards], n)
    row("read_tar", "tar members, bounded stream read", read_tars, n)
    row("check_records", "JSON records parsed and checked",
        lambda: [schema.check_sample(k, m, candidates=None, where="bench") for k, m in raw], n)
    row("decode_png", f"decode k={args.candidates} PNG positives",
        lambda: [schema.sample_from(k, r, m, shape=shape, where="bench") for k, r, m in records], n)
    row("decode_drawn", "decode the one drawn PNG positive",
        lambda: [schema.decode_member(k, m, "pos0.png", shape=shape, where="bench") for k, _, m in records], n)
    row("load_anchors", "real anchors by index, uint8 to device", lambda: [to_device(dataset.array(a), device)
                                                                        for a in steps], per_epoch)
    view = ViewAugmentation()
    transform = cpu_transform(args.image_size, dataset.mean, dataset.std, view)
    host = [to_device(dataset.array(a), torch.device("cpu")) for a in steps]
    row("augment_cpu", "3 views per image, torchvision v2", lambda: [augment_images(transform, x) for x in host
                                                                    for _ in range(3)], per_epoch)
    device_augment = DeviceAugment(args.image_size, dataset.mean, dataset.std, view).to(device)
    on_device = [x.to(device) for x in host]
    row("augment_device", f"3 views per batch, batched on {device.type}",
        lambda: [device_augment(x) for x in on_device for _ in range(3)], per_epoch, on_device=True)

    def cpu_views_epoch() -> None:
        stream = ContrastiveStream(shards, dataset, batch_size=batch, views=(view, view))
        stream.decoded = warm  # decoded already: this row is the augmentation's share
        for loaded in make_loader(stream):
            for key in ("x1", "x2", "x3"):
                loaded[key].to(device, non_blocking=True)

    row("stream_before_cache", "stream before the cache: all k decoded each epoch",
        lambda: epoch(UncachedStream(shards, dataset, batch_size=batch)), per_epoch, end_to_end=True)
    unkept = ContrastiveStream(shards, dataset, batch_size=batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unkept.decoded = DecodedShards(shards, memory_limit=0)
    row("stream_not_kept", "stream, cache not kept: drawn PNGs each epoch", lambda: epoch(unkept), per_epoch,
        end_to_end=True)
    row("stream_first_epoch", "stream, epoch 1: decodes the drawn PNG, kept",
        lambda: epoch(ContrastiveStream(shards, dataset, batch_size=batch)), per_epoch, end_to_end=True)
    stream = ContrastiveStream(shards, dataset, batch_size=batch)
    epoch(stream, 0)
    row("stream_second_epoch", "stream, epoch 2: decodes the other k-1, kept", lambda: epoch(stream, 1), per_epoch,
        end_to_end=True, once=True)  # happens once per cache
    later = iter(range(2, 1 << 20))
    row("stream", "stream, later epochs: indexes the memory cache", lambda: epoch(stream, next(later)), per_epoch,
        end_to_end=True)
    warm = stream.decoded
    row("stream_cpu_augment", "stream, later epochs, 3 views augmented on CPU", cpu_views_epoch, per_epoch,
        end_to_end=True)
    row("cache_memory", "decoded cache in memory, drawn by index", lambda: cached_epoch(warm), per_epoch,
        end_to_end=True)
    mapped = DecodedShards(shards, work / "cache")
    mapped.arrays()  # writes the .npy files
    mapped = DecodedShards(shards, work / "cache")  # and maps them, as a later run does
    row("cache_memmap", "decoded cache as memmap files, drawn by index", lambda: cached_epoch(mapped),
        per_epoch, end_to_end=True)
    resident = DeviceDataset.from_decoded(warm, dataset, device)
    generator = torch.Generator(device=device).manual_seed(0)
    row("device_dataset", f"device-resident dataset on {device.type}, index draws",
        lambda: list(resident.batches(batch, generator)), per_epoch, on_device=True, end_to_end=True)

    def resident_augmented() -> None:
        for loaded in resident.batches(batch, generator):
            device_augment(loaded["anchor"]), device_augment(loaded["anchor"]), device_augment(loaded["positive"])

    row("device_dataset_augment", "device-resident dataset + 3 batched views", resident_augmented, per_epoch,
        on_device=True)
    png_bytes = float(np.mean([len(m["pos0.png"]) for _, m in raw]))
    return rows, {"anchors": n, "steps_per_epoch": len(steps), "png_bytes_mean": png_bytes,
                  "device_dataset_bytes": resident.nbytes}


def print_table(report: dict) -> None:
    print(f"\ndata path per core: {report['anchors']} anchors, k={report['candidates']}, {report['image_size']}px "
          f"(PNG {report['png_bytes_mean']:.0f} B), batch {report['batch_size']}, {report['threads']} thread, "
          f"device {report['device']}, on {report['device_name']} ({report['cpus']} CPUs)")
    print(f"{'part':24s} {'what':52s} {'anchors/s':>10s} {'clock':>6s} {'goal':>6s}")
    for r in report["rows"]:
        goal = ("met" if r["meets_goal"] else "NOT") if r["end_to_end"] else ""
        print(f"{r['part']:24s} {r['what']:52s} {r['anchors_per_s']:10.0f} {r['clock']:>6s} {goal:>6s}")
    print(f"(goal: {GOAL_PER_CORE:.0f} anchors/s per core from shards to device-ready uint8 batches)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--anchors", type=int, default=1024, help="anchors in the bench shards")
    parser.add_argument("--candidates", type=int, default=8, help="k positives per anchor")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per part; the best is kept")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        rows, facts = measure(args, device, Path(tmp))
    report = {"command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]), "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "threads": torch.get_num_threads(), "candidates": args.candidates, "image_size": args.image_size,
              "batch_size": args.batch_size, "repeats": args.repeats, "torch": torch.__version__,
              "python": sys.version.split()[0], "goal_anchors_per_s_per_core": GOAL_PER_CORE, **facts, "rows": rows}
    print_table(report)
    write_json_atomic(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
