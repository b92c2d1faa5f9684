"""Runs that survive (README): a run folder belongs to one run; a damaged checkpoint falls back to the one before
it; a run killed anywhere, again and again, resumes to the uninterrupted result; faults in user code or in the
numbers are contained or stop the run with a message; a run that learns nothing says so and why."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import minigrpo.checkpoint as C
import minigrpo.tasks.rewards as R
from minigrpo.checkpoint import checkpoints, verify_checkpoint
from minigrpo.cli import main

ARGS = ["--use_peft=true", "--max_steps=5", "--save_steps=1", "--save_total_limit=2", "--eval_limit=16",
        "--eval_steps=0", "--per_device_train_batch_size=16", "--beta=0.04"]
QUICK = ["--max_steps=2", "--eval_limit=0", "--per_device_train_batch_size=16"]
ENV = os.environ | {"OMP_NUM_THREADS": "1"}


def _weights(run):
    return load_file(run / "adapter" / "adapter_model.safetensors")


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _steps(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run the others are compared with (held-out accuracy before and after)."""
    run = tmp_path_factory.mktemp("straight") / "run"
    assert main(["train", *ARGS, f"--output_dir={run}"]) == 0
    return run


# ---- 1. a run folder belongs to one run --------------------------------------------------------------------------

def test_a_new_run_into_a_run_folder_is_refused_and_overwrite_keeps_the_old_one(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoint-3").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "notes.txt").write_text("mine")  # not a run's file: it stays where it is
    start = time.perf_counter()
    assert main(["train", *QUICK, f"--output_dir={run}"]) == 2
    assert time.perf_counter() - start < 5  # refused before any data or model
    err = capsys.readouterr().err
    assert f"output_dir: {run} already holds a run (checkpoint-3, metrics.jsonl)" in err
    assert f"minigrpo train --resume {run}" in err and "overwrite_output_dir: true" in err
    assert main(["train", *QUICK, f"--output_dir={run}", "--overwrite_output_dir"]) == 0
    kept = list(run.glob("replaced-*"))
    assert len(kept) == 1 and (kept[0] / "checkpoint-3").is_dir()  # the old run, moved, not deleted
    assert (kept[0] / "metrics.jsonl").read_text() == '{"step": 1}\n' and (run / "notes.txt").read_text() == "mine"
    assert _steps(run) == [1, 2] and (run / "model").is_dir()


def test_a_second_run_into_a_busy_folder_is_refused_at_once_and_the_first_ends_normally(tmp_path, capsys):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "minigrpo", "train", "--max_steps=8", "--eval_limit=0",
                              "--per_device_train_batch_size=16", f"--output_dir={run}"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").is_file() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, "the first run ended before the second started: nothing was tested"
    start = time.perf_counter()
    assert main(["train", "--max_steps=8", "--eval_limit=0", "--per_device_train_batch_size=16",
                 f"--output_dir={run}"]) == 2
    assert time.perf_counter() - start < 1.0
    assert f"output_dir: {run} is in use by a run that is still going (pid {first.pid} on" in capsys.readouterr().err
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert _steps(run) == list(range(1, 9))  # the first run's rows only, each once
    # the lock went with the first run: resuming its (finished) folder is now refused for being finished
    assert main(["train", "--resume", str(run)]) == 2
    assert "is a finished run (8 steps; summary.json): nothing to continue" in capsys.readouterr().err


def test_resume_refuses_changes_that_break_exactness_unless_allowed(straight, tmp_path, capsys):
    run = tmp_path / "run"
    for path in [straight / "config.yaml", straight / "metrics.jsonl"]:
        (run / path.name).parent.mkdir(exist_ok=True)
        (run / path.name).write_bytes(path.read_bytes())
    assert main(["train", "--resume", str(run), "--learning_rate=0.5", "--beta=0"]) == 2
    err = capsys.readouterr().err
    assert "resume: the config differs from the run's" in err
    assert "beta: 0.04 -> 0.0; learning_rate: 0.0001 -> 0.5" in err
    assert "--resume_allow_changes=beta,learning_rate" in err
    assert main(["train", "--resume", str(straight), "--eval_limit=4"]) == 2  # a free key, but the run is done
    assert f"{straight} is a finished run (5 steps; summary.json)" in capsys.readouterr().err
    (run / "checkpoint-4").mkdir()
    (run / "checkpoint-4" / "trainer_state.pt").write_bytes(b"")
    assert main(["train", "--resume", str(run), "--max_steps=3"]) == 2  # free, but not below what is done
    assert f"max_steps: 3 is below the 4 steps {run} has done (checkpoint-4)" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), f"--output_dir={tmp_path / 'elsewhere'}"]) == 2
    assert f"--output_dir: a resumed run stays in its folder ({run})" in capsys.readouterr().err
    assert main(["train", *QUICK, "--resume=true", f"--output_dir={tmp_path / 'new'}"]) == 2
    assert f"resume: {tmp_path / 'new'} holds no run to continue (no config.yaml there)" in capsys.readouterr().err


