#!/usr/bin/env bash
# Two nodes x 8 GPUs under SLURM: one `accelerate launch` per node, rendezvous on the first node.
#   sbatch scripts/slurm_2nodes.sh configs/qwen2.5-0.5b-gsm8k-lora.yaml [--key=value ...]
#   STRATEGY=configs/accelerate/zero2.yaml sbatch scripts/slurm_2nodes.sh ...   # DeepSpeed ZeRO-2 (zero3, fsdp)
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
STRATEGY=${STRATEGY:-${ENGINE:-configs/accelerate/ddp.yaml}}  # ENGINE: its name before 2026-11-29
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
GPUS=8
# SLURM_NODEID differs per node: expand it inside each task, not here.
srun bash -c "accelerate launch --config_file $STRATEGY --num_machines $SLURM_NNODES \
  --num_processes $((SLURM_NNODES * GPUS)) --machine_rank \$SLURM_NODEID --main_process_ip $HEAD \
  --main_process_port 29500 -m minigrpo train --config $CONFIG --output_dir=runs/$SLURM_JOB_ID $*"
