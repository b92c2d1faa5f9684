"""Exact resume: a run SIGKILLed mid-way and resumed ends with the uninterrupted run's weights, bit for bit;
checkpoints are atomic and pruned; Ctrl-C saves and stops; resuming a run with no checkpoint starts over."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from minigrpo.checkpoint import checkpoints
from minigrpo.cli import main

ARGS = ["--use_peft=true", "--max_steps=5", "--save_steps=1", "--save_total_limit=2", "--eval_limit=0",
        "--per_device_train_batch_size=16", "--beta=0.04"]


def _weights(run):
    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run the killed ones are compared with."""
    run = tmp_path_factory.mktemp("straight") / "run"
    assert main(["train", *ARGS, f"--output_dir={run}"]) == 0
    return run


def test_sigkill_then_resume_gives_identical_weights(tmp_path, straight):
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "minigrpo", "train", *ARGS, f"--output_dir={run}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while not (run / "checkpoint-2").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "adapter").exists(), "the run finished before the kill: nothing was tested"
    assert main(["train", "--resume", str(run)]) == 0
    a, b = _weights(straight), _weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]  # each step logged once: the killed run's later rows were dropped
    assert [s for s, _ in checkpoints(run)] == [4, 5]  # the newest save_total_limit
    assert not list(run.glob(".checkpoint-*.tmp"))


def test_sigterm_saves_a_checkpoint_and_resume_gives_identical_weights(tmp_path, straight):
    """SLURM / Kubernetes pre-emption: SIGTERM finishes the step, checkpoints (even with save_steps 0) and exits 3."""
    run = tmp_path / "terminated"
    proc = subprocess.Popen([sys.executable, "-m", "minigrpo", "train", *ARGS, "--save_steps=0",
                             f"--output_dir={run}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    metrics = run / "metrics.jsonl"
    while proc.poll() is None and time.time() < deadline and not (
            metrics.is_file() and metrics.read_text().count("\n") >= 2):  # step 2 logged
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, out + err
    assert "SIGTERM: finishing this step" in out + err and f"minigrpo train --resume {run}" in out + err
    saved = [s for s, _ in checkpoints(run)]
    assert len(saved) == 1 and 2 <= saved[0] < 5
    assert main(["train", "--resume", str(run)]) == 0
    a, b = _weights(straight), _weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_a_checkpoint_starts_over(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("max_steps: 2\neval_limit: 0\nper_device_train_batch_size: 16\n")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/accuracy": 0.1}) + "\n")
    assert main(["train", "--resume", str(run)]) == 0
    assert "no complete checkpoint" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_ctrl_c_saves_a_checkpoint_and_stops(tmp_path, monkeypatch, capsys):
    import minigrpo.train as T

    original = T.update_policy

    def update_then_interrupt(*args, **kwargs):
        out = original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C during step 2's update
        return out

    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        return (update_then_interrupt if calls["n"] == 2 else original)(*args, **kwargs)

    monkeypatch.setattr(T, "update_policy", wrapped)
    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN in a shell's background job
    assert main(["train", "--max_steps=10", "--eval_limit=0", "--per_device_train_batch_size=16",
                 f"--output_dir={run}"]) == 3
    assert "interrupted: checkpoint of step 2 saved" in capsys.readouterr().err
    assert [s for s, _ in checkpoints(run)] == [2]
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back


def test_resume_of_a_missing_run_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nope")]) == 2
    assert "no config.yaml there" in capsys.readouterr().err
