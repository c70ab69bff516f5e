#!/usr/bin/env bash
# The Meta-Transformer on Omniglot in the four settings, warm-started on a CPU budget, beside a ProtoNet
# given the same total training time:
#   1. ProtoNet, 5-way 1-shot, P1 minutes                       (the source of the backbone)
#   2. Meta-Transformer from it (train.init_from), backbone at 0.1x the lr, 5-way 1-shot, M1 minutes
#   3. the same model grown to 20 ways (label rows kept, new ones added), 20-way 1-shot, M2 minutes
#   4. ProtoNet continued for M1 more minutes on 5-way, then M2 minutes on 20-way (same total time)
# then every model on 1000 fixed test episodes (15 queries): 5w1s and 5w5s from the 5-way models, 20w1s
# and 20w5s from the 20-way models. Alphabet-level split of the background alphabets (20/5/5).
#
#   scripts/omniglot_mt_warm_start.sh OUT_DIR [P1 M1 M2 EPISODES]
#   scripts/omniglot_mt_warm_start.sh /tmp/mtws 6 6 15 1000
set -euo pipefail
cd "$(dirname "$0")/.."
out=$1 p1=${2:-6} m1=${3:-6} m2=${4:-15} episodes=${5:-1000}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
bin=.venv/bin/metaformer
common=(data.options.split_scheme=alphabets train.meta_batch=8 train.num_threads=1 train.val_every=0
        train.ckpt_every=200 train.progress=false train.log_every=50 optim.schedule=constant optim.warmup_steps=20)
mt=("model.options={d_model: 128, n_layers: 4, n_heads: 4, dropout: 0.0}" "optim.lr_scale={'backbone.': 0.1}")
way20=(data.n_way=20 data.k_shot=1 data.q_query=5 "train.max_minutes=$m2")

$bin train --config training/configs/omniglot_5w1s_protonet.yaml --set "${common[@]}" "train.max_minutes=$p1" \
  "out_dir=$out/protonet_5w" | tail -n 1
cp -r "$out/protonet_5w" "$out/protonet_5w_long"
$bin train --config training/configs/omniglot_5w1s_meta_transformer.yaml --set "${common[@]}" "${mt[@]}" \
  optim.lr=0.001 "train.max_minutes=$m1" "train.init_from=$out/protonet_5w" "out_dir=$out/mt_5w" | tail -n 1
$bin train --config training/configs/omniglot_5w1s_meta_transformer.yaml --set "${common[@]}" "${mt[@]}" "${way20[@]}" \
  optim.lr=0.0005 optim.grad_clip=10.0 "train.init_from=$out/mt_5w" "out_dir=$out/mt_20w" | tail -n 1
# ProtoNet: resume the copy for M1 more minutes (train.max_minutes caps each invocation), then 20-way
$bin train --resume --config "$out/protonet_5w_long/config.yaml" --set "out_dir=$out/protonet_5w_long" \
  "train.max_minutes=$m1" | tail -n 1
$bin train --config training/configs/omniglot_20w1s_protonet.yaml --set "${common[@]}" "${way20[@]}" \
  "train.init_from=$out/protonet_5w_long" "out_dir=$out/protonet_20w" | tail -n 1
for k in 1 5; do
  $bin eval --checkpoint "$out/mt_5w" "$out/protonet_5w_long" --episodes "$episodes" --set "data.k_shot=$k" \
    --out "$out/eval_5w${k}s" --no-progress
  $bin eval --checkpoint "$out/mt_20w" "$out/protonet_20w" --episodes "$episodes" \
    --set data.n_way=20 "data.k_shot=$k" data.q_query=15 --out "$out/eval_20w${k}s" --no-progress
done
