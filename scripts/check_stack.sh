#!/usr/bin/env bash
# The supported range, tested: for each lock in requirements/ (the newest stack, lock.txt, and the older ones,
# transformers-X.Y.txt), a scratch venv with exactly that stack (scripts/install_lock.sh) runs the fast tests
# and the realmodel tests (the engine, both log-prob layouts, LoRA folding, export, SmolLM2-135M, the quiet
# default run), then a table of versions and results is printed (and written to $STACK_DIR/table.md).
# Not part of .ci/run (CI runs the lock); run it before a lock refresh lands (scripts/update_lock.sh does).
#
# Usage: bash scripts/check_stack.sh [LOCK...]     (default: requirements/lock.txt requirements/transformers-*.txt)
#   PYTEST_ARGS   what pytest runs (default: -m "not slow": the fast tests and the realmodel tests)
#   STACK_DIR     where the scratch venvs and logs go (default: a temporary folder, removed if every stack passed)
set -uo pipefail
cd "$(dirname "$0")/.."
PYTEST_ARGS=${PYTEST_ARGS:-"-m 'not slow'"}
keep=${STACK_DIR:+1}
STACK_DIR=${STACK_DIR:-$(mktemp -d)}
mkdir -p "$STACK_DIR"

if [ $# -gt 0 ]; then locks=("$@"); else locks=(requirements/lock.txt requirements/transformers-*.txt); fi
rows=()
failed=()
for lock in "${locks[@]}"; do
  name=$(basename "$lock" .txt)
  venv="$STACK_DIR/$name"
  log="$STACK_DIR/$name.log"
  rm -rf "$venv"
  echo "== $lock: installing into $venv"
  start=$(date +%s)
  if ! bash scripts/install_lock.sh "$venv" "$lock" > "$log" 2>&1; then
    rows+=("| $name | install failed | | | | | | see $log | |")
    failed+=("$log")
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
  # pytest's last line: "N passed, M deselected, ... in S s" (exit 5 when nothing ran counts as a failure)
  summary=$(grep -E '[0-9]+ (passed|failed|error)' "$log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
  if [ $rc -eq 0 ]; then result="pass: $summary"; else result="FAIL (exit $rc): $summary"; failed+=("$log"); fi
  rows+=("| $name | $versions | $result | $(( $(date +%s) - start )) s |")
  echo "   ${rows[-1]}"
done

{
  echo "| lock | torch | transformers | peft | accelerate | datasets | deepspeed | pytest $PYTEST_ARGS | set-up + tests |"
  echo "|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} > "$STACK_DIR/table.md"
echo
echo "$(date -u +%Y-%m-%d), $(uname -m), $(nproc) cores:"
cat "$STACK_DIR/table.md"
if [ ${#failed[@]} -eq 0 ]; then
  echo "check_stack: every stack passed"
  [ -n "$keep" ] || rm -rf "$STACK_DIR"
  exit 0
fi
for log in "${failed[@]}"; do
  echo; echo "---- the end of $log"; tail -30 "$log"
done
echo "check_stack: FAILED; logs and venvs kept in $STACK_DIR"
exit 1
