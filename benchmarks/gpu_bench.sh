#!/usr/bin/env bash
# The GPU measurements in one prepared run (about 5 minutes on one H100/H200-class GPU):
# generation step rates and achieved TFLOP/s on the DDPM CIFAR-10 U-Net (eager and compiled, bf16),
# then training throughput for ResNet-18 at 32x32 (device augmentation, bf16, eager and compiled).
#   bash benchmarks/gpu_bench.sh [RESULTS_DIR]        # default benchmarks/results
# Needs clsp installed (pip install -e .[gpu]) on a CUDA machine. Each step writes its own JSON, so a
# run cut short still leaves the finished measurements behind.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee -a "$out/gpu.txt"

run() { echo "== $*"; timeout "${STEP_TIMEOUT:-240}" "$@" || echo "!! failed or timed out: $*"; }
run python benchmarks/bench_generate.py --device cuda --config ddpm-cifar --batch-size 512 --skip-diversity \
    --out "$out/bench_generate_cuda.json"
run python benchmarks/bench_train.py --device cuda --batch-size 512 --workers 8 --anchors 8192 \
    --out "$out/bench_train_cuda.json"
run python benchmarks/bench_generate.py --device cuda --config ddpm-cifar --batch-size 512 --skip-diversity --compile \
    --out "$out/bench_generate_cuda_compile.json"
run python benchmarks/bench_train.py --device cuda --batch-size 512 --workers 8 --anchors 8192 --compile \
    --out "$out/bench_train_cuda_compile.json"
