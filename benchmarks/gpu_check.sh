#!/usr/bin/env bash
# The GPU check: neuralign's GPU paths run and are timed, in under 8 minutes on one GPU. For the first machine with
# a GPU; prints ratios and absolute times, and exits 1 if any path errors (or overruns its share of the 8 minutes).
#
#   benchmarks/gpu_check.sh                 # on the GPU (--device cuda)
#   benchmarks/gpu_check.sh --device cpu    # dry run on the CPU: small workloads, the same code paths; its numbers
#                                           # say nothing about a GPU
#
# Checks, each the existing benchmark run with --device (the ratio is the benchmark's own target):
#   1. curve step vs plain training step       benchmarks/bench_curves.py   (TinyTen, ResNet32, VGG16; <= 1.05)
#   2. align vs two evaluation passes          benchmarks/bench_align.py    (ResNet32 x 2, 10,000 inputs; <= 1.5)
#   3. one PAM P-step vs one curve epoch       benchmarks/bench_pam.py      (TinyTen, 40 batches of 128; <= 0.2)
#   4. PGD curve step vs PGD train step        benchmarks/bench_robust.py   (MLP, TinyTen; <= 1.05)
#   5. a study under torchrun on 1 GPU         torchrun --nproc_per_node=1 -m neuralign study --preset demo
#                                              (every kind of stage; NCCL process group; seconds per stage)
#   6. the tests that need CUDA                pytest -m gpu
# Each check has a time limit (their sum is 7.5 minutes); the log of every check is kept in $OUT (default a new
# temporary folder). Environment: PYTHON (default .venv/bin/python if present, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
while [ $# -gt 0 ]; do
    case $1 in
        --device) DEVICE=${2:-}; shift 2 ;;
        --device=*) DEVICE=${1#--device=}; shift ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (expected --device cuda|cpu)" >&2; exit 2 ;;
    esac
done
case $DEVICE in cuda|cpu) ;; *) echo "gpu_check: --device must be cuda or cpu, got '$DEVICE'" >&2; exit 2 ;; esac
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT=${OUT:-$(mktemp -d -t neuralign-gpu-check.XXXXXX)}
mkdir -p "$OUT"

if [ "$DEVICE" = cuda ]; then
    if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: torch sees no CUDA device here (torch.cuda.is_available() is False); run with --device cpu" \
             "for a dry run" >&2
        exit 1
    fi
    "$PYTHON" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'# {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}')"
    # full workloads (GPU seconds); threads only for the host side
    CURVES=(--models tinyten resnet32 vgg16 --repeats 30 --warmup 3 --threads 4)
    ALIGN=(--inputs 10000 --batch-size 500 --repeats 3 --threads 4 --sizes)
    PAM=(--batches 40 --repeats 3 --threads 4)
    ROBUST=(--models mlp tinyten --repeats 20 --threads 4)
    STUDY_SETS=(--set verification.screen_pairs=64 --set verification.n_swaps=4)
else
    echo "# dry run on the CPU: small workloads; the ratios and times below say nothing about a GPU"
    CURVES=(--models tinyten --repeats 2 --batch 32 --threads 1)
    ALIGN=(--inputs 500 --batch-size 250 --repeats 1 --threads 1 --sizes)
    PAM=(--batches 4 --repeats 1 --threads 1)
    ROBUST=(--models mlp --repeats 2 --batch 32 --bn-batches 1 --test-batches 1 --points 2 --threads 1)
    STUDY_SETS=(--set train.epochs=2 --set curve.epochs=2 --set pam.x_epochs=1 --set max_batches=3
                --set evaluation.num_points=3 --set evaluation.plane_grid=3 --set evaluation.max_bn_batches=2
                --set verification.n_swaps=2 --set verification.swap_trials=2 --set verification.screen_pairs=8
                --set verification.screen_examples=32 --set verification.value_batches=2)
fi

declare -a NAMES STATUS TIMES
failed=0

check() {  # check NAME LIMIT_S COMMAND...: run, time, keep the log, show its table
    local name=$1 limit=$2 log="$OUT/$(echo "$1" | tr ' /' '__').log" start end code
    shift 2
    echo
    echo "## $name"
    start=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    code=$?
    end=$(date +%s.%N)
    grep -E '^(\||#|##|stage |[a-z].* [0-9.]+$|total |SKIPPED|[0-9]+ (passed|skipped|failed|deselected))' "$log" \
        | grep -v '^# .*: done' || true
    NAMES+=("$name")
    TIMES+=("$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')")
    if [ $code -eq 0 ]; then
        STATUS+=(ok)
    else
        failed=1
        if [ $code -eq 124 ] || [ $code -eq 137 ]; then STATUS+=("FAILED (over its ${limit} s)"); else STATUS+=("FAILED (exit $code)"); fi
        echo "!! $name failed; the end of its log ($log):"
        tail -n 15 "$log" | sed 's/^/   /'
    fi
}

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
check "curve step vs plain step" 90 "$PYTHON" benchmarks/bench_curves.py --device "$DEVICE" "${CURVES[@]}"
check "align vs two eval passes" 60 "$PYTHON" benchmarks/bench_align.py --device "$DEVICE" "${ALIGN[@]}"
check "P-step vs curve epoch" 45 "$PYTHON" benchmarks/bench_pam.py --device "$DEVICE" "${PAM[@]}"
check "PGD curve step vs PGD train step" 60 "$PYTHON" benchmarks/bench_robust.py --device "$DEVICE" "${ROBUST[@]}"
check "torchrun 1-GPU study" 150 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1 -m neuralign \
    study --preset demo --device "$DEVICE" --quiet --out "$OUT/study" "${STUDY_SETS[@]}"
if [ -f "$OUT/study/manifest.json" ]; then
    "$PYTHON" - "$OUT/study" "$DEVICE" <<'EOF' || { failed=1; STATUS[$((${#STATUS[@]} - 1))]="FAILED (manifest)"; }
import json, sys
out, device = sys.argv[1], sys.argv[2]
manifest = json.load(open(f"{out}/manifest.json"))
run = manifest["runs"][-1]["distributed"]
want = {"world_size": 1, "backend": "nccl" if device == "cuda" else "gloo", "rank": 0}
print(f"# study: device {manifest['device']}, process group {run}")
sys.exit(0 if run == want and manifest["device"].startswith(device) else 1)
EOF
fi
# on the CPU they are collected and skipped (each says why)
check "tests that need CUDA" 45 "$PYTHON" -m pytest -q -rs -m gpu -p no:cacheprovider tests

echo
echo "## summary ($DEVICE; logs in $OUT)"
echo "| check | status | seconds |"
echo "| --- | --- | ---: |"
for i in "${!NAMES[@]}"; do echo "| ${NAMES[$i]} | ${STATUS[$i]} | ${TIMES[$i]} |"; done
exit $failed