# ---- 2. a damaged checkpoint, a torn log, a kill anywhere -------------------------------------------------------

def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(straight, tmp_path, capsys):
    """As if killed after checkpoint-5 was written, which the disk then damaged; and mid-way through a log line."""
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(straight), str(run)], check=True)
    for name in ("adapter", "summary.json", "curves.png"):
        subprocess.run(["rm", "-rf", str(run / name)], check=True)
    weights = run / "checkpoint-5" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the weights: the file still loads, the checksum does not match
    weights.write_bytes(bytes(data))
    assert verify_checkpoint(run / "checkpoint-5") == "adapter_model.safetensors does not match its checksum"
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "train/rew')  # a torn last line
    assert main(["train", "--resume", str(run)]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "checkpoint-5 is damaged (adapter_model.safetensors does not match its checksum); set aside as " \
           "checkpoint-5.damaged" in out
    assert "resumed from" in out and "checkpoint-4: continuing at step 5" in out
    assert _same(_weights(straight), _weights(run))
    assert (run / "checkpoint-5.damaged").is_dir()  # kept for a look, not deleted
    assert json.loads((run / "summary.json").read_text()) == json.loads((straight / "summary.json").read_text())
    assert _steps(run) == _steps(straight)  # the torn line and the damaged step's rows replaced


def test_resume_never_starts_over_when_every_checkpoint_is_damaged(straight, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_bytes((straight / "config.yaml").read_bytes())
    (run / "checkpoint-4.damaged").mkdir()  # set aside by an earlier resume; no whole checkpoint left
    assert main(["train", "--resume", str(run)]) == 2
    assert f"resume: every checkpoint of {run} is damaged" in capsys.readouterr().err
    assert not (run / "metrics.jsonl").exists()


# The crash harness of scripts/kill_resume.py: `python -c CHILD phase call delay ARGS...` SIGKILLs itself there
_spec = importlib.util.spec_from_file_location("kill_resume", Path(__file__).parents[2] / "scripts" / "kill_resume.py")
_kill_resume = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_kill_resume)
CHILD = _kill_resume.CHILD


def test_a_run_killed_again_and_again_resumes_to_the_uninterrupted_result(straight, tmp_path):
    """Five SIGKILLs in a row (each resumed run killed again): in a step's update, mid-checkpoint, in generation,
    while the final policy is written and during the final evaluation; then resumed to the end."""
    run = tmp_path / "run"
    # (phase, call of the armed function in that process, delay): _fsync_tree runs twice per checkpoint
    kills = [("update", 2, 0.01), ("checkpoint write", 3, 0.0), ("generation", 1, 0.02),
             ("final policy write", 1, 0.0), ("final evaluation", 1, 0.0)]
    for i, (phase, call, delay) in enumerate(kills):
        argv = [*ARGS, f"--output_dir={run}"] if i == 0 else ["--resume", str(run)]
        killed = subprocess.run([sys.executable, "-c", CHILD, phase, str(call), str(delay), *argv],
                                capture_output=True, text=True, env=ENV)
        assert killed.returncode == -signal.SIGKILL, f"{phase}: exit {killed.returncode}\n{killed.stderr[-2000:]}"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] is False  # trained, killed during its final evaluation
    assert main(["train", "--resume", str(run)]) == 0
    assert _same(_weights(straight), _weights(run))
    assert json.loads((run / "summary.json").read_text()) == json.loads((straight / "summary.json").read_text())
    assert _steps(run) == _steps(straight)  # every step, and each evaluation, logged once


