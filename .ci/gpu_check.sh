#!/usr/bin/env bash
# One prepared device check (issue 7): benchmarks, planner, a short real Fashion-MNIST run with figures and FID.
# Needs Fashion-MNIST in data/fashion-mnist/ (copy ../shared/data/fashion-mnist there; data/ is git-ignored, so a
# device call must carry it). Usage, from the repository root:
#   bash .ci/gpu_check.sh OUT_DIR cuda fast --ddpm-epochs 6 --fid-samples 1000 --plan false
# Dry run on a CPU: OMP_NUM_THREADS=1 bash .ci/gpu_check.sh /tmp/out cpu smoke --ddpm-epochs 1 --plan false
OUT=${1:-/tmp/out}; DEV=${2:-cuda}; PRESET=${3:-fast}; shift 3
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
PY=python3
( nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null; $PY -c "import torch; print('torch', torch.__version__)"; date -u ) > "$OUT/env.txt" 2>&1
if [ "$DEV" = cuda ]; then BENCH="--repeat 20"; else BENCH="--repeat 2 --ddpm-batch 2 --ddim-images 2 --ddim-steps 2 --feature-batch 2"; fi
timeout ${T_BENCH:-100} $PY bench.py --device $DEV --graphs $BENCH --data-dir data > "$OUT/bench.jsonl" 2>&1
timeout ${T_PLAN:-40} $PY bench.py --device $DEV --graphs --plan --dataset mnist >> "$OUT/bench.jsonl" 2>&1
timeout ${T_TRAIN:-200} $PY train.py --dataset fashion_mnist --data-dir data --preset $PRESET --device $DEV --graphs true \
  --out /tmp/gpurun --log-every 200 "$@" > "$OUT/train.log" 2>&1
for f in metrics.json tree.png all_leaves.png samples.png; do cp /tmp/gpurun/$f "$OUT/" 2>/dev/null; done
cat "$OUT/env.txt" "$OUT/bench.jsonl"; grep -v "step " "$OUT/train.log" | tail -40
