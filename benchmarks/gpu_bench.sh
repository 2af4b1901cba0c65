#!/usr/bin/env bash
# The GPU measurements in one call, under 8 minutes in all, on a machine that has torch but no network:
#   data path per core (bench_datapath), generation step rates and achieved TFLOP/s of the DDPM CIFAR-10
#   U-Net against the 790 TFLOP/s bf16 peak of an H200 (eager, then compiled), and training through the
#   trainer's own step fed from a device-resident set: projected and measured CIFAR-10-sized epochs
#   (eager, then compiled).
#
#   python benchmarks/build_wheelhouse.py       # beforehand, with the network: .whl/ (under 60 MiB)
#   bash benchmarks/gpu_bench.sh [--cpu] [RESULTS_DIR]
#
# Unless clsp and its stage packages already import, the wheelhouse is installed with
# `pip --no-index --no-deps --target` into a temporary folder put on PYTHONPATH: the machine's torch
# is left untouched and nothing is fetched from the network. Without CUDA (or with --cpu) every step runs at CPU
# sizes, which proves the whole run anywhere. Each step writes its own JSON (a step cut short by its
# time share leaves the others), then a summary: RESULTS_DIR/gpu_bench_<cuda|cpu>.json.
set -uo pipefail
cd "$(dirname "$0")/.."
cpu=0
out=benchmarks/results
for arg in "$@"; do
    case $arg in
        --cpu) cpu=1 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) out=$arg ;;
    esac
done
python=${PYTHON:-python3}
budget=${GPU_BENCH_BUDGET_S:-480}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
mkdir -p "$out"
imports() { (cd / && "$python" -c "$1"); }  # not from here: the source folder clsp/ would shadow the package

if ! imports "import clsp.train.trainer, clsp.generate, kornia" 2>/dev/null; then
    ls .whl/*.whl >/dev/null 2>&1 \
        || { echo "!! no wheelhouse in .whl/: run python benchmarks/build_wheelhouse.py first"; exit 2; }
    site=$(mktemp -d)
    trap 'rm -rf "$site"' EXIT
    echo "== installing $(ls .whl/*.whl | wc -l) wheels from .whl/ (no index, no dependencies) into a temporary folder"
    "$python" -m pip install --quiet --no-index --no-deps --disable-pip-version-check --target "$site" .whl/*.whl \
        || { echo "!! offline install from .whl/ failed (built for another Python? see .whl/wheelhouse.json)"; exit 2; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
imports "import torch, diffusers, kornia, faiss, webdataset, clsp.train.trainer; print('torch', torch.__version__, \
'diffusers', diffusers.__version__, 'kornia', kornia.__version__, 'cuda', torch.cuda.is_available())" \
    || { echo "!! the benchmarks' packages do not import"; exit 2; }
if [ "$cpu" = 0 ] && ! imports "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "== no CUDA device: CPU sizes"
    cpu=1
fi

if [ "$cpu" = 1 ]; then
    tag=cpu
    datapath=(--device cpu --anchors 256 --repeats 1)
    generate=(--device cpu --config tiny --batch-size 4 --candidates 2 --repeats 1 --threads 1)
    train=(--device cpu --precision fp32 --batch-size 8)
    shares=(60 60 90 200 90)  # seconds for: datapath, generate, train, generate-compiled, train-compiled
else
    tag=cuda
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    datapath=(--device cuda --anchors 2048 --batch-size 512 --repeats 1)
    generate=(--device cuda --config ddpm-cifar --batch-size 512)
    train=(--device cuda --batch-size 512)
    shares=(45 70 90 160 100)
fi

run() {  # run SHARE_S NAME COMMAND...: at most SHARE_S seconds, and never past the whole budget
    local share=$1 name=$2 left=$((budget - SECONDS))
    shift 2
    ((share > left)) && share=$left
    if ((share < 10)); then echo "!! $name skipped: the ${budget} s budget is spent"; return; fi
    echo "== $name (at most ${share} s)"
    timeout "$share" "$@" || echo "!! $name failed or ran out of its ${share} s"
}
run "${shares[0]}" datapath "$python" benchmarks/bench_datapath.py "${datapath[@]}" --out "$out/bench_datapath_$tag.json"
run "${shares[1]}" generate "$python" benchmarks/bench_generate.py "${generate[@]}" --skip-diversity \
    --out "$out/bench_generate_$tag.json"
run "${shares[2]}" train "$python" benchmarks/bench_train.py "${train[@]}" --out "$out/bench_train_$tag.json"
run "${shares[3]}" generate-compiled "$python" benchmarks/bench_generate.py "${generate[@]}" --skip-diversity --compile \
    --out "$out/bench_generate_${tag}_compile.json"
run "${shares[4]}" train-compiled "$python" benchmarks/bench_train.py "${train[@]}" --compile \
    --out "$out/bench_train_${tag}_compile.json"

"$python" - "$out" "$tag" "$SECONDS" <<'EOF'
"""One summary of whatever steps finished."""
import json, sys
from pathlib import Path

out, tag, seconds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
summary = {"device": tag, "seconds": seconds, "steps": {}}
for name in ("datapath", "generate", "generate_compile", "train", "train_compile"):
    stem, _, variant = name.partition("_")
    path = out / f"bench_{stem}_{tag}{'_' + variant if variant else ''}.json"
    if not path.is_file():
        print(f"{name:18s} (no result)")
        continue
    report = json.loads(path.read_text())
    if stem == "datapath":
        row = {r["part"]: round(r["anchors_per_s"]) for r in report["rows"] if r["end_to_end"]}
    elif stem == "generate":
        step = report["step"]["steps"]["interpolated"]
        row = {"interpolated_images_per_s": round(step["images_per_second"], 1),
               "tflops_per_s": round(step["tflops_per_second"], 2),
               "fraction_of_bf16_peak": step.get("fraction_of_bf16_peak")}
    else:
        row = {r["method"]: {"projected_s": round(r["projected_cifar10_epoch_s"], 1),
                             "measured_s": round(r["measured_cifar10_epoch_s"], 1)} for r in report["rows"]}
    summary["steps"][name] = row
    print(f"{name:18s} {json.dumps(row)}")
(out / f"gpu_bench_{tag}.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
print(f"wrote {out / f'gpu_bench_{tag}.json'} after {seconds} s")
EOF
