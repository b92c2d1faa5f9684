#!/usr/bin/env bash
# Rebuild the shipped tools model (minigrpo/assets/tiny-arith-tools) from the shipped tiny-arith, bit for bit:
# cold-start SFT (configs/tiny-arith-tools-sft.yaml) with one CPU thread, then copy the weights in.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf runs/tiny-arith-tools-sft
OMP_NUM_THREADS=1 .venv/bin/minigrpo sft --config configs/tiny-arith-tools-sft.yaml
mkdir -p minigrpo/assets/tiny-arith-tools
cp runs/tiny-arith-tools-sft/model/{config.json,generation_config.json,model.safetensors,tokenizer.json,tokenizer_config.json,chat_template.jinja} \
   minigrpo/assets/tiny-arith-tools/
sha256sum minigrpo/assets/tiny-arith-tools/model.safetensors
