"""Speed of one interpolated DDIM step against a plain step and a naive two-forward interpolation.

By FLOPs an interpolated step costs 1.26 plain steps on the DDPM CIFAR-10 U-Net (the encoder runs twice,
the decoder once); this measures what it costs in wall time, what sharing the anchor's encoder pass among
its candidates saves, and what that sharing does to the diversity of the candidates.

    python benchmarks/bench_generate.py --config ddpm-cifar --device cpu --batch-size 8 --repeats 3
    python benchmarks/bench_generate.py --device cuda --compile          # adds TFLOP/s and share of peak

Random weights are fine for timing (the cost does not depend on the values). The diversity part uses real
digits anchors and, unless ``--diversity-model`` names a trained model folder, a random digits-size U-Net.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from clsp.generate import interpolated_noise_prediction, sample_positives
from clsp.generate.ddpm_presets import build_unet, get_preset
from clsp.io import write_json_atomic
from clsp.runtime import autocast, resolve_precision

IMAGE_SIZES = {"ddpm-cifar": 32, "digits": 16, "tiny": 16}
FLOP_RATIO_METHOD = 1.26     # METHOD.md: 15.3 / 12.1 GFLOP on the DDPM CIFAR-10 U-Net at 32x32
CPU_GOAL = 1.35              # interpolated / plain step time on a CPU
PEAK_BF16_TFLOPS = 790.0     # bf16 matrix rate measured on one H200
GPU_GOAL = 0.40              # fraction of that peak on the full DDPM CIFAR-10 job
DDPM_CIFAR_PARAMS = 35.7e6


def naive_interpolated_noise_prediction(unet, sample, timestep, anchor_sample, weight):
    """What a hook-based implementation does: a full forward on the anchor to capture its mid-block output,
    then a full forward on the sample whose mid-block output is replaced by the mix (two encoders, two decoders).
    """
    captured = {}

    def capture(module, args, output):
        captured["h_anchor"] = output

    def mix(module, args, output):
        return torch.lerp(captured["h_anchor"], output, weight)

    handle = unet.mid_block.register_forward_hook(capture)
    try:
        unet(anchor_sample, timestep)
    finally:
        handle.remove()
    handle = unet.mid_block.register_forward_hook(mix)
    try:
        return unet(sample, timestep).sample
    finally:
        handle.remove()


def count_flops(step: Callable[[], object]) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def best_seconds(steps: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                 iters: int, clock: str = "wall") -> dict[str, float]:
    """Best-of-``repeats`` seconds per call; variants interleave so a busy neighbour slows all alike.

    ``clock="cpu"`` counts this process's CPU time instead of wall time: on a CPU shared with other jobs
    (and with one thread, so no time is spent spinning) it measures the work, not the neighbours.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    now = time.process_time if clock == "cpu" else time.perf_counter
    best = {name: float("inf") for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            sync()
            start = now()
            for _ in range(iters):
                step()
            sync()
            best[name] = min(best[name], (now() - start) / iters)
    return best


def step_benchmark(args, device: torch.device, precision: str) -> dict:
    unet = build_unet(get_preset(args.config), IMAGE_SIZES[args.config]).to(device).eval()
    params = sum(p.numel() for p in unet.parameters())
    if args.config == "ddpm-cifar":
        assert abs(params - DDPM_CIFAR_PARAMS) < 0.1e6, f"DDPM CIFAR-10 U-Net has {params} parameters, not 35.7M"
    size = IMAGE_SIZES[args.config]
    batch, k = args.batch_size, min(args.candidates, args.batch_size)
    if batch % k:
        raise SystemExit(f"--batch-size {batch} must be a multiple of --candidates {k} for the shared-pass step")
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    unet.to(memory_format=memory_format)
    t = torch.tensor(500, device=device)

    def make_steps(rows: int, model, interp) -> dict[str, Callable[[], object]]:
        gen = torch.Generator(device="cpu").manual_seed(0)
        x, anchors = (torch.randn(rows, 3, size, size, generator=gen).to(device, memory_format=memory_format)
                      for _ in range(2))
        shared = anchors[:: min(k, rows)].contiguous(memory_format=memory_format)
        return {
            "plain": lambda: model(x, t).sample,
            "interpolated": lambda: interp(unet, x, t, anchors, args.weight),
            "shared_anchor_pass": lambda: interp(unet, x, t, shared, args.weight),
            "naive_two_forwards": lambda: naive_interpolated_noise_prediction(model, x, t, anchors, args.weight),
        }

    # FLOPs per image do not depend on the batch (except the shared pass, counted on one anchor's k rows)
    flops = {name: count_flops(step) / k * batch for name, step in
             make_steps(k, unet, interpolated_noise_prediction).items()}
    steps = make_steps(batch, torch.compile(unet), torch.compile(interpolated_noise_prediction)) if args.compile \
        else make_steps(batch, unet, interpolated_noise_prediction)
    with torch.inference_mode(), autocast(device, precision):
        best_seconds(steps, device, repeats=1, iters=args.warmup)
        seconds = best_seconds(steps, device, args.repeats, args.iters, args.clock)
    rows = {}
    for name in steps:
        rows[name] = {"seconds_per_step": seconds[name], "images_per_second": batch / seconds[name],
                      "gflop_per_image": flops[name] / batch / 1e9,
                      "time_vs_plain": seconds[name] / seconds["plain"],
                      "flops_vs_plain": flops[name] / flops["plain"],
                      "tflops_per_second": flops[name] / seconds[name] / 1e12}
        if device.type == "cuda":
            rows[name]["fraction_of_bf16_peak"] = rows[name]["tflops_per_second"] / PEAK_BF16_TFLOPS
    ratio = rows["interpolated"]["time_vs_plain"]
    goal = {"cpu_time_ratio_max": CPU_GOAL, "met": ratio <= CPU_GOAL} if device.type == "cpu" else {
        "gpu_fraction_of_peak_min": GPU_GOAL, "met": rows["interpolated"]["fraction_of_bf16_peak"] >= GPU_GOAL}
    return {"config": args.config, "parameters": params, "image_size": size, "batch_size": batch,
            "candidates_per_anchor": k, "weight": args.weight, "clock": args.clock, "steps": rows,
            "interpolated_vs_plain_time": ratio, "interpolated_vs_plain_flops": rows["interpolated"]["flops_vs_plain"],
            "method_flop_ratio": FLOP_RATIO_METHOD, "goal": goal}


def load_diversity_model(path: str | None, device: torch.device):
    from diffusers import DDPMScheduler, UNet2DModel

    if path is None:
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
        return build_unet(get_preset("digits"), 16).to(device), scheduler, "digits preset, random weights"
    sub = "unet" if (Path(path) / "unet").is_dir() else None
    unet = UNet2DModel.from_pretrained(path, subfolder=sub).to(device)
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler" if sub else None)
    return unet, scheduler, path


def mean_pairwise_l2(candidates: torch.Tensor) -> float:
    """Mean L2 distance between two candidates of the same anchor, over all pairs and anchors ([B, k, ...])."""
    flat = candidates.flatten(2).float()
    dist = torch.cdist(flat, flat)
    k = flat.shape[1]
    return (dist.sum() / (flat.shape[0] * k * (k - 1))).item()


def share_benchmark(args, device: torch.device, precision: str) -> dict:
    from clsp.datasets import get_dataset

    unet, scheduler, source = load_diversity_model(args.diversity_model, device)
    size = unet.config.sample_size
    dataset = get_dataset("digits", split="train", image_size=size)
    pixels = torch.from_numpy(dataset.array(list(range(args.diversity_anchors))))
    anchors = pixels.permute(0, 3, 1, 2).float().div(127.5).sub(1).to(device)
    result = {"model": source, "anchors": len(anchors), "candidates_per_anchor": args.candidates,
              "sampling_steps": args.diversity_steps, "weight": args.weight}
    now = time.process_time if args.clock == "cpu" else time.perf_counter
    sample_positives(unet, scheduler, anchors, 2, steps=2, precision=precision)  # warm-up
    for share in (False, True):
        def run(share: bool = share) -> torch.Tensor:
            generators = [torch.Generator().manual_seed(i) for i in range(len(anchors))]
            return sample_positives(unet, scheduler, anchors, args.candidates, w=args.weight,
                                    steps=args.diversity_steps, generator=generators, precision=precision,
                                    share_anchor_pass=share)
        start = now()
        out = run()
        seconds = now() - start
        anchor_dist = (out - anchors[:, None]).flatten(2)
        result["shared" if share else "per_candidate"] = {
            "images_per_second": out.shape[0] * out.shape[1] / seconds,
            "mean_pairwise_l2_between_candidates": mean_pairwise_l2(out),
            "mean_l2_to_anchor": anchor_dist.float().norm(dim=-1).mean().item()}
    return result


def print_table(report: dict) -> None:
    bench = report["step"]
    cuda = report["device"].startswith("cuda")
    print(f"\n{bench['config']} U-Net ({bench['parameters'] / 1e6:.1f}M params, {bench['image_size']}px), "
          f"batch {bench['batch_size']}, {report['device']}, {report['precision']}"
          f"{', compiled' if report['compile'] else ''}, {report['threads']} threads, {bench['clock']} clock")
    header = f"{'step':<20}{'img/s':>10}{'ms/step':>10}{'GFLOP/img':>11}{'time x':>8}{'FLOP x':>8}"
    print(header + (f"{'TFLOP/s':>9}{'of peak':>9}" if cuda else ""))
    for name, row in bench["steps"].items():
        line = (f"{name:<20}{row['images_per_second']:>10.1f}{row['seconds_per_step'] * 1e3:>10.1f}"
                f"{row['gflop_per_image']:>11.2f}{row['time_vs_plain']:>8.2f}{row['flops_vs_plain']:>8.2f}")
        if cuda:
            line += f"{row['tflops_per_second']:>9.1f}{row['fraction_of_bf16_peak']:>9.1%}"
        print(line)
    goal = bench["goal"]
    target = (f"time ratio <= {goal['cpu_time_ratio_max']}" if "cpu_time_ratio_max" in goal
              else f">= {goal['gpu_fraction_of_peak_min']:.0%} of {PEAK_BF16_TFLOPS:.0f} TFLOP/s")
    print(f"interpolated / plain: {bench['interpolated_vs_plain_time']:.2f}x time, "
          f"{bench['interpolated_vs_plain_flops']:.2f}x FLOPs (METHOD.md: {FLOP_RATIO_METHOD}); "
          f"goal {target}: {'met' if goal['met'] else 'NOT met'}")
    share = report.get("share_anchor_pass")
    if share:
        print(f"\nshare_anchor_pass on {share['model']}: {share['anchors']} digits anchors x "
              f"{share['candidates_per_anchor']} candidates, {share['sampling_steps']} steps, w={share['weight']}")
        print(f"{'anchor pass':<16}{'img/s':>10}{'pairwise L2':>13}{'L2 to anchor':>14}")
        for name in ("per_candidate", "shared"):
            row = share[name]
            print(f"{name:<16}{row['images_per_second']:>10.1f}{row['mean_pairwise_l2_between_candidates']:>13.3f}"
                  f"{row['mean_l2_to_anchor']:>14.3f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", choices=sorted(IMAGE_SIZES), default="ddpm-cifar", help="U-Net architecture")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default 8 on CPU, 512 on CUDA)")
    parser.add_argument("--candidates", type=int, default=8, help="candidates per anchor (shared-pass step, diversity)")
    parser.add_argument("--weight", type=float, default=0.1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the best is kept")
    parser.add_argument("--iters", type=int, default=None, help="steps per repeat (default 1 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1 on CPU, 10 on CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: time by process CPU time (for busy shared CPUs; use with --threads 1)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the plain U-Net and the interpolated step")
    parser.add_argument("--diversity-model", default=None, help="trained model folder for the diversity measurement")
    parser.add_argument("--diversity-anchors", type=int, default=4)
    parser.add_argument("--diversity-steps", type=int, default=100)
    parser.add_argument("--skip-diversity", action="store_true", help="only time the steps")
    parser.add_argument("--out", default="benchmarks/results/bench_generate.json", help="JSON report")
    args = parser.parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    if on_cuda and args.clock == "cpu":
        parser.error("--clock cpu measures CPU work; use the default wall clock on CUDA")
    args.batch_size = args.batch_size or (512 if on_cuda else 8)
    args.iters = args.iters or (20 if on_cuda else 1)
    args.warmup = args.warmup if args.warmup is not None else (10 if on_cuda else 1)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = resolve_precision(args.precision, device)
    report = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "precision": precision, "compile": args.compile, "torch": torch.__version__,
              "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])}
    report["step"] = step_benchmark(args, device, precision)
    if not args.skip_diversity:
        report["share_anchor_pass"] = share_benchmark(args, device, precision)
    print_table(report)
    write_json_atomic(args.out, report)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
