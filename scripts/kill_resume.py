"""Crash test for exact resume: train uninterrupted once; then, N times, start the same run and SIGKILL it
in a chosen phase of a random step (generation, the update with its optimizer step, or a checkpoint write:
after the files are written, before the rename), `--resume` it to the end, and compare the final weights
with the uninterrupted run's, bit for bit.

    .venv/bin/python scripts/kill_resume.py --runs 20
Prints one line per run and a summary; exit 1 unless every run is identical. The kill is armed from inside
the child (a wrapper around the phase's function starts a timer that SIGKILLs the process a random few
milliseconds in), so each run names the phase it hit.
"""

import argparse
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ARGS = ["--use_peft=true", "--max_steps=8", "--save_steps=1", "--save_total_limit=2", "--eval_limit=0",
        "--per_device_train_batch_size=16", "--beta=0.04", "--logging_steps=100"]
ENV = os.environ | {"OMP_NUM_THREADS": "1"}
PHASES = ["generation", "update", "checkpoint write"]

# Runs `minigrpo train ARGS` with a SIGKILL armed in one phase: argv = phase, call, delay_s, args... The phases:
# generation / update (a timer `delay` s into the `call`-th step's), checkpoint write (files written and flushed,
# the rename not done: _fsync_tree runs twice per save), final policy write (written beside its place, not yet
# swapped in), final evaluation (right after summary.json says trained). tests/e2e/test_runs_survive.py runs it too.
CHILD = r"""
import os, signal, sys, threading
phase, call, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
import minigrpo.checkpoint as C
import minigrpo.run as R
import minigrpo.train as T

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def armed(fn, now=False):
    calls = {"n": 0}
    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            if now:
                die()
            threading.Timer(delay, die).start()
        return fn(*args, **kwargs)
    return wrapper

if phase == "generation":
    T.rollout_and_score = armed(T.rollout_and_score)
elif phase == "update":
    T.update_policy = armed(T.update_policy)
elif phase == "checkpoint write":
    C._fsync_tree = armed(C._fsync_tree, now=True)
elif phase == "final policy write":
    def half(model, tokenizer, path, weights=None):
        C.save_policy(model, tokenizer, path.with_name(f".{path.name}.tmp"), weights)
        die()
    R.save_final_policy = half
elif phase == "final evaluation":
    write = R.write_summary
    def written_then_armed(*args):
        write(*args)
        threading.Timer(delay, die).start()
    R.write_summary = written_then_armed
else:
    sys.exit(f"unknown phase {phase!r}")
from minigrpo.cli import main
sys.exit(main(["train", *sys.argv[4:]]))
"""


def final_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def same(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "minigrpo", "train", *ARGS, f"--output_dir={tmp / 'reference'}"],
                       check=True, capture_output=True, env=ENV)
        expected = final_weights(tmp / "reference")
        ok = 0
        for i in range(args.runs):
            run, phase = tmp / f"run{i}", PHASES[i % len(PHASES)]
            # checkpoint writes: _fsync_tree runs twice per save (the folder, then its parent): odd calls only
            step = rng.randint(1, 7)
            call, delay = (2 * step - 1 if phase == "checkpoint write" else step), rng.uniform(0.0, 0.08)
            killed = subprocess.run([sys.executable, "-c", CHILD, phase, str(call), str(delay), *ARGS,
                                     f"--output_dir={run}"], capture_output=True, env=ENV)
            done = sorted(int(c.name.split("-")[1]) for c in run.glob("checkpoint-*"))
            partial = sorted(c.name for c in run.glob(".checkpoint-*.tmp"))
            resumed = subprocess.run([sys.executable, "-m", "minigrpo", "train", "--resume", str(run)],
                                     capture_output=True, text=True, env=ENV)
            identical = killed.returncode == -9 and resumed.returncode == 0 and same(final_weights(run), expected)
            ok += identical
            print(f"run {i + 1:>2}: SIGKILL in the {phase} of step {step} (+{delay * 1000:.0f} ms), "
                  f"exit {killed.returncode}; complete checkpoints {done or 'none'}"
                  f"{', half-written ' + partial[0] if partial else ''}: "
                  f"{'identical' if identical else 'DIFFERENT ' + resumed.stderr[-300:]}", flush=True)
    print(f"{ok}/{args.runs} resumed runs ended with weights identical to the uninterrupted run")
    return 0 if ok == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
