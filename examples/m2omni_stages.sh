#!/usr/bin/env bash
# Submit the M2-omni stage chain (paper Table 2: PT-1 -> PT-2 -> PT-3 -> IT-1 -> IT-2 -> IT-3 -> AT, with
# Uni-MoE 2.0's GSPO stage before AT: "a two-stage RL framework, GSPO followed by DPO") as SLURM
# jobs of examples/slurm_train.sbatch; each stage starts when the previous one has finished (afterok) and
# initialises from its last checkpoint (train.pretrained_checkpoint).  Preempted or timed-out stages requeue
# themselves and resume, so the chain needs no babysitting.
#
#   bash examples/m2omni_stages.sh 72b [section.key=value ...]     # 16 nodes x 8 H100
#   bash examples/m2omni_stages.sh 9b  [section.key=value ...]     # 1 node x 8 H100
#
# Environment: RUNS (output root, default ./runs), NODES (default: the plan's), FROM_STAGE (resubmit the
# chain from a later stage, e.g. it1), STAGES (default "pt1 pt2 pt3 it1 it2 it3 gspo at"; drop gspo for
# the paper's chain; GSPO needs verifiable-QA manifests with rewards, configs/data/gspo.yaml), INIT_CHECKPOINT (an omni checkpoint PT-1 starts from; default: from
# scratch), plus what slurm_train.sbatch reads (CONTAINER_IMAGE, MAX_RESTARTS, NCCL settings).
# Before the first run set data.root and data.tokenizer_model in configs/m2omni_<size>/stages/base.yaml.
#
# The plans the layouts come from (predictions, NOT YET MEASURED on a cluster):
#   72b: python tools/plan.py --chain configs/m2omni_72b/stages/{pt1,pt2,pt3,it1,it2,it3,at}.yaml --nodes 16
#        -> tp=8,pp=2,vpp=5 + encoder recompute (configs/m2omni_72b/stages/base.yaml): 34-65 GiB per GPU,
#           1176 tokens/s/GPU and 54% MFU in PT-3, every stage >= 94.8% of its own best layout.
#   9b:  python tools/plan.py --chain configs/m2omni_9b/stages/{pt1,pt2,pt3,it1,it2,it3,at}.yaml --nodes 1
#        -> tp=4 (configs/m2omni_9b/stages/base.yaml): 17-53 GiB per GPU, 9271 tokens/s/GPU and 55% MFU in
#           PT-3, every stage >= 93.6% of its own best layout.
# Another node count: re-run the plan with your --nodes and pass its "Launch #1 with" overrides after the size.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SIZE="${1:-}"
case "$SIZE" in
    72b) PLAN_NODES=16 ;;
    9b) PLAN_NODES=1 ;;
    *) echo "usage: bash examples/m2omni_stages.sh 72b|9b [section.key=value ...]" >&2; exit 2 ;;
esac
shift
NODES="${NODES:-$PLAN_NODES}"
RUNS="$(realpath -m "${RUNS:-runs}")"
read -r -a STAGES <<< "${STAGES:-pt1 pt2 pt3 it1 it2 it3 gspo at}"
FROM_STAGE="${FROM_STAGE:-pt1}"
if [[ " ${STAGES[*]} " != *" $FROM_STAGE "* ]]; then
    echo "error: FROM_STAGE=$FROM_STAGE is not one of ${STAGES[*]}" >&2
    exit 2
fi
if [[ "$NODES" != "$PLAN_NODES" ]]; then
    echo "warning: the layout in configs/m2omni_$SIZE/stages/base.yaml was planned for $PLAN_NODES node(s);" \
         "for $NODES run: python tools/plan.py --chain configs/m2omni_$SIZE/stages/*.yaml --nodes $NODES" >&2
fi

prev_stage="" prev_job="" submitting=0
for stage in "${STAGES[@]}"; do
    [[ $stage == "$FROM_STAGE" ]] && submitting=1
    if [[ $submitting == 0 ]]; then
        prev_stage=$stage
        continue
    fi
    args=()
    if [[ -n $prev_stage ]]; then
        args+=("train.pretrained_checkpoint=$RUNS/m2omni_$SIZE/$prev_stage/checkpoints")
    elif [[ -n ${INIT_CHECKPOINT:-} ]]; then
        args+=("train.pretrained_checkpoint=$INIT_CHECKPOINT")
    fi
    deps=()
    [[ -n $prev_job ]] && deps=(--dependency="afterok:$prev_job")
    job=$(CONFIG="configs/m2omni_$SIZE/stages/$stage.yaml" OUTPUT_DIR="$RUNS/m2omni_$SIZE/$stage" \
        sbatch --parsable --nodes "$NODES" --job-name "m2omni-$SIZE-$stage" "${deps[@]}" \
        examples/slurm_train.sbatch "${args[@]}" "$@")
    prev_job=${job%%;*}
    echo "$stage: job $prev_job (configs/m2omni_$SIZE/stages/$stage.yaml -> $RUNS/m2omni_$SIZE/$stage)"
    prev_stage=$stage
done
