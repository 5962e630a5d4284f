#!/usr/bin/env bash
# One prepared GPU session (the workplace lends a GPU machine for ~15 minutes per session):
#   0. the CUDA tests (tests/test_meta_cuda.py; CUDA_TESTS=0 skips them, about 15 s);
#   1. the cifar10n-reduced sweep (45 runs) on the GPU, 10 worker processes sharing it;
#   2. if time is left, the same sweep extended with forward_gold, confusion and distillation;
#   3. benchmarks/step_cost.py on the GPU (WRN-40-2 and ResNet-8, the exact meta step vs CE).
# Usage (from the repository root, data root holding cifar10/):
#   DATA=.devdata OUT=/tmp/out SWEEP_SECONDS=300 bash benchmarks/gpu_session.sh
# Results land in $OUT: results.sqlite of the sweep (resumable here with the same command
# and --out pointing at a folder holding it), step_cost_gpu.txt, env.txt.
set -u
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export METACORRECT_CACHE="${METACORRECT_CACHE:-/tmp/metacorrect-cache}"
DATA="${DATA:-.devdata}"
OUT="${OUT:?set OUT to a folder for the results}"
SWEEP="${SWEEP_DIR:-/tmp/sweep-cifar10n-reduced}"
PY="${PYTHON:-python3}"
WORKERS="${WORKERS:-10}"
mkdir -p "$OUT" "$SWEEP"
start=$(date +%s)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  "$PY" -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available())"
  nproc; } | tee "$OUT/env.txt"

if [ "${CUDA_TESTS:-1}" != 0 ]; then
    "$PY" -m pytest -q -p no:cacheprovider tests/test_meta_cuda.py 2>&1 | tail -5 | tee "$OUT/pytest_cuda.txt"
fi

# Decode the CIFAR-10 JPEG archive once, before the workers start (each would decode it).
"$PY" -c "from metacorrect.data import load_dataset; d = load_dataset('cifar10n', '$DATA'); print('cifar10n', tuple(d.x_train.shape))" \
    || exit 1
echo "decoded after $(( $(date +%s) - start )) s"

# SIGINT lets the sweep stop its workers; the interrupted runs go back to pending.
timeout -s INT -k 20 "${SWEEP_SECONDS:-300}" "$PY" -m metacorrect sweep cifar10n-reduced --out "$SWEEP" \
    --workers "$WORKERS" --threads 1 --discard-models --data-dir "$DATA" \
    --set methods=mlc,glc,forward,ce,trusted_only  # the preset's methods, longest runs first
left=$(( ${SWEEP_SECONDS:-300} - ($(date +%s) - start) ))
if [ "$left" -gt 60 ]; then
    timeout -s INT -k 20 "$left" "$PY" -m metacorrect sweep cifar10n-reduced --out "$SWEEP" \
        --workers "$WORKERS" --threads 1 --discard-models --data-dir "$DATA" \
        --set methods=mlc,glc,forward,ce,trusted_only,forward_gold,confusion,distillation
fi
"$PY" -m metacorrect sweep cifar10n-reduced --out "$SWEEP" --limit 0 --data-dir "$DATA" \
    --set methods=mlc,glc,forward,ce,trusted_only,forward_gold,confusion,distillation
cp "$SWEEP/results.sqlite" "$SWEEP/sweep.json" "$OUT/"
echo "sweep part done after $(( $(date +%s) - start )) s"

if [ "${STEP_SECONDS:-100}" -gt 0 ]; then  # STEP_SECONDS=0: no timing
    timeout -k 10 "${STEP_SECONDS:-100}" "$PY" benchmarks/step_cost.py --device cuda --models wrn40_2 resnet8 \
        --steps 20 --warmup 5 2>&1 | tee "$OUT/step_cost_gpu.txt"
fi
echo "all done after $(( $(date +%s) - start )) s"
