#!/usr/bin/env bash
# The GPU check in one call, sized for a GPU machine lent for 15 minutes in all (its start and the install
# included) with time left to run it a second time: about 5 minutes of rows on the card, each measured at
# the presets' settings (benchmarks/gpu_check.py says what each row is).
#
#   python benchmarks/build_wheelhouse.py          # beforehand, where pip works: .whl/ (cp312, under 60 MiB)
#   bash benchmarks/gpu_bench.sh [--cpu] [RESULTS_DIR]
#
# 1. preflight (seconds): Python, torch, torchvision, CUDA, the card and the missing packages; it stops in
#    one line when this environment cannot work (a Python or torch the wheelhouse was not built for).
# 2. the missing packages from the wheelhouse, offline (--no-index --no-deps) into a temporary folder on
#    PYTHONPATH, the machine's own torch untouched: all in one pip call, and where that fails one wheel at a
#    time, so one unfit wheel costs only what needs it. clsp itself is this working tree (linked, not built).
# 3. the rows, each its own process under its own time share and never past the whole budget; each adds its
#    measurements to RESULTS_DIR/gpu_check_<cuda|cpu>.json as soon as they are taken, so a row cut short
#    leaves every earlier one. The compiled rows come last.
#
# --cpu (or a machine without CUDA) runs the same at CPU sizes, a couple of minutes on one thread: the dry
# run that proves the script before a GPU is spent on it. Environment: PYTHON (default python3),
# WHEELHOUSE (default .whl), GPU_BENCH_BUDGET_S (default 300).
set -uo pipefail
cd "$(dirname "$0")/.."
cpu=0
out=benchmarks/results
for arg in "$@"; do
    case $arg in
        --cpu) cpu=1 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) out=$arg ;;
    esac
done
python=${PYTHON:-python3}
wheels=${WHEELHOUSE:-.whl}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
mkdir -p "$out"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

"$python" benchmarks/preflight.py --wheelhouse "$wheels" || exit 2
if ! (cd / && "$python" -c "import clsp.train.trainer") 2>/dev/null; then
    site=$scratch/site
    mkdir -p "$site/clsp"
    for entry in clsp/*; do ln -s "$PWD/$entry" "$site/clsp/"; done  # the package as setuptools maps it
    for stage in generate shards train evaluate; do ln -s "$PWD/$stage" "$site/clsp/$stage"; done
    if ls "$wheels"/*.whl >/dev/null 2>&1; then
        pip=("$python" -m pip install --quiet --no-index --no-deps --no-compile --disable-pip-version-check)
        echo "== installing $(ls "$wheels"/*.whl | wc -l) wheels from $wheels (no index, no dependencies)"
        if ! "${pip[@]}" --target "$site" "$wheels"/*.whl; then
            echo "!! the install in one call failed: one wheel at a time"
            for wheel in "$wheels"/*.whl; do
                "${pip[@]}" --upgrade --target "$site" "$wheel" || echo "!! not installed: $(basename "$wheel")"
            done
        fi
    fi
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$python" benchmarks/preflight.py --imports || exit 2

if [ "$cpu" = 0 ] && ! (cd / && "$python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"); then
    echo "== no CUDA device: CPU sizes"
    cpu=1
fi
if [ "$cpu" = 1 ]; then
    tag=cpu
    flag=(--cpu)
    budget=${GPU_BENCH_BUDGET_S:-300}
    shares=(data:30 gemm:20 ops:60 sample:45 train:90 loader:30 faiss:20 sample-compiled:15 train-compiled:15)
else
    tag=cuda
    flag=()
    budget=${GPU_BENCH_BUDGET_S:-300}
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    shares=(data:45 gemm:15 ops:30 sample:45 train:100 loader:20 faiss:10 sample-compiled:60 train-compiled:50)
fi
report=$out/gpu_check_$tag.json
rm -f "$report"
start=$SECONDS
for entry in "${shares[@]}"; do
    row=${entry%%:*}
    share=${entry##*:}
    left=$((budget - (SECONDS - start)))
    ((share > left)) && share=$left
    if ((share < 5)); then echo "!! $row skipped: the ${budget} s budget is spent"; continue; fi
    echo "== $row (at most ${share} s)"
    timeout --kill-after=5 "$share" "$python" benchmarks/gpu_check.py "$row" "${flag[@]}" --out "$report" \
        --data "$scratch/data" || echo "!! $row failed or ran out of its ${share} s"
done
"$python" benchmarks/gpu_check.py summary --out "$report"
echo "wrote $report after $((SECONDS - start)) s of rows"
