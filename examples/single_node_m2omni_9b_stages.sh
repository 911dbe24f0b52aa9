#!/usr/bin/env bash
# The M2-omni-9B stage chain (paper Table 2: PT-1 -> ... -> IT-3 -> AT, with Uni-MoE 2.0's GSPO before AT:
# "GSPO followed by DPO") on one 8 x H100 node without SLURM: torchrun
# per stage, each initialised from the previous stage's last checkpoint.  Rerunning the command continues
# where it stopped: finished stages (training_complete.json) are skipped, a stopped one resumes from its
# latest checkpoint.
#
#   bash examples/single_node_m2omni_9b_stages.sh [section.key=value ...]
#
# Environment: RUNS (output root, default ./runs), NPROC (default 8), STAGES (default
# "pt1 pt2 pt3 it1 it2 it3 gspo at"; drop gspo for the paper's chain: it needs verifiable-QA manifests), INIT_CHECKPOINT (an omni checkpoint
# PT-1 starts from; default: from scratch).  Set data.root and data.tokenizer_model in
# configs/m2omni_9b/stages/base.yaml first.
#
# The plan the layout comes from (a prediction, NOT YET MEASURED):
#   python tools/plan.py --chain configs/m2omni_9b/stages/{pt1,pt2,pt3,it1,it2,it3,at}.yaml --nodes 1
#   -> tp=4 (configs/m2omni_9b/stages/base.yaml): 17-53 GiB per GPU, 9271 tokens/s/GPU and 55% MFU in PT-3.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

RUNS="$(realpath -m "${RUNS:-runs}")"
NPROC="${NPROC:-8}"
export CUDA_DEVICE_MAX_CONNECTIONS=1          # megatron-core TP/SP communication ordering
export TORCH_NCCL_AVOID_RECORD_STREAMS=1
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

prev=""
for stage in ${STAGES:-pt1 pt2 pt3 it1 it2 it3 gspo at}; do
    out="$RUNS/m2omni_9b/$stage"
    if [[ -f "$out/training_complete.json" ]]; then
        echo "$stage: done ($out/training_complete.json), skipping"
        prev=$stage
        continue
    fi
    args=("train.output_dir=$out" "train.load=$out/checkpoints")
    if [[ -n $prev ]]; then
        args+=("train.pretrained_checkpoint=$RUNS/m2omni_9b/$prev/checkpoints")
    elif [[ -n ${INIT_CHECKPOINT:-} ]]; then
        args+=("train.pretrained_checkpoint=$INIT_CHECKPOINT")
    fi
    echo "$stage: configs/m2omni_9b/stages/$stage.yaml -> $out"
    torchrun --standalone --nnodes 1 --nproc_per_node "$NPROC" \
        -m megatron_omni.train --config "configs/m2omni_9b/stages/$stage.yaml" "${args[@]}" "$@"
    if [[ ! -f "$out/training_complete.json" ]]; then
        echo "$stage stopped before train.steps (checkpoint kept); rerun this command to continue" >&2
        exit 1
    fi
    prev=$stage
done
