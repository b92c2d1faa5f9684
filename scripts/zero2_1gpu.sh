#!/usr/bin/env bash
# Issue 9's GPU acceptance run: the 0.5B recipe on one GPU under DeepSpeed ZeRO-2 with CPU offload, beside
# the same run in one plain process; LoRA and full fine-tuning (where offload matters: the AdamW states and
# fp32 master weights leave the GPU). Prints median step time and peak GPU memory of each run.
#
#   pip install -e '.[gpu]'          # CUDA machine: deepspeed (and vllm, bitsandbytes)
#   bash scripts/zero2_1gpu.sh       # MODEL=/local/copy DATA=../shared/data/gsm8k for offline machines
#
# Record the figures in BENCHMARKS.md ("Several processes") with the GPU model (nvidia-smi -L).
set -euo pipefail
MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
DATA=${DATA:-gsm8k}
STEPS=${STEPS:-20}
OUT=${OUT:-runs/zero2_1gpu}
PY=${PY:-python}
nvidia-smi -L || echo "no nvidia-smi: not a GPU machine (a dry run: EXTRA='--device=cpu ...')"
# EXTRA: more --key=value for every run (a CPU dry run of this script: EXTRA="--device=cpu --dtype=float32
# --per_device_train_batch_size=16 --max_completion_length=32" MODEL=smollm2-135m DATA=../shared/data/gsm8k)
read -r -a MORE <<< "${EXTRA:-}"
COMMON=(--config configs/qwen2.5-0.5b-gsm8k-lora.yaml --model="$MODEL" --dataset="$DATA" --max_steps="$STEPS"
        --eval_limit=100 --eval_steps=0 --save_steps=0 "${MORE[@]}")
for ft in lora full; do
  [ "$ft" = full ] && FT=(--use_peft=false --learning_rate=1e-6) || FT=()
  "$PY" -m minigrpo train "${COMMON[@]}" "${FT[@]}" --output_dir="$OUT/$ft-plain"
  "$(dirname "$(command -v "$PY")")/accelerate" launch --config_file configs/accelerate/zero2.yaml \
    --num_processes 1 --mixed_precision "${MIXED:-bf16}" -m minigrpo train "${COMMON[@]}" "${FT[@]}" --output_dir="$OUT/$ft-zero2"
done
"$PY" - "$OUT" <<'PY'
import json, statistics, sys
from pathlib import Path
for run in sorted(Path(sys.argv[1]).iterdir()):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["perf/step_s"] for r in rows if "perf/step_s" in r][1:]  # the first step warms up
    peak = max(r.get("memory/peak_gb", 0) for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    acc = [summary[k].get("eval/accuracy") for k in ("before", "after")]
    print(f"{run.name:<12} median step {statistics.median(steps):6.2f} s  peak GPU {peak:6.2f} GB  "
          f"held-out accuracy {acc[0]} -> {acc[1]}")
PY
