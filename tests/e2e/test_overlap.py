"""Overlapped rollouts (max_staleness, rollout/overlap.py): the generator process reproduces the synchronous loop
bit for bit in lockstep, samples batch j with the policy of update j-1-k, resumes exactly after SIGKILL and
SIGTERM, and a generator that dies or hangs stops the run with a clear message instead of a hang."""

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minigrpo import train as train_module
from minigrpo.api import GRPOTrainer
from minigrpo.checkpoint import write_checksums
from minigrpo.cli import main
from minigrpo.config import Config
from minigrpo.errors import ConfigError, TrainingStopped
from minigrpo.rollout.overlap import GeneratorError, version_for
from minigrpo.tasks.rewards import correctness_reward as correctness

STEPS = ["--max_steps=5", "--eval_limit=0", "--per_device_train_batch_size=32"]
LORA = ["--use_peft=true", "--beta=0.04", "--save_steps=1", "--save_total_limit=2", *STEPS]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _not_perf(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("perf/") and k != "memory/peak_gb"}


def test_the_generator_process_in_lockstep_equals_the_synchronous_loop_bit_for_bit(tmp_path, monkeypatch):
    """k = 0 is the synchronous loop (no process). Forced to run the process anyway at k = 0 (each batch sampled
    there after the update before it), every logged value and every weight equals the synchronous run's: the
    weight push, the seeds and the data order of the process lose nothing."""
    args = ["train", *STEPS, "--learning_rate=1e-3", "--save_steps=0"]
    assert main([*args, f"--output_dir={tmp_path / 'sync'}"]) == 0
    monkeypatch.setattr(train_module, "start_generator", partial(train_module.start_generator, always=True))
    assert main([*args, f"--output_dir={tmp_path / 'lockstep'}"]) == 0
    sync, lockstep = _metrics(tmp_path / "sync"), _metrics(tmp_path / "lockstep")
    assert [r["step"] for r in lockstep] == [1, 2, 3, 4, 5]
    assert all("perf/wait_s" in r and "perf/push_s" in r for r in lockstep)  # the process ran
    assert [_not_perf(r) for r in sync] == [_not_perf(r) for r in lockstep]
    assert len({r["train/loss"] for r in sync}) > 1 and sync[0]["train/grad_norm"] > 0  # it did learn something
    a = load_file(tmp_path / "sync" / "model" / "model.safetensors")
    b = load_file(tmp_path / "lockstep" / "model" / "model.safetensors")
    assert _same_weights(a, b)


def test_k_1_samples_each_batch_with_the_policy_of_two_updates_before(tmp_path):
    """Staleness 0 for step 1, then exactly k = 1; the sampler's log-probs are corrected (ratios logged). With
    learning_rate 0 every version of the policy is the same, so the overlapped run samples exactly the synchronous
    run's completions (same rewards at every step): the data order and seeds do not depend on the process."""
    args = ["train", *STEPS, "--learning_rate=0", "--save_steps=0"]
    assert main([*args, f"--output_dir={tmp_path / 'sync'}"]) == 0
    assert main([*args, "--max_staleness=1", f"--output_dir={tmp_path / 'k1'}"]) == 0
    sync, k1 = _metrics(tmp_path / "sync"), _metrics(tmp_path / "k1")
    assert [r["rollout/staleness"] for r in k1] == [0.0, 1.0, 1.0, 1.0, 1.0]
    assert [r["rollout/staleness"] for r in sync] == [0.0] * 5
    assert [step - 1 - version_for(step, 1) for step in range(1, 6)] == [0, 1, 1, 1, 1]
    for key in ("train/reward", "train/accuracy", "completions/mean_length"):
        assert [r[key] for r in k1] == [r[key] for r in sync], key
    assert all(abs(r["rollout/is_ratio_mean"] - 1) < 0.05 and r["rollout/is_ratio_std"] >= 0 for r in k1)
    assert "rollout/is_ratio_mean" not in sync[0]  # the engine's numerics are not corrected at k = 0


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted overlapped run (k = 2, LoRA: the base weights shared with the process) the interrupted
    ones are compared with."""
    run = tmp_path_factory.mktemp("straight") / "run"
    assert main(["train", *LORA, "--max_staleness=2", "--learning_rate=1e-3", f"--output_dir={run}"]) == 0
    return run


def _generators(pid: int) -> list[int]:
    """The spawned children of process `pid` (not multiprocessing's resource tracker)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"spawn_main" in command:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start(run: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "minigrpo", "train", *LORA, "--max_staleness=2",
                             "--learning_rate=1e-3", *extra, f"--output_dir={run}"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})


