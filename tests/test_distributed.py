"""Two processes (torchrun, gloo on CPU) give the one-process result on the same global batch, and resume."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from minigrpo.cli import main

TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))
pytestmark = [pytest.mark.slow, pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found")]
BASE = ["--use_peft=true", "--eval_limit=0", "--num_generations=4", "--learning_rate=1e-3", "--logging_steps=100"]


def _torchrun(*args: str) -> None:
    out = subprocess.run([TORCHRUN, "--nproc_per_node=2", "-m", "minigrpo", "train", *args], capture_output=True,
                         text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_weights(a_dir, b_dir, atol=1e-4):
    a = load_file(a_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(b_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-3, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_two_processes_match_one_on_the_same_global_batch(tmp_path, loss_type):
    one, two = tmp_path / "one", tmp_path / "two"
    steps = ["--max_steps=3", f"--loss_type={loss_type}"]
    # one process: 16 completions per micro-batch; two: 8 each, the same 16 per step in all
    assert main(["train", *BASE, *steps, "--per_device_train_batch_size=16", f"--output_dir={one}"]) == 0
    _torchrun(*BASE, *steps, "--per_device_train_batch_size=8", f"--output_dir={two}")
    _assert_same_weights(one, two)
    rows_one, rows_two = _rows(one), _rows(two)
    assert [r["step"] for r in rows_two] == [1, 2, 3]  # process 0 alone logs
    for a, b in zip(rows_one, rows_two):
        for key in ("train/reward", "train/accuracy", "completions/mean_length", "train/frac_reward_zero_std",
                    "completions/max_length"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
        assert a["train/loss"] == pytest.approx(b["train/loss"], abs=1e-4)
        assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-3)


def test_two_processes_resume_from_a_checkpoint(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _torchrun(*BASE, "--max_steps=3", "--per_device_train_batch_size=8", f"--output_dir={straight}")
    _torchrun(*BASE, "--max_steps=2", "--save_steps=1", "--per_device_train_batch_size=8", f"--output_dir={resumed}")
    assert (resumed / "checkpoint-2").is_dir()
    _torchrun("--resume", str(resumed), "--max_steps=3")
    _assert_same_weights(straight, resumed, atol=1e-6)
    assert [r["step"] for r in _rows(resumed)] == [1, 2, 3]
