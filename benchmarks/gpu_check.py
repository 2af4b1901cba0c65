"""One row of the GPU check, measured at the presets' settings and added to a JSON report as soon as it is measured.

``gpu_bench.sh`` runs each row as its own process under its own time limit, so a row that runs out of time or
fails leaves every row before it in the report (and every sub-row of its own already measured). Rows:

- ``data``: the CIFAR-shaped synthetic shards (32x32, 10 classes, 2 positives) the training rows share;
- ``gemm``: the card's measured matrix rate in bf16, TF32 and full fp32 (on a CPU: fp32), the peaks the
  other rows are a fraction of;
- ``ops``: aten operations of one ``--augment device`` training step per method, the augmentation's share
  and the host copies (a CPU measures these as a GPU would launch them);
- ``sample``: the interpolated DDIM loop (``sample_positives``) of the DDPM CIFAR-10 U-Net at the generation
  preset's batch (256 anchors x 8 candidates), in fp32 under each ``tf32`` setting and in bf16: images per
  second at 100 steps, TFLOP/s and the fraction of the measured peak of that arithmetic;
- ``train``: 200 steps of the real ``Trainer.fit`` (shards, DataLoader workers, device augmentation,
  the recipes' batches: SimCLR 1,024, MoCo 512) on CIFAR-shaped data in fp32 and bf16, beside a bare ResNet-18
  forward and backward of the same three views;
- ``loader``: the DataLoader path alone (the preset's workers, pinned memory), epoch 1 (decoding) and 2;
- ``faiss``: NNCLR's nearest-neighbour search of its support set (65,536 x 256) for one batch of queries;
- ``sample-compiled``, ``train-compiled``: what ``--compile`` does in each stage, with the compile seconds.

    python benchmarks/gpu_check.py gemm --out benchmarks/results/gpu_check_cuda.json
    python benchmarks/gpu_check.py train --cpu --data /tmp/check-data --out /tmp/gpu_check_cpu.json

``--cpu`` runs the same code at sizes a single CPU thread finishes in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark modules

from aten_ops import AtenOps
from clsp.io import write_json_atomic
from clsp.runtime import apply_tf32

# aten ops of one --augment device training step before the batched augmentation (commit 9a5fa87, counted
# on a CPU by this row's code): the augmentation about 1,100 per view
OPS_BEFORE = {"simclr": {"views": 3312, "step": 4081}, "moco": {"views": 3417, "step": 5081},
              "nnclr": {"views": 3347, "step": 5316}}
PRESET_METHODS = ("simclr", "moco")  # configs/cifar10.yaml trains these two (with and without CLSP)


@dataclass(frozen=True)
class Sizes:
    """What each row measures on this device."""

    gemm: int
    unet: str  # ddpm_presets name
    image: int
    anchors: int  # per sampler call (generate.batch_size of the preset)
    candidates: int
    timed_steps: int
    train_anchors: int  # of the synthetic shard set
    train_steps: int  # about this many steps of Trainer.fit (whole epochs)
    batch: dict[str, int]  # per method: the recipe's batch
    precisions: tuple[str, ...]
    workers: int
    support_set: int
    compile_steps: int


CUDA = Sizes(gemm=8192, unet="ddpm-cifar", image=32, anchors=256, candidates=8, timed_steps=3, train_anchors=8192,
             train_steps=200, batch={"simclr": 1024, "moco": 512}, precisions=("fp32", "bf16"), workers=8,
             support_set=65536, compile_steps=10)
CPU = Sizes(gemm=512, unet="tiny", image=16, anchors=2, candidates=2, timed_steps=2, train_anchors=16,
            train_steps=4, batch={"simclr": 8, "moco": 8}, precisions=("fp32",), workers=1, support_set=4096,
            compile_steps=2)


class Check:
    """The device, its sizes and the report the rows are added to."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.cuda = not args.cpu and torch.cuda.is_available()
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.sizes = CUDA if self.cuda else CPU
        self.out, self.data = args.out, args.data
        if self.cuda:
            torch.backends.cudnn.benchmark = True

    def add(self, row: dict) -> None:
        """Append ``row`` to the report (written whole, atomically: a killed row leaves the file intact)."""
        report = json.loads(self.out.read_text()) if self.out.is_file() else self.header()
        report["rows"].append({**row, "peak_memory_gib": round(self.peak_memory() / 2**30, 3)})
        write_json_atomic(self.out, report)
        print(f"  {row}", flush=True)

    def header(self) -> dict:
        card = torch.cuda.get_device_name() if self.cuda else platform.processor() or platform.machine()
        import torchvision

        return {"device": self.device.type, "card": card, "python": platform.python_version(),
                "torch": torch.__version__, "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
                "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "rows": []}

    def peaks(self) -> dict[str, float]:
        """The measured TFLOP/s of the gemm row, by arithmetic ({} before it ran)."""
        rows = json.loads(self.out.read_text())["rows"] if self.out.is_file() else []
        return next((row["tflops"] for row in rows if row["row"] == "gemm"), {})

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def peak_memory(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def seconds(self, run: Callable[[], object], iters: int, warmup: int = 1) -> float:
        """Mean seconds of ``run`` after ``warmup`` untimed calls."""
        for _ in range(warmup):
            run()
        self.sync()
        start = time.perf_counter()
        for _ in range(iters):
            run()
        self.sync()
        return (time.perf_counter() - start) / iters

    def shards(self) -> Path:
        """CIFAR-shaped synthetic shards (10 classes, 2 positives each), made once and shared by the rows."""
        from bench_train import image_folder_shards

        if not (self.data / "shards" / "manifest.json").is_file():
            self.data.mkdir(parents=True, exist_ok=True)
            image_folder_shards(self.data, self.sizes.train_anchors, 2, 32)
        return self.data / "shards"

    def trainer(self, method: str, precision: str, out: str, **settings):
        from clsp.train.config import TrainJob
        from clsp.train.trainer import Trainer

        batch = self.sizes.batch.get(method)  # None: the recipe's
        epochs = max(1, round(self.sizes.train_steps * (batch or 256) / self.sizes.train_anchors))
        values = {"shards": str(self.shards()), "out": str(self.data / "runs" / out), "data_root": str(self.data),
                  "method": method, "batch_size": batch, "augment": "device", "precision": precision,
                  "tf32": "conv", "workers": self.sizes.workers, "epochs": epochs, "checkpoint_every": 100_000}
        return Trainer(TrainJob(**{**values, **settings}))


def data(check: Check) -> None:
    """The synthetic shards the training rows share, made before them (so no row's time share pays for them)."""
    start = time.perf_counter()
    check.shards()
    check.add({"row": "data", "anchors": check.sizes.train_anchors, "candidates": 2,
               "seconds": round(time.perf_counter() - start, 1)})


def gemm(check: Check) -> None:
    n = check.sizes.gemm
    kinds = {"bf16": (torch.bfloat16, "none"), "tf32": (torch.float32, "all"), "fp32": (torch.float32, "none")}
    rates = {}
    for name, (dtype, tf32) in kinds.items() if check.cuda else [("fp32", (torch.float32, "none"))]:
        apply_tf32(tf32)  # type: ignore[arg-type]
        a, b = (torch.randn(n, n, device=check.device, dtype=dtype) for _ in range(2))
        rates[name] = round(2 * n**3 / check.seconds(lambda a=a, b=b: a @ b, 10, 3) / 1e12, 3)
    check.add({"row": "gemm", "n": n, "tflops": rates})


def ops(check: Check) -> None:
    from bench_train import resident_data

    for method in ("simclr", "moco", "nnclr"):
        trainer = check.trainer(method, "fp32", f"ops-{method}", batch_size=8, workers=0)
        data = resident_data(16, 2, 32, check.device)
        batch = data.batch(torch.arange(8, device=check.device), torch.Generator(check.device).manual_seed(0))
        trainer._train_step(batch, 0)  # first-step allocations (optimiser state) are not the steady count
        with AtenOps() as views:
            trainer._views(batch, 1)
        with AtenOps() as step:
            trainer._train_step(batch, 1)
        before = OPS_BEFORE[method]
        check.add({"row": "ops", "method": method, "views_ops": views.total, "step_ops": step.total,
                   "views_host_traffic": views.host_traffic, "step_ops_before": before["step"],
                   "views_ops_before": before["views"], "step_vs_before": round(step.total / before["step"], 3)})


def sample(check: Check, compiled: bool = False) -> None:
    from diffusers import DDPMScheduler
    from torch.utils.flop_counter import FlopCounterMode

    from clsp.generate import interpolated_noise_prediction, sample_positives
    from clsp.generate.ddpm_presets import build_unet, get_preset
    from clsp.generate.job import _compile

    s = check.sizes
    unet = build_unet(get_preset(s.unet), s.image).to(check.device).eval()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    anchors = torch.rand(s.anchors, 3, s.image, s.image, device=check.device) * 2 - 1
    x = torch.randn(s.candidates, 3, s.image, s.image, device=check.device)
    with torch.inference_mode(), FlopCounterMode(display=False) as flops:  # per image: the batch does not change it
        interpolated_noise_prediction(unet, x, torch.tensor(500, device=check.device), x, 0.1)
    per_step = flops.get_total_flops() / s.candidates * s.anchors * s.candidates
    peaks = check.peaks()
    # (precision, tf32): the presets' fp32 (tf32 conv, the authors'), then what each other choice costs
    variants = [("fp32", "conv")] if compiled else [("fp32", "conv"), ("fp32", "none"), ("fp32", "all"),
                                                    ("bf16", "conv")] if check.cuda else [("fp32", "conv")]
    compile_s = None
    if compiled:
        _compile(unet)

    def run(steps: int, precision: str) -> None:
        sample_positives(unet, scheduler, anchors, s.candidates, w=0.1, steps=steps, eta=0.1, precision=precision,
                         generator=torch.Generator(check.device).manual_seed(0))

    for precision, tf32 in variants:
        apply_tf32(tf32)  # type: ignore[arg-type]
        start = time.perf_counter()
        run(1, precision)
        check.sync()
        first = time.perf_counter() - start
        seconds = check.seconds(lambda p=precision: run(s.timed_steps, p), 1, 0) / s.timed_steps
        if compiled:
            compile_s = round(first - seconds, 1)
        arithmetic = "bf16" if precision == "bf16" else ("tf32" if check.cuda and tf32 != "none" else "fp32")
        tflops = per_step / seconds / 1e12
        check.add({"row": "sample-compiled" if compiled else "sample", "unet": s.unet, "precision": precision,
                   "tf32": tf32, "anchors": s.anchors, "candidates": s.candidates, "seconds_per_step": seconds,
                   "images_per_s_at_100_steps": round(s.anchors * s.candidates / (100 * seconds), 2),
                   "tflops": round(tflops, 3), "peak_of": arithmetic,
                   "fraction_of_peak": round(tflops / peaks[arithmetic], 4) if arithmetic in peaks else None,
                   **({"compile_s": compile_s} if compiled else {})})


def bare_resnet(check: Check, batch: int, precision: str) -> float:
    """Anchors per second of a ResNet-18 (CIFAR stem) forward and backward of three views and an SGD step."""
    from clsp.train.backbones import build_backbone

    model = build_backbone("resnet18", stem="small").to(check.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=True)
    views = torch.randn(3 * batch, 3, 32, 32, device=check.device)
    autocast = torch.autocast(check.device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def step() -> None:
        with autocast:
            loss = model(views).float().square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return batch / check.seconds(step, 20 if check.cuda else 2, 3 if check.cuda else 1)


def train(check: Check) -> None:
    for method in PRESET_METHODS:
        for precision in check.sizes.precisions if method == "simclr" else check.sizes.precisions[:1]:
            apply_tf32("conv")
            if check.cuda:
                torch.cuda.reset_peak_memory_stats()
            trainer = check.trainer(method, precision, f"fit-{method}-{precision}")
            start = time.perf_counter()
            summary = trainer.fit()
            wall = time.perf_counter() - start
            batch = check.sizes.batch[method]
            fit_rate = summary["steps"] * batch / summary["time_s"]
            bare = bare_resnet(check, batch, precision)
            check.add({"row": "train", "method": method, "precision": precision, "tf32": "conv", "batch": batch,
                       "workers": check.sizes.workers, "steps": summary["steps"], "fit_s": summary["time_s"],
                       "wall_s": round(wall, 1), "fit_anchors_per_s": round(fit_rate, 1),
                       "bare_resnet18_anchors_per_s": round(bare, 1), "fit_vs_bare": round(fit_rate / bare, 3)})


def loader(check: Check) -> None:
    from clsp.train.data import make_loader

    trainer = check.trainer("simclr", "fp32", "loader")
    for epoch in range(2):
        trainer.stream.set_epoch(epoch, 0)
        start, anchors = time.perf_counter(), 0
        for batch in make_loader(trainer.stream, pin_memory=check.cuda):
            anchors += len(batch["anchor"].to(check.device, non_blocking=True))
        check.sync()
        check.add({"row": "loader", "epoch": epoch + 1, "workers": check.sizes.workers, "anchors": anchors,
                   "anchors_per_s": round(anchors / (time.perf_counter() - start), 1)})


def faiss_search(check: Check) -> None:
    import torch.nn.functional as F

    from clsp.train import neighbours

    bank = F.normalize(torch.randn(check.sizes.support_set, 256, device=check.device), dim=1)
    queries = F.normalize(torch.randn(256 if check.cuda else 8, 256, device=check.device), dim=1)
    backend = ("faiss-gpu" if neighbours._gpu_resources() is not None else "torch topk") if check.cuda \
        else "faiss-cpu"
    seconds = check.seconds(lambda: neighbours.nearest_neighbours(queries, bank, 1), 20, 2)
    check.add({"row": "faiss", "backend": backend, "support_set": len(bank), "queries": len(queries),
               "ms_per_search": round(seconds * 1e3, 3)})


def train_compiled(check: Check) -> None:
    from bench_train import resident_data

    batch_size = check.sizes.batch["simclr"]
    trainer = check.trainer("simclr", "fp32", "compiled", compile=True)
    data = resident_data(2 * batch_size, 2, 32, check.device)
    batch = data.batch(torch.arange(batch_size, device=check.device), torch.Generator(check.device).manual_seed(0))
    start = time.perf_counter()
    trainer._train_step(batch, 0)
    check.sync()
    first = time.perf_counter() - start
    seconds = check.seconds(lambda: trainer._train_step(batch, 1), check.sizes.compile_steps, 1)
    check.add({"row": "train-compiled", "method": "simclr", "precision": "fp32", "tf32": "conv",
               "batch": batch_size, "compile_s": round(first - seconds, 1),
               "step_anchors_per_s": round(batch_size / seconds, 1)})


def summary(check: Check) -> None:
    """The report as one line per row (no measurement)."""
    report = json.loads(check.out.read_text()) if check.out.is_file() else {"rows": []}
    print(f"{report.get('card', '?')}, torch {report.get('torch', '?')}, CUDA {report.get('cuda')}: "
          f"{len(report['rows'])} rows")
    for row in report["rows"]:
        print("  " + ", ".join(f"{key} {value}" for key, value in row.items()))


ROWS: dict[str, Callable[[Check], None]] = {
    "data": data, "gemm": gemm, "ops": ops, "sample": sample, "train": train, "loader": loader, "faiss": faiss_search,
    "sample-compiled": lambda check: sample(check, compiled=True), "train-compiled": train_compiled,
    "summary": summary}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("row", choices=ROWS)
    parser.add_argument("--cpu", action="store_true", help="CPU sizes, on the CPU even where CUDA is present")
    parser.add_argument("--out", type=Path, required=True, help="JSON report the row is added to")
    parser.add_argument("--data", type=Path, default=Path("runs/gpu-check"), help="synthetic shards, made once")
    args = parser.parse_args(argv)
    ROWS[args.row](Check(args))


if __name__ == "__main__":
    main()