def _wait_for(condition, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while not condition() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)


def test_sigkill_then_resume_gives_the_uninterrupted_weights_and_the_generator_goes_too(tmp_path, straight):
    """The checkpoint keeps the batches sampled ahead (the data order is past them): the resumed run goes on as
    the uninterrupted one did, bit for bit. The generator process does not outlive a killed trainer."""
    run = tmp_path / "killed"
    proc = _start(run)
    _wait_for(lambda: (run / "checkpoint-2").exists(), proc)
    children = _generators(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "adapter").exists(), "the run finished before the kill: nothing was tested"
    assert children, "no generator process was running"
    deadline = time.time() + 20
    while any(_alive(c) for c in children) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(c) for c in children), "the generator outlived the trainer"
    assert sorted(p.name for p in (run / "checkpoint-2").glob("pending-*.pt")) == ["pending-0.pt"]
    assert main(["train", "--resume", str(run)]) == 0
    assert _same_weights(load_file(straight / "adapter" / "adapter_model.safetensors"),
                         load_file(run / "adapter" / "adapter_model.safetensors"))
    assert [_not_perf(r) for r in _metrics(run)] == [_not_perf(r) for r in _metrics(straight)]


def test_sigterm_to_the_process_group_saves_and_resumes_exactly(tmp_path, straight):
    """SLURM / Kubernetes send SIGTERM to every process: the generator ignores it, the trainer finishes the step,
    waits for the batches in flight, saves them with the checkpoint and exits 3; resume is exact."""
    run = tmp_path / "terminated"
    proc = _start(run, "--save_steps=0")
    metrics = run / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 2, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 3, out
    assert "SIGTERM: finishing this step" in out and f"minigrpo train --resume {run}" in out
    assert main(["train", "--resume", str(run)]) == 0
    assert _same_weights(load_file(straight / "adapter" / "adapter_model.safetensors"),
                         load_file(run / "adapter" / "adapter_model.safetensors"))


def _generator() -> multiprocessing.Process:
    (proc,) = [p for p in multiprocessing.active_children() if p.name == "minigrpo-generator"]
    return proc


def kill_the_generator(prompts, completions, answer, **kwargs):
    """A reward that kills the generator process the first time it runs (step 1), then scores as correctness."""
    if not getattr(kill_the_generator, "done", False):
        kill_the_generator.done = True
        proc = _generator()
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
    return correctness(prompts, completions, answer)


def stop_the_generator(prompts, completions, answer, **kwargs):
    """A reward that freezes the generator process (SIGSTOP: alive, never answering) the first time it runs."""
    if not getattr(stop_the_generator, "done", False):
        stop_the_generator.done = True
        os.kill(_generator().pid, signal.SIGSTOP)
    return correctness(prompts, completions, answer)


def test_a_dead_generator_stops_the_run_with_a_clear_error(tmp_path, capsys):
    """Killed while the trainer waits for it: exit 3 (CLI) naming the step, the signal and the last checkpoint,
    in seconds, not at generator_timeout."""
    t0 = time.time()
    code = main(["train", *STEPS, "--max_staleness=1", "--save_steps=1", f"--output_dir={tmp_path / 'run'}",
                 "--reward_funcs=test_overlap:kill_the_generator"])
    out = capsys.readouterr()
    assert code == 3, out
    message = out.out + out.err
    assert "the generator process" in message and "died (signal SIGKILL)" in message, message
    # killed during step 1: step 1's checkpoint waits for batch 2 (version 0) unless it came back before the kill;
    # the message names the step and the last checkpoint either way
    assert re.search(r"step [123]: the generator process", message), message
    assert "no checkpoint yet" in message or "the last checkpoint is" in message, message
    assert time.time() - t0 < 120


def test_a_stuck_generator_times_out_with_a_message(tmp_path):
    """Alive but silent: after generator_timeout seconds the run stops (GeneratorError, a TrainingStopped) and
    says what to raise if the generation is slow, not stuck; the process is stopped."""
    cfg = Config(max_steps=5, eval_limit=0, per_device_train_batch_size=32, max_staleness=1,
                 generator_timeout=3, save_steps=0, output_dir=str(tmp_path / "run"))
    trainer = GRPOTrainer(reward_funcs=[stop_the_generator], args=cfg)
    t0 = time.time()
    with pytest.raises(GeneratorError, match=r"step (\d): the generator process sent no batch for step \1 in 3 s "
                                             r"\(generator_timeout\)") as e:
        trainer.train()
    assert "larger generator_timeout" in str(e.value) and "no checkpoint yet" in str(e.value)
    assert time.time() - t0 < 120
    assert not [p for p in multiprocessing.active_children() if p.name == "minigrpo-generator"]