def test_ctrl_c_during_the_final_evaluation_keeps_the_policy_and_resume_evaluates_it(straight, tmp_path,
                                                                                      monkeypatch, capsys):
    import minigrpo.run as run_module

    original, calls = run_module.run_eval, {"n": 0}

    def eval_then_ctrl_c(run):
        calls["n"] += 1
        if calls["n"] == 2:  # the final evaluation (the first is before training)
            os.kill(os.getpid(), signal.SIGINT)
        return original(run)

    monkeypatch.setattr(run_module, "run_eval", eval_then_ctrl_c)
    run = tmp_path / "run"
    assert main(["train", *ARGS, "--save_steps=0", f"--output_dir={run}"]) == 3  # save_steps 0: no checkpoint
    err = capsys.readouterr().err
    assert f"final evaluation interrupted; the trained policy is saved in {run / 'adapter'}" in err
    assert f"minigrpo train --resume {run}" in err
    assert _same(_weights(straight), _weights(run)) and not checkpoints(run)
    monkeypatch.setattr(run_module, "run_eval", original)
    assert main(["train", "--resume", str(run), "--save_steps=0"]) == 0
    assert "finished training (step 5); its final evaluation runs now" in " ".join(capsys.readouterr().out.split())
    assert json.loads((run / "summary.json").read_text()) == json.loads((straight / "summary.json").read_text())


# ---- 3. faults contained ----------------------------------------------------------------------------------------

def test_a_reward_that_never_returns_costs_its_samples_then_is_disabled(tmp_path, monkeypatch, capsys):
    def stuck(prompts, completions, **kwargs):
        time.sleep(3600)

    monkeypatch.setitem(R.REWARD_FUNCS, "stuck", stuck)
    run = tmp_path / "run"
    start = time.perf_counter()
    assert main(["train", *QUICK, "--max_steps=4", "--reward_funcs=correctness,stuck", "--reward_timeout=0.5",
                 "--reward_timeout_limit=2", f"--output_dir={run}"]) == 0
    assert time.perf_counter() - start < 60
    err = capsys.readouterr().err
    assert "reward 'stuck' ran past reward_timeout=0.5s on a batch of 16: those samples are skipped for it " \
           "(1/2 in a row disable it)" in err
    assert "reward 'stuck' ran past reward_timeout=0.5s 2 times in a row: disabled for the rest of the run" in err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/reward_timeouts"] for r in rows] == [1.0, 1.0, 0.0, 0.0]
    assert all(r["train/rewards/stuck/mean"] is None for r in rows)  # never scored a sample
    assert all(r["train/rewards/correctness/mean"] is not None for r in rows)  # the other reward went on


def test_rewards_that_exit_or_hang_are_errors_of_their_samples_not_of_the_run(capsys):
    import asyncio

    def exits(prompts, completions, **kwargs):
        if any("b" in c for c in completions):
            sys.exit(0)  # would end the run with exit 0 and nothing saved
        return [1.0] * len(completions)

    async def hangs(prompts, completions, **kwargs):
        await asyncio.sleep(3600)

    async def blocks(prompts, completions, **kwargs):
        time.sleep(3)  # never awaits: the event loop itself is stuck
        return [1.0] * len(completions)

    for timeout in (0.0, 1.0):
        errors, guard = {}, R.RewardGuard(timeout=timeout, limit=5)
        totals, per_func = R.score([("exits", exits, 1.0)], ["q"] * 3, ["a", "b", "c"], {}, errors, guard)
        assert per_func["exits"] == [1.0, None, 1.0] and errors == {"exits": 1}
    guard = R.RewardGuard(timeout=0.3, limit=5)
    start = time.perf_counter()
    _, per_func = R.score([("hangs", hangs, 1.0), ("blocks", blocks, 1.0)], ["q"] * 2, ["a", "b"], {}, None, guard)
    assert time.perf_counter() - start < 2.5  # given up after the limit and a second's grace, not 3 s
    assert per_func == {"hangs": [None, None], "blocks": [None, None]} and guard.timeouts == 2

    async def fine(prompts, completions, **kwargs):
        return [2.0] * len(completions)

    assert R.score([("fine", fine, 1.0)], ["q"], ["a"], {}, None, guard)[0] == [2.0]  # on a fresh event loop


