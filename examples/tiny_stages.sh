#!/usr/bin/env bash
# The tiny omni model through M2-omni's staged recipe (paper Table 2: PT-1 -> PT-2 -> PT-3 -> IT-1 ->
# IT-2 -> IT-3 -> AT), with Uni-MoE 2.0's GSPO stage between IT-3 and AT ("GSPO followed by DPO"),
# on the bundled demo data set, at TP2 x PP2 on 4 emulated ranks (CPU) or 4 GPUs.
#
#   bash tools/setup_env.sh bash examples/tiny_stages.sh [section.key=value ...]
#
# Builds the demo data (tools/make_demo_data.py, deterministic, < 1 MB) into $OUT/demo_data, then
# runs each stage from configs/tiny/stages/ starting from the previous stage's last checkpoint.
# Re-running resumes: a finished stage is skipped by megatron's own checkpoint logic (its step
# count is reached), an interrupted one continues from its last checkpoint.
# Env: OUT (default runs/tiny_stages), NPROC (4), TP (2), PP (2), STAGES ("pt1 pt2 pt3 it1 it2 it3 gspo at"),
# INIT_CHECKPOINT (an omni checkpoint the first stage starts from, e.g. an omni-from-hf import; default: scratch).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-runs/tiny_stages}
NPROC=${NPROC:-4}
TP=${TP:-2}
PP=${PP:-2}
STAGES=${STAGES:-"pt1 pt2 pt3 it1 it2 it3 gspo at"}

[[ -f "$OUT/demo_data/manifests/rlqa_text.jsonl" ]] || python tools/make_demo_data.py --out "$OUT/demo_data"
prev=""
for stage in $STAGES; do
    echo "=== stage $stage ==="
    init=${INIT_CHECKPOINT:-}
    [[ -n $prev ]] && init="$OUT/$prev/checkpoints"
    torchrun --standalone --nproc_per_node "$NPROC" -m megatron_omni.train --config "configs/tiny/stages/$stage.yaml" \
        data.root="$OUT/demo_data" parallel.tp="$TP" parallel.pp="$PP" \
        train.output_dir="$OUT/$stage" train.load="$OUT/$stage/checkpoints" \
        train.pretrained_checkpoint="$init" "$@"
    [[ $stage == gspo ]] && python tools/gspo_rewards.py "$OUT/gspo/metrics.jsonl"  # the reward per rollout batch
    prev=$stage
done
echo "per-stage metrics: $OUT/<stage>/metrics.jsonl (losses per modality, modality_weights, val_losses)"
