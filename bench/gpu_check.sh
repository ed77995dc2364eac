#!/usr/bin/env bash
# One pass over the GPU checks, in order of value, each step bounded by its own time limit so that a short loan of
# a GPU machine always brings back what finished (the defaults add up to about 12 minutes):
#
#   0. memcheck  compute-sanitizer over one small Titans-memory and HOPE main-memory call per shape that has crashed a
#                GPU (bench/gpu_memcheck.py): the kernel and source line of an illegal access
#   1. kernels   the GPU kernel tests (pytest -m gpu tests/kernels): Triton vs the fp32 reference at the paper widths
#   2. train     bench_train_step.py: Transformer++ and HOPE at 340m, T = 4096, eager (then the other families)
#   3. kbench    python -m bench.ops: Titans memory, then the delta rule, against titans-pytorch and fla when
#                importable
#   4. hope340m  a few dozen steps of recipes/hope/340m.yaml on one GPU under bf16-mixed through the real command
#                line, then a resume from its last checkpoint for a few more steps
#
#     OUT=/some/folder bash bench/gpu_check.sh [STEP ...]      # default: all five, in that order
#
# Everything lands in $OUT: summary.txt (one line per step: exit code, seconds), <step>.log, the benchmarks' results
# files, and results.tar.gz (all of it, refreshed after each step). PY picks the interpreter (default python3);
# <STEP>_LIMIT overrides a step's seconds (KERNELS_LIMIT=150 ...), HOPE_RECIPE and HOPE_ARGS the training run's
# recipe and extra overrides (a CPU rehearsal: HOPE_RECIPE=recipes/hope/tiny.yaml HOPE_ARGS="trainer.accelerator=cpu ..."). Optional peers (fla, titans-pytorch) are only
# used when importable; nothing here downloads.
set -u
OUT=${OUT:-bench/results/gpu-check}
PY=${PY:-python3}
mkdir -p "$OUT"
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MLFLOW_DISABLE_TELEMETRY=true PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export NLPLATFORM_CACHE=${NLPLATFORM_CACHE:-$PWD/.cache/nlplatform}
export TRITON_CACHE_DIR=$WORK/triton TORCHINDUCTOR_CACHE_DIR=$WORK/inductor HF_HOME=$WORK/hf MPLCONFIGDIR=$WORK/mpl

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())" 2>&1
} >"$OUT/summary.txt"

pack() { tar -C "$OUT" --exclude results.tar.gz -czf "$WORK/results.tar.gz" . && mv "$WORK/results.tar.gz" "$OUT/"; }

step() {  # step NAME DEFAULT_SECONDS COMMAND...
  local name=$1 limit_var limit start rc
  limit_var=$(echo "${name}_LIMIT" | tr '[:lower:]' '[:upper:]')
  limit=${!limit_var:-$2}
  shift 2
  start=$(date +%s)
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/$name.log"
  timeout -k 15 "$limit" bash -c "$*" >>"$OUT/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $(($(date +%s) - start))s$([ $rc = 124 ] && echo ' (time limit)')" | tee -a "$OUT/summary.txt"
  pack
}

memcheck() {  # each shape in its own process: an illegal access poisons the CUDA context
  local sanitizer shape
  sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  for shape in "--seq-len 256 --chunk 64 --head-dim 64" "--seq-len 511 --chunk 64 --head-dim 128" \
    "--seq-len 511 --chunk 16 --head-dim 128" "--op hope --seq-len 511 --chunk 16 --head-dim 128" \
    "--op hope --seq-len 256 --chunk 64 --head-dim 64" "--seq-len 256 --chunk 64 --head-dim 64 --prec tf32" \
    "--seq-len 256 --chunk 64 --head-dim 64 --prec ieee"; do
    echo "-- $shape"
    timeout 45 "$sanitizer" --tool memcheck --print-limit 3 $PY bench/gpu_memcheck.py $shape || echo "FAILED: $shape"
  done
}

kernels() {  # a per-test limit where pytest-timeout is installed, so one hung kernel does not take the step
  local per_test=()
  $PY -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout=100)
  $PY -m pytest "${per_test[@]}" -q -m gpu tests/kernels -p no:cacheprovider --maxfail=8 --durations=25 -o addopts="" -rfEs
}

train() {  # the headline pair first, each case written as soon as it is measured (a second call continues)
  $PY bench/bench_train_step.py --families transformer,hope --seq-lens 4096 --compile off --steps 5 --out "$OUT" &&
    $PY bench/bench_train_step.py --seq-lens 4096 --compile off --steps 5 --out "$OUT"
}

kbench() {
  $PY -m bench.ops --ops titans_memory --repeats 5 --out "$OUT" &&
    $PY -m bench.ops --ops delta_rule --repeats 5 --out "$OUT"
}

hope340m() {  # the real training path: bf16-mixed, one GPU, batch 1 x 4096 (batch 2 ran out of an H200's 140 GB),
  # checkpoint at step 10, then resumed to step 16
  local common=("${HOPE_RECIPE:-recipes/hope/340m.yaml}" trainer.devices=1 trainer.strategy=auto trainer.precision=bf16-mixed
    trainer.accumulate_grad_batches=1 trainer.val_check_interval=10 trainer.log_every_n_steps=1
    trainer.enable_progress_bar=false optim.warmup_steps=5 data.batch_size=1 data.val_batches=2
    tracking.enabled=false "output_dir=$WORK/runs" tracking.run_name=gpu-check ${HOPE_ARGS:-})
  $PY -m nlplatform train "${common[@]}" trainer.max_steps=10 || return
  local ckpt
  ckpt=$(ls "$WORK"/runs/*/gpu-check*/checkpoints/last.ckpt | head -1)
  cp "$(dirname "$(dirname "$ckpt")")"/*.json "$OUT/" 2>/dev/null
  $PY -m nlplatform train "${common[@]}" trainer.max_steps=16 "trainer.resume=$ckpt" tracking.run_name=gpu-check-resumed
}

export OUT PY WORK
export -f memcheck kernels train kbench hope340m
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(memcheck kernels train kbench hope340m)
for s in "${steps[@]}"; do
  case $s in
    memcheck) step memcheck 150 memcheck ;;
    kernels) step kernels 200 kernels ;;
    train) step train 100 train ;;
    kbench) step kbench 120 kbench ;;
    hope340m) step hope340m 120 hope340m ;;
    *) echo "unknown step: $s (memcheck, kernels, train, kbench, hope340m)" >&2; exit 2 ;;
  esac
done
rm -rf "$WORK"
