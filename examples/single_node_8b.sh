#!/usr/bin/env bash
# Llama-3.1-8B pretraining on one 8xH100 node: TP2 x DP4 (distributed optimizer), sequence parallel,
# Transformer Engine layers with FP8 (hybrid E4M3/E5M2, delayed scaling), bf16 master weights/grads.
# NOT YET MEASURED: throughput, memory headroom and convergence of this setup have not been run.
#
# Run inside the GPU image (Dockerfile), from the repository root:
#   bash examples/single_node_8b.sh [section.key=value ...]      # extra overrides go last and win
# Set the data blend and tokenizer in configs/llama3_8b_pretrain.yaml (placeholders) first.
# Rerunning the same command resumes from the latest checkpoint in $OUTPUT_DIR/checkpoints.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CONFIG="${CONFIG:-configs/llama3_8b_pretrain.yaml}"
OUTPUT_DIR="${OUTPUT_DIR:-runs/llama3_8b_pretrain}"
NPROC="${NPROC:-8}"

# Required by megatron-core with TP/sequence parallelism: one CUDA work queue, so communication kernels
# are issued in program order and overlap as scheduled.
export CUDA_DEVICE_MAX_CONNECTIONS=1
export TORCH_NCCL_AVOID_RECORD_STREAMS=1   # frees NCCL buffers promptly (megatron recommendation)
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

exec torchrun --standalone --nnodes 1 --nproc_per_node "$NPROC" \
    -m megatron_omni.train --config "$CONFIG" \
    "train.output_dir=$OUTPUT_DIR" "train.load=$OUTPUT_DIR/checkpoints" \
    "$@"
