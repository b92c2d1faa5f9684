#!/usr/bin/env bash
# Rebuild the shipped tiny model (minigrpo/assets/tiny-arith) from a seeded random init, bit for bit:
# cold-start SFT with one CPU thread (same floating-point sums on every run), then copy the weights in.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf runs/tiny-arith-sft
OMP_NUM_THREADS=1 .venv/bin/minigrpo sft --config configs/tiny-arith-sft.yaml
mkdir -p minigrpo/assets/tiny-arith
cp runs/tiny-arith-sft/model/{config.json,generation_config.json,model.safetensors,tokenizer.json,tokenizer_config.json,chat_template.jinja} \
   minigrpo/assets/tiny-arith/
sha256sum minigrpo/assets/tiny-arith/model.safetensors
