#!/usr/bin/env bash
# Time-boxed Omniglot comparison on a CPU: every method meta-trains for the same wall-clock budget on the
# alphabet-level split of the background alphabets (20 train / 5 val / 5 test, rotations as classes), then
# all are evaluated on the same fixed test episodes (mean and 95% CI) in one table.
#
#   scripts/omniglot_time_boxed.sh OUT_DIR WAYS SHOTS MINUTES EPISODES METHOD [METHOD ...]
#   scripts/omniglot_time_boxed.sh /tmp/omni5w1s 5 1 8 1000 protonet maml fomaml
#
# The budget is far below the published training runs (tens of thousands of steps), so these figures
# measure what each method learns in MINUTES of 1-thread CPU time, not its converged accuracy. Methods
# that adapt by gradient steps train with 1 inner step and evaluate with 3 (MAML, FOMAML, Meta-SGD; ANIL
# keeps 5 / 10, its inner loop is on the linear head only) and every method uses a meta-batch of 8 and a
# constant learning rate after 20 warm-up steps, so that enough outer steps fit in the budget.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$1 ways=$2 shots=$3 minutes=$4 episodes=$5
shift 5
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
bin=.venv/bin/metaformer
common=(data.options.split_scheme=alphabets "data.n_way=$ways" "data.k_shot=$shots" "train.max_minutes=$minutes"
        train.meta_batch=8 train.num_threads=1 train.val_every=0 train.ckpt_every=200 train.progress=false
        train.log_every=50 optim.schedule=constant optim.warmup_steps=20)
runs=()
for m in "$@"; do
  case $m in
    maml|fomaml) opts=("model.options={inner_steps: 1, eval_inner_steps: 3, inner_lr: 0.4}") ;;
    metasgd) opts=("model.options={inner_steps: 1, eval_inner_steps: 1, inner_lr: 0.4}") ;;
    meta_transformer) opts=("model.options={d_model: 128, n_layers: 4, n_heads: 4, dropout: 0.0}" optim.lr=0.001) ;;
    *) opts=() ;;
  esac
  echo "== $m: training for $minutes min" >&2
  $bin train --config "training/configs/omniglot_${ways}w1s_${m}.yaml" \
    --set "${common[@]}" "out_dir=$out/runs/$m" "${opts[@]}" 2>&1 | tail -n 2
  runs+=("$out/runs/$m")
done
$bin eval --checkpoint "${runs[@]}" --episodes "$episodes" --out "$out" --no-progress