def test_a_reward_that_breaks_its_contract_stops_the_run_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(R.REWARD_FUNCS, "short", lambda prompts, completions, **kw: [1.0])
    assert main(["train", *QUICK, "--reward_funcs=short", f"--output_dir={tmp_path / 'run'}"]) == 2
    assert "reward 'short' returned 1 values for 16 completions: a reward returns a list with one value per " \
           "completion" in capsys.readouterr().err


def test_a_non_finite_loss_skips_the_update_even_with_finite_gradients(tmp_path, monkeypatch, capsys):
    import minigrpo.algo as A

    dapo = A.LOSS_TYPES["dapo"]
    # NaN added outside the graph: the loss is NaN, its gradient the finite one of the real loss
    monkeypatch.setitem(A.LOSS_TYPES, "dapo", lambda *args: dapo(*args) + torch.tensor(float("nan")))
    run = tmp_path / "run"
    assert main(["train", *QUICK, "--max_steps=5", "--max_bad_steps=2", f"--output_dir={run}"]) == 3
    assert "step 2: 2 steps in a row had a non-finite loss or gradient" in capsys.readouterr().err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/skipped_updates"] for r in rows] == [1.0, 1.0]
    assert all(r["train/grad_norm"] is not None for r in rows)  # the gradients were finite: the loss decided


def test_weights_that_overflow_stop_the_run_at_the_next_rollout(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *QUICK, "--max_steps=6", "--learning_rate=1e8", f"--output_dir={run}"]) == 3
    err = capsys.readouterr().err
    # transformers' forward turns the overflow into NaN logits, the engine's own one sees it in the activations
    assert "while generating" in err and "its weights are broken" in err
    assert "at learning_rate 1e+08" in err and "start again with a lower one" in err


def test_a_full_disk_is_named_and_the_previous_checkpoint_kept(tmp_path, monkeypatch, capsys):
    save, calls = torch.save, {"n": 0}

    def fails_second_time(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # torch's own words for a write that found no space
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                               "file data/3: file write failed")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(C.torch, "save", fails_second_time)
    run = tmp_path / "run"
    assert main(["train", *QUICK, "--max_steps=3", "--save_steps=1", f"--output_dir={run}"]) == 3
    err = capsys.readouterr().err
    assert f"writing {run / 'checkpoint-2'}: the disk is full (" in err
    assert "The previous checkpoint is intact; free space and continue with " \
           f"`minigrpo train --resume {run}`" in err
    assert [s for s, _ in checkpoints(run)] == [1] and verify_checkpoint(run / "checkpoint-1") is None


# ---- 4. silence is an error -------------------------------------------------------------------------------------

def test_a_run_whose_rewards_carry_no_signal_says_so_and_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(R.REWARD_FUNCS, "words", lambda prompts, completions, **kw: ["good"] * len(completions))
    run = tmp_path / "run"
    assert main(["train", *QUICK, "--max_steps=4", "--reward_funcs=words", "--no_signal_steps=2",
                 f"--output_dir={run}"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "step 2: no learning signal for 2 steps in a row: every sample was skipped, no reward scored one: " \
           "reward 'words' returned values that are not finite numbers (32 so far, e.g. 'good')" in out
    assert "step 4: no learning signal for 4 steps in a row" in out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train/reward"] is None for r in rows)  # no reward at all: not a reward of 0.000


def test_bad_places_and_devices_are_refused_before_any_work(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["train", *QUICK, f"--output_dir={afile}"]) == 2
    assert f"output_dir: {afile} is a file" in capsys.readouterr().err
    assert main(["train", *QUICK, f"--output_dir={afile}/run"]) == 2
    assert f"output_dir: cannot make {afile}/run" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["train", *QUICK, "--device=cuda:0", f"--output_dir={tmp_path / 'run'}"]) == 2
        assert "device: 'cuda:0', but torch sees no CUDA GPU" in capsys.readouterr().err
        assert not (tmp_path / "run").exists()
