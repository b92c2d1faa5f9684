#!/usr/bin/env bash
# GPU benchmark (issue 5): minigrpo vs TRL's GRPOTrainer, each with its own generation and with its colocated
# vLLM, same work: Qwen2.5-0.5B-Instruct, GSM8K, LoRA r16 on q/k/v/o, G = 8, 64 completions per step,
# 256 new tokens, bf16, beta 0.04 and 0. Each run is its own process; runs alternate; medians and ratios.
#
#   pip install -e '.[gpu,bench]'   # CUDA machine: vllm, TRL
#   bash scripts/bench_gpu.sh        # MODEL=/local/copy DATA=../shared/data/gsm8k for offline machines
#
# Writes $OUT (bench_gpu.json); record the figures in BENCHMARKS.md with the GPU model (nvidia-smi -L).
set -euo pipefail
MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
DATA=${DATA:-gsm8k}
OUT=${OUT:-bench_gpu.json}
PY=${PY:-python}
nvidia-smi -L
"$PY" -m minigrpo bench trl --model "$MODEL" --data "$DATA" --device cuda --dtype bfloat16 --vllm both \
  --beta 0.04,0 --num_generations 8 --prompts_per_step 8 --max_completion_length 256 --steps 10 --reps 2 \
  --out "$OUT"