@pytest.mark.parametrize("change, named", [
    ({"rollout_backend": "hf"}, "rollout_backend hf"),
    ({"dynamic_sampling": True}, "dynamic_sampling"),
    ({"tools": ["calculator"]}, "tools or an environment"),
    ({"use_peft": True, "gradient_checkpointing": True}, "gradient_checkpointing"),
    ({"gradient_checkpointing": True}, "gradient_checkpointing"),
])
def test_what_overlapped_rollouts_refuse_is_named_before_any_work(change, named):
    with pytest.raises(ConfigError, match=f"max_staleness: 1 .*{named}"):
        Config(max_staleness=1, **change).validate_grpo()
    Config(max_staleness=0, **change).validate_grpo()  # the synchronous loop takes each


class StopAtStep2:
    """A callback: once step 2 is logged, SIGUSR1 to this process (finish the step, save, stop)."""

    def on_log(self, step, metrics):
        if step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.mark.parametrize("before, after, staleness", [
    # the kept batches of steps 3 and 4 (sampled before the stop) come first; checkpoint-3 keeps step 4's again
    (1, 0, [0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]),
    (0, 1, [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]),  # nothing kept: batches 3 and 4 sampled with the resumed policy
    # k 2 -> 1: the kept batches 3-5 are 2 updates stale; the next ones are sampled 1 step ahead, not 2
    (2, 1, [0.0, 1.0, 2.0, 2.0, 2.0, 1.0, 1.0]),
])
def test_a_run_resumed_with_another_max_staleness_goes_on_in_order(tmp_path, before, after, staleness):
    run = tmp_path / "run"
    cfg = Config(max_steps=5, eval_limit=0, per_device_train_batch_size=32, save_steps=0, max_staleness=before,
                 output_dir=str(run))
    with pytest.raises(TrainingStopped, match="interrupted: checkpoint of step 2"):
        GRPOTrainer(args=cfg, callbacks=[StopAtStep2()]).train()
    if before:  # batches 3 .. 2+1+k, sampled ahead before the stop
        assert len(torch.load(run / "checkpoint-2" / "pending-0.pt", weights_only=False)) == before + 1
    assert not list((run / "checkpoint-2").glob("pending-*.pt")) or before
    assert main(["train", "--resume", str(run), f"--max_staleness={after}", "--max_steps=7", "--save_steps=1",
                 "--save_total_limit=0",
                 "--resume_allow_changes=max_staleness,max_steps"]) == 0
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["rollout/staleness"] for r in rows] == staleness
    if after == 0 and before:  # resumed at k = 0, the batch of step 4 still not taken when step 3 saved
        assert [b["step"] for b in torch.load(run / "checkpoint-3" / "pending-0.pt", weights_only=False)] == [4]


def test_a_batch_kept_as_a_request_is_sampled_again_with_the_checkpoints_weights(tmp_path):
    """A checkpoint does not wait for batches still being sampled with its own weights: it keeps them as requests,
    and a resume samples them again with those weights. Made certain here (a request whatever the timing), the
    resumed run ends with the uninterrupted run's weights."""
    base = dict(max_steps=4, eval_limit=0, per_device_train_batch_size=32, save_steps=0, max_staleness=1,
                use_peft=True, learning_rate=1e-3)
    GRPOTrainer(args=Config(**base, output_dir=str(tmp_path / "straight"))).train()
    run = tmp_path / "run"
    with pytest.raises(TrainingStopped, match="interrupted: checkpoint of step 2"):
        GRPOTrainer(args=Config(**base, output_dir=str(run)), callbacks=[StopAtStep2()]).train()
    kept = torch.load(run / "checkpoint-2" / "pending-0.pt", weights_only=False)
    assert [(b["step"], b["version"]) for b in kept] == [(3, 1), (4, 2)]  # batch 4: the checkpoint's weights
    kept[-1]["rollout"] = None
    torch.save(kept, run / "checkpoint-2" / "pending-0.pt")
    write_checksums(run / "checkpoint-2")
    assert main(["train", "--resume", str(run)]) == 0
    assert _same_weights(load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"),
                         load_file(run / "adapter" / "adapter_model.safetensors"))
