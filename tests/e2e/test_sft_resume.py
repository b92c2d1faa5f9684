"""SFT runs on the same run machinery as GRPO: checkpoints with save_steps, exact `--resume`, Ctrl-C saves and
stops, the bad-step guard; and GRPO's group rules do not apply to it."""

import json
import os
import signal

import torch
from safetensors.torch import load_file

from minigrpo.checkpoint import checkpoints
from minigrpo.cli import main
from minigrpo.config import Config
from minigrpo.model import load_model

# 6 examples per micro-batch: num_generations (8) does not divide it, which only GRPO cares about.
ARGS = ["--model=tiny-arith-init", "--max_steps=4", "--save_steps=2", "--eval_limit=8", "--eval_steps=0",
        "--per_device_train_batch_size=6", "--gradient_accumulation_steps=2", "--learning_rate=3e-3",
        "--lr_scheduler_type=cosine", "--warmup_steps=1", "--arith_train_size=50", "--logging_steps=1"]


def _weights(run):
    return load_file(run / "model" / "model.safetensors")


def _steps(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sft_batch_size_needs_no_group_divisibility(tmp_path, capsys):
    assert main(["train", *ARGS, f"--output_dir={tmp_path / 'grpo'}"]) == 2  # GRPO: groups of 8 must fit
    assert "num_generations: 8 must divide" in capsys.readouterr().err
    assert main(["sft", *ARGS, "--max_steps=1", "--save_steps=0", f"--output_dir={tmp_path / 'sft'}"]) == 0


def test_sft_checkpoints_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    straight = tmp_path / "straight"
    assert main(["sft", *ARGS, f"--output_dir={straight}"]) == 0
    assert [s for s, _ in checkpoints(straight)] == [2, 4]
    saved = torch.load(straight / "checkpoint-2" / "trainer_state.pt", weights_only=False)
    assert saved["stage"] == "SFT" and saved["step"] == 2 and saved["sampler"]["drawn"] == 2 * 6 * 2

    # Stop after step 2 (Ctrl-C during step 2), then resume: the same weights and metrics as the straight run.
    import minigrpo.sft as S

    calls = {"n": 0}
    original = S.trainable_parameters

    def interrupt_in_step_2(model):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return original(model)

    monkeypatch.setattr(S, "trainable_parameters", interrupt_in_step_2)
    run = tmp_path / "stopped"
    assert main(["sft", *ARGS, f"--output_dir={run}"]) == 3
    assert f"minigrpo sft --resume {run}" in capsys.readouterr().err
    assert [s for s, _ in checkpoints(run)] == [2] and not (run / "model").exists()
    monkeypatch.setattr(S, "trainable_parameters", original)
    assert main(["sft", "--resume", str(run)]) == 0
    a, b = _weights(straight), _weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _steps(run) == _steps(straight) == [0, 1, 2, 3, 4, 4]  # before, the steps, after: each once
    losses = [[r.get("train/loss") for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
              for d in (straight, run)]
    assert losses[0] == losses[1]


def test_a_checkpoint_resumes_only_in_its_own_stage(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["sft", *ARGS, "--max_steps=2", f"--output_dir={run}"]) == 0
    assert main(["train", "--resume", str(run), "--per_device_train_batch_size=16"]) == 2
    assert f"{run} is a run of SFT, not GRPO: resume it with `minigrpo sft --resume {run}`" in capsys.readouterr().err
    (run / "summary.json").unlink()  # as if killed before its end: the checkpoint tells the stage
    assert main(["train", "--resume", str(run), "--per_device_train_batch_size=16",
                 "--resume_allow_changes=all"]) == 2
    assert f"is a checkpoint of SFT, not GRPO: resume it with `minigrpo sft --resume {run}`" in \
        capsys.readouterr().err


def test_sft_stops_after_max_bad_steps_with_the_last_good_policy(tmp_path, monkeypatch, capsys):
    start, _ = load_model(Config(model="tiny-arith-init"))  # the run's initial weights (same seed)
    before = start.state_dict()
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: torch.tensor(float("nan")))
    run = tmp_path / "run"
    assert main(["sft", *ARGS, "--max_steps=10", "--max_bad_steps=3", "--save_steps=0", f"--output_dir={run}"]) == 3
    err = capsys.readouterr().err
    assert "step 3: 3 steps in a row had a non-finite loss or gradient" in err
    assert [s for s, _ in checkpoints(run)] == [3]
    saved = load_file(run / "checkpoint-3" / "model.safetensors")
    assert all(torch.equal(saved[k], before[k]) for k in saved)  # every update was skipped: the initial weights
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/skipped_updates"] for r in rows if "train/loss" in r] == [1.0, 1.0, 1.0]
