#!/usr/bin/env bash
# Two nodes x 8 GPUs under SLURM: one torchrun per node, rendezvous on the first node.
#   sbatch scripts/slurm_2nodes.sh configs/qwen2.5-0.5b-gsm8k-lora.yaml
# per_device_train_batch_size is per process: 16 processes x its value = completions per step.
# Not run here (no GPUs, no SLURM on the dev machine); the loop itself is tested with 2 CPU processes.
#SBATCH --job-name=minigrpo
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
set -euo pipefail
CONFIG=${1:?usage: sbatch scripts/slurm_2nodes.sh CONFIG.yaml [--key=value ...]}
shift
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun torchrun --nnodes="$SLURM_NNODES" --nproc_per_node=8 --rdzv_id="$SLURM_JOB_ID" --rdzv_backend=c10d \
  --rdzv_endpoint="$HEAD:29500" -m minigrpo train --config "$CONFIG" --output_dir="runs/$SLURM_JOB_ID" "$@"
