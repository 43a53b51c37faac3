#!/usr/bin/env bash
# One prepared device check (issues 5-7): benchmarks (eager, CUDA graphs, torch.compile), a short real
# Fashion-MNIST TreeVAE run (clustering), a `fast` run of both stages on the MNIST subset (tree.png, the
# all-leaves figure, FID) and the planner. Every step has its own time limit and writes under OUT.
# Needs the data in data/ (git-ignored, so a device call must carry it):
#   mkdir -p data && cp -r ../shared/data/fashion-mnist ../shared/data/mnist-subset data/
# Usage, from the repository root:       bash .ci/gpu_check.sh OUT_DIR cuda [all|bench|mnist|fmnist]
# Dry run on a CPU (tiny sizes, minutes): OMP_NUM_THREADS=2 bash .ci/gpu_check.sh /tmp/out cpu
# On an H100 (2026-11-26): bench ~3.5 min, mnist ~5 min (+~1.5 min estimated, not
# measured: figures and FID now use the 1,000-step ancestral sampler), fmnist ~4 min; a device call may run 10 min, so call the parts one by one. A call returns at most 8 files: figures come back packed
# in figs_<part>.tgz.
OUT=${1:-/tmp/out}; DEV=${2:-cuda}; PART=${3:-all}
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
  TV=""; DD="--ddpm-max-steps 2"
fi

if [ "$PART" = all ] || [ "$PART" = bench ]; then
step "bench: TreeVAE eager and CUDA graphs, DDPM eager, features, data"
timeout ${T_BENCH:-80} $PY bench.py --device $DEV --graphs $BENCH --data-dir data > "$OUT/bench.jsonl" 2>&1
step "bench: DDPM compiled"
timeout ${T_COMPILE:-130} $PY bench.py --device $DEV --compile --only ddpm $BENCH > "$OUT/bench_compile.jsonl" 2>&1
step "planner: the paper schedule on full MNIST (CUDA graphs, compiled DDPM)"
timeout ${T_PLAN:-60} $PY bench.py --device $DEV --graphs --compile --plan --dataset mnist > "$OUT/plan.txt" 2>&1

fi

if [ "$PART" = all ] || [ "$PART" = mnist ]; then
# Eager U-Net: compiling costs ~80 s and saves ~9 % of a 100 s stage, so a short run is faster without it.
step "MNIST subset, both stages, $PRESET preset, CUDA graphs, FID of 1,000 samples"
R=runs/mnist_fast_gpu
timeout ${T_MNIST:-400} $PY train.py --dataset mnist --data-dir data/mnist-subset --preset $PRESET --device $DEV \
  --graphs true --plan false --log-every 200 --fid-samples 1000 --out $R $TV $DD > "$OUT/mnist.log" 2>&1
# train.py drew all_leaves.png with the default ancestral sampler; DDIM beside it (fragile on a short CPU run)
timeout 60 $PY sample.py --run $R --all-leaves --n 4 --sampler ddim >> "$OUT/mnist.log" 2>&1
timeout 60 $PY sample.py --run $R --all-leaves --n 4 --stage treevae >> "$OUT/mnist.log" 2>&1
tar czf "$OUT/figs_mnist.tgz" $R/*.png $R/metrics.json 2>/dev/null
fi

if [ "$PART" = all ] || [ "$PART" = fmnist ]; then
step "Fashion-MNIST, TreeVAE stage, epochs 12/6/3/12, CUDA graphs"
R=runs/fmnist_gpu
timeout ${T_FMNIST:-280} $PY train.py --dataset fashion_mnist --data-dir data/fashion-mnist --preset $PRESET \
  --stage treevae --device $DEV --graphs true --plan false --log-every 200 --out $R $TV \
  --treevae-epochs-init 12 --treevae-epochs-subtree 6 --treevae-epochs-intermediate 3 --treevae-epochs-finetune 12 \
  > "$OUT/fmnist.log" 2>&1
tar czf "$OUT/figs_fmnist.tgz" $R/*.png $R/metrics.json 2>/dev/null
fi
step "done"
cat "$OUT"/env.txt "$OUT"/bench*.jsonl "$OUT"/plan.txt 2>/dev/null | grep -v -i warn | cut -c1-400
grep -h -E "^\[(test|fid)|rror|Traceback|warning" "$OUT"/*.log 2>/dev/null | cut -c1-300 | tail -20
