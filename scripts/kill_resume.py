"""Crash test for exact resume: train uninterrupted once; then, N times, start the same run, SIGKILL it at a
random moment (during generation, the update, or a checkpoint write), `--resume` it to the end, and
compare the final weights with the uninterrupted run's, bit for bit.

    .venv/bin/python scripts/kill_resume.py --runs 20
Prints one line per run (kill time, the newest complete checkpoint at the kill, a half-written one if any,
identical or not) and a summary; exit 1 unless every run is identical.
"""

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARGS = ["--use_peft=true", "--max_steps=8", "--save_steps=1", "--save_total_limit=2", "--eval_limit=0",
        "--per_device_train_batch_size=16", "--beta=0.04", "--logging_steps=100"]


def train(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "minigrpo", "train", *ARGS, f"--output_dir={out}", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})


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
        t0 = time.perf_counter()
        ref = train(tmp / "reference")
        assert ref.wait() == 0, ref.stderr.read().decode()
        span = time.perf_counter() - t0  # start-up included: kills land anywhere from loading to the end
        expected = final_weights(tmp / "reference")
        ok = 0
        for i in range(args.runs):
            run = tmp / f"run{i}"
            proc = train(run)
            delay = rng.uniform(0.1 * span, span)
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            done = sorted(int(c.name.split("-")[1]) for c in run.glob("checkpoint-*"))
            partial = sorted(c.name for c in run.glob(".checkpoint-*.tmp"))
            resumed = subprocess.run([sys.executable, "-m", "minigrpo", "train", "--resume", str(run)],
                                     capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
            identical = resumed.returncode == 0 and same(final_weights(run), expected)
            ok += identical
            print(f"run {i + 1:>2}: killed at {delay:5.2f} s, complete checkpoints {done or 'none'}"
                  f"{', half-written ' + partial[0] if partial else ''}: "
                  f"{'identical' if identical else 'DIFFERENT ' + resumed.stderr[-300:]}", flush=True)
    print(f"{ok}/{args.runs} resumed runs ended with weights identical to the uninterrupted run")
    return 0 if ok == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
