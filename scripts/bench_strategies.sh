#!/usr/bin/env bash
# The default run (tiny-arith, 64 completions per step) on one process and on 2 CPU processes under each
# strategy: DDP (torchrun), ZeRO-2 with CPU offload, ZeRO-3 (accelerate launch, configs/accelerate/). Runs
# alternate, REPS times; prints each strategy's median step time (first step of a run dropped) and peak RSS.
#   bash scripts/bench_strategies.sh        # STEPS=10 REPS=2
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-10}
REPS=${REPS:-2}
OUT=$(mktemp -d)
BIN=.venv/bin
export OMP_NUM_THREADS=1
ARGS=(--max_steps="$STEPS" --eval_limit=0 --logging_steps=1000 --save_steps=0)
ACC=("$BIN/accelerate" launch --num_processes 2 --mixed_precision no)
for rep in $(seq "$REPS"); do
  "$BIN/minigrpo" train "${ARGS[@]}" --per_device_train_batch_size=64 --output_dir="$OUT/one-$rep" > /dev/null
  "$BIN/torchrun" --nproc_per_node 2 -m minigrpo train "${ARGS[@]}" --per_device_train_batch_size=32 \
    --output_dir="$OUT/ddp-$rep" > /dev/null 2>&1
  for z in zero2 zero3; do
    "${ACC[@]}" --config_file "configs/accelerate/$z.yaml" -m minigrpo train "${ARGS[@]}" \
      --per_device_train_batch_size=32 --output_dir="$OUT/$z-$rep" > /dev/null 2>&1
  done
done
"$BIN/python" - "$OUT" <<'PY'
import json, statistics, sys
from pathlib import Path
runs = {}
for run in Path(sys.argv[1]).iterdir():
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["perf/step_s"] for r in rows if "perf/step_s" in r][1:]
    strategy = run.name.rsplit("-", 1)[0]
    runs.setdefault(strategy, {"steps": [], "rss": []})
    runs[strategy]["steps"] += steps
    runs[strategy]["rss"].append(max(r["memory/peak_gb"] for r in rows if "memory/peak_gb" in r))
base = statistics.median(runs["one"]["steps"])
for strategy in ("one", "ddp", "zero2", "zero3"):
    s = sorted(runs[strategy]["steps"])
    med = statistics.median(s)
    print(f"{strategy:<6} median step {med:.3f} s ({s[len(s) // 10]:.3f}-{s[-1 - len(s) // 10]:.3f}), "
          f"{med / base:.2f}x one process; peak RSS per process {max(runs[strategy]['rss']):.2f} GB")
PY
