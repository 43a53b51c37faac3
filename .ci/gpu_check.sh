#!/usr/bin/env bash
# One prepared device check (issues 5-7): benchmarks (eager, CUDA graphs, torch.compile), a short real
# Fashion-MNIST TreeVAE run (clustering), a `fast` run of both stages on the MNIST subset (tree.png, the
# all-leaves figure, FID) and the planner. Every step has its own time limit and writes under OUT.
# Needs the data in data/ (git-ignored, so a device call must carry it):
#   mkdir -p data && cp -r ../shared/data/fashion-mnist ../shared/data/mnist-subset data/
# Usage, from the repository root:       bash .ci/gpu_check.sh OUT_DIR cuda
# Dry run on a CPU (tiny sizes, minutes): OMP_NUM_THREADS=2 bash .ci/gpu_check.sh /tmp/out cpu
OUT=${1:-/tmp/out}; DEV=${2:-cuda}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
PY=python3
step() { echo "== $(date -u +%T) $*" | tee -a "$OUT/steps.txt"; }
( nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null; nproc
  $PY -c "import torch; print('torch', torch.__version__)"; date -u ) > "$OUT/env.txt" 2>&1
if [ "$DEV" = cuda ]; then
  BENCH="--repeat 20"; TV=""; DD=""; PRESET=fast
else   # a CPU dry run: the same commands with tiny sizes
  BENCH="--repeat 2 --ddpm-batch 2 --ddim-images 2 --ddim-steps 2 --feature-batch 2"; PRESET=smoke
  TV="--treevae-epochs-init 1"; DD="--ddpm-max-steps 2"
fi

step "bench: TreeVAE eager and CUDA graphs, DDPM eager, features, data"
timeout ${T_BENCH:-120} $PY bench.py --device $DEV --graphs $BENCH --data-dir data > "$OUT/bench.jsonl" 2>&1
step "bench: DDPM compiled"
timeout ${T_COMPILE:-150} $PY bench.py --device $DEV --compile --only ddpm $BENCH > "$OUT/bench_compile.jsonl" 2>&1

step "Fashion-MNIST, TreeVAE stage, $PRESET preset, CUDA graphs"
timeout ${T_FMNIST:-150} $PY train.py --dataset fashion_mnist --data-dir data/fashion-mnist --preset $PRESET \
  --stage treevae --device $DEV --graphs true --plan false --log-every 200 --out /tmp/run_fmnist $TV > "$OUT/fmnist.log" 2>&1
mkdir -p "$OUT/fmnist" && cp /tmp/run_fmnist/{metrics.json,tree.png} "$OUT/fmnist/" 2>/dev/null

step "MNIST subset, both stages, $PRESET preset, graphs + compiled DDPM, FID of 1,000 samples"
timeout ${T_MNIST:-240} $PY train.py --dataset mnist --data-dir data/mnist-subset --preset $PRESET --device $DEV \
  --graphs true --compile true --plan false --log-every 200 --fid-samples 1000 --out /tmp/run_mnist $TV $DD > "$OUT/mnist.log" 2>&1
timeout 60 $PY sample.py --run /tmp/run_mnist --all-leaves --n 4 --out /tmp/run_mnist/all_leaves_n4.png >> "$OUT/mnist.log" 2>&1
timeout 60 $PY sample.py --run /tmp/run_mnist --all-leaves --n 4 --stage treevae --out /tmp/run_mnist/all_leaves_n4_treevae.png >> "$OUT/mnist.log" 2>&1
mkdir -p "$OUT/mnist" && cp /tmp/run_mnist/{metrics.json,tree.png,samples.png,all_leaves.png,all_leaves_n4.png,all_leaves_n4_treevae.png} "$OUT/mnist/" 2>/dev/null

step "planner: the paper schedule on full MNIST"
timeout ${T_PLAN:-90} $PY bench.py --device $DEV --graphs --compile --plan --dataset mnist > "$OUT/plan.txt" 2>&1
step "done"
cat "$OUT/env.txt" "$OUT/bench.jsonl" "$OUT/bench_compile.jsonl" "$OUT/plan.txt" | grep -v -i warn
grep -E "^\[(test|grow\] stop|finetune\] val)|FID|fid|rror|Traceback" "$OUT/fmnist.log" "$OUT/mnist.log" | tail -20
