#!/usr/bin/env bash
# The supported range, tested: for each lock in requirements/ (the newest stack, lock.txt, and the older ones,
# transformers-X.Y.txt), a scratch venv with exactly that stack runs the fast tests and the realmodel tests
# (the engine, both log-prob layouts, LoRA folding, export, SmolLM2-135M), then a table of versions and
# results is printed (and written to $STACK_DIR/table.md). Not part of .ci/run (CI runs the lock); run it
# before a lock refresh lands (scripts/update_lock.sh runs it).
#
# Usage: bash scripts/check_stack.sh [LOCK...]     (default: every requirements/*.txt but uv.txt)
#   PYTEST_ARGS   what pytest runs (default: -m "not slow": the fast tests and the realmodel tests)
#   STACK_DIR     where the scratch venvs go (default: a temporary folder, removed at the end)
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTEST_ARGS=${PYTEST_ARGS:-"-m 'not slow'"}
keep=${STACK_DIR:+1}
STACK_DIR=${STACK_DIR:-$(mktemp -d)}
mkdir -p "$STACK_DIR"
[ -n "$keep" ] || trap 'rm -rf "$STACK_DIR"' EXIT

if [ $# -gt 0 ]; then locks=("$@"); else locks=(requirements/lock.txt requirements/transformers-*.txt); fi
rows=()
status=0
for lock in "${locks[@]}"; do
  name=$(basename "$lock" .txt)
  venv="$STACK_DIR/$name"
  log="$STACK_DIR/$name.log"
  rm -rf "$venv"
  echo "== $lock: installing into $venv"
  start=$(date +%s)
  if ! { "$PYTHON" -m venv "$venv" &&
         "$venv/bin/python" -m pip install -q --disable-pip-version-check --require-hashes -r requirements/uv.txt &&
         "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-compile "$TORCH_SPEC" &&
         "$venv/bin/uv" pip install --quiet --python "$venv/bin/python" --no-deps --require-hashes -r "$lock" &&
         "$venv/bin/uv" pip install --quiet --python "$venv/bin/python" --no-deps -e . ; } > "$log" 2>&1; then
    rows+=("| $name | install failed | | | | | | see $log | |")
    status=1
    continue
  fi
  versions=$("$venv/bin/python" - <<'PY'
import importlib.metadata as m
print(" | ".join(m.version(p) for p in ("torch", "transformers", "peft", "accelerate", "datasets", "deepspeed")))
PY
)
  echo "== $lock: $versions; pytest $PYTEST_ARGS"
  eval "\"$venv/bin/python\" -m pytest -q -p no:cacheprovider $PYTEST_ARGS" >> "$log" 2>&1
  rc=$?
  summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed)|^[0-9]+ (passed|failed)|(passed|failed|error).* in [0-9.]+s' "$log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
  [ $rc -eq 0 ] || status=1
  rows+=("| $name | $versions | $([ $rc -eq 0 ] && echo pass || echo FAIL): $summary | $(( $(date +%s) - start )) s |")
  echo "   ${rows[-1]}"
done

{
  echo "| lock | torch | transformers | peft | accelerate | datasets | deepspeed | pytest $PYTEST_ARGS | time |"
  echo "|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} > "$STACK_DIR/table.md"
echo
echo "$(date -u +%Y-%m-%d), $("$PYTHON" -c 'import platform; print(platform.python_version(), platform.machine())'):"
cat "$STACK_DIR/table.md"
[ $status -eq 0 ] && echo "check_stack: every stack passed" || echo "check_stack: FAILED (logs in $STACK_DIR; set STACK_DIR to keep them)"
exit $status
