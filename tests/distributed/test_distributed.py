"""Two processes (gloo on CPU) give the one-process result on the same global batch, also across a resume.

Engines: DDP (torchrun), DeepSpeed ZeRO-2 with the optimizer offloaded to CPU (accelerate launch with
configs/accelerate/zero2.yaml) and ZeRO-3 with every parameter partitioned (persistence threshold 0, so the
gathering for generation is exercised). FSDP: accelerate runs it on GPUs only; its generation helper is
tested here on torch's FSDP2 directly.
"""

import importlib.util
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


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
HERE = os.path.dirname(os.path.abspath(__file__))  # tests/distributed: the helper scripts
ACCELERATE = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--num_processes=2",
              "--mixed_precision=no"]
ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
         "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": 1}
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def _launcher(engine: str, tmp_path) -> list[str]:
    if engine == "ddp":
        return [TORCHRUN, "--nproc_per_node=2", "-m", "minigrpo"]
    if engine == "zero2":  # the shipped config: ZeRO-2, optimizer offloaded to CPU (DeepSpeed's CPU Adam)
        return [*ACCELERATE, f"--config_file={ROOT}/configs/accelerate/zero2.yaml", "-m", "minigrpo"]
    config = tmp_path / "zero3.json"
    config.write_text(json.dumps(ZERO3))
    return [*ACCELERATE, "--use_deepspeed", f"--deepspeed_config_file={config}", "-m", "minigrpo"]


def _run(launcher: list[str], *args: str, ok: bool = True, command: str = "train") -> subprocess.CompletedProcess:
    out = subprocess.run([*launcher, command, *args], capture_output=True, text=True, cwd=ROOT,
                         env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=900)
    assert (out.returncode == 0) == ok, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def _torchrun(*args: str) -> None:
    _run([TORCHRUN, "--nproc_per_node=2", "-m", "minigrpo"], *args)


def _engine(engine: str, *more):
    return pytest.param(engine, *more, marks=pytest.mark.skipif(engine != "ddp" and not HAS_DEEPSPEED,
                                                                reason="deepspeed not installed"))


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_weights(a_dir, b_dir, atol=1e-4, stray=None):
    """Every entry close; with stray=(fraction, bound), at most that fraction of a tensor's entries may be off by
    more, each by at most bound."""
    a = load_file(a_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(b_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        if stray is None:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-3, msg=lambda m, k=k: f"{k}: {m}")
            continue
        diff = (a[k] - b[k]).abs()
        off = diff > atol + 1e-3 * b[k].abs()
        assert off.float().mean() <= stray[0] and diff.max() <= stray[1], \
            f"{k}: {int(off.sum())} of {off.numel()} entries off, the largest by {diff.max():.2e}"


@pytest.mark.parametrize("engine, loss_type, extra, resume", [
    _engine("ddp", "dapo", (), True),
    _engine("ddp", "grpo", ("--scale_rewards=batch",), False),  # grpo's per-sequence mean; the gathered batch's std
    _engine("zero2", "dapo", (), True), _engine("zero3", "grpo", ("--beta=0.04",), True),
    # overlapped rollouts: a generator process per training process, each sampling its share one step ahead
    _engine("ddp", "dapo", ("--max_staleness=1",), "crash"),
    # issue 22: the entropy quantile over both processes' tokens, REINFORCE++ whitened over the global batch, the
    # adaptive entropy coefficient carried by the checkpoint
    _engine("ddp", "dapo", ("--top_entropy_quantile=0.5", "--use_adaptive_entropy=true", "--entropy_coef=0.01",
                            "--entropy_target=10", "--adv_estimator=reinforce_plus_plus"), True)])
def test_two_processes_match_one_on_the_same_global_batch(tmp_path, engine, loss_type, extra, resume):
    """3 steps in one process against 3 in two on the same 16 completions per step; with `resume` the two-process
    run stops after 2 (a checkpoint each step) and a second launch resumes it to 3: one launch per engine less than
    a straight run and a resumed one, and what is compared is the same (weights, every logged row)."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = [*BASE, f"--loss_type={loss_type}", *extra]
    # one process: 16 completions per micro-batch; two: 8 each, the same 16 per step in all
    assert main(["train", *args, "--max_steps=3", "--per_device_train_batch_size=16", f"--output_dir={one}"]) == 0
    launch = _launcher(engine, tmp_path)
    if not resume:
        _run(launch, *args, "--max_steps=3", "--per_device_train_batch_size=8", f"--output_dir={two}")
    elif resume == "crash":  # a straight run, then as if it had died after checkpoint-2, resumed: every process
        # takes back its batch of step 3, sampled ahead before the checkpoint (with max_steps 2 it would not exist)
        _run(launch, *args, "--max_steps=3", "--save_steps=1", "--per_device_train_batch_size=8",
             f"--output_dir={two}")
        assert sorted(p.name for p in (two / "checkpoint-2").glob("pending-*")) == ["pending-0.pt", "pending-1.pt"]
        for done in ("checkpoint-3", "adapter", "summary.json"):
            shutil.rmtree(two / done) if (two / done).is_dir() else (two / done).unlink()
        _run(launch, "--resume", str(two))
    else:
        _run(launch, *args, "--max_steps=2", "--save_steps=1", "--per_device_train_batch_size=8",
             f"--output_dir={two}")
        assert (two / "checkpoint-2").is_dir()
        if engine != "ddp":  # each process's shards of weights and optimizer, beside the policy
            assert (two / "checkpoint-2" / "shards" / "pytorch_model").is_dir()
        if engine == "zero2":  # engine shards resumed by another launch: refused, and the run is left as it was
            out = _run([*ACCELERATE[:2], "--num_processes=1", "--mixed_precision=no",
                        f"--config_file={ROOT}/configs/accelerate/zero2.yaml", "-m", "minigrpo"],
                       "--resume", str(two), "--max_steps=3", ok=False)  # the launcher reports the exit 2 as 1
            assert "deepspeed shards of 2 process(es); this launch is deepspeed with 1" in out.stderr, \
                out.stderr[-3000:]
        _run(launch, "--resume", str(two), "--max_steps=3")
    # Rounding differs between the runs: ZeRO-3 reduce-scatters gradients in another order, and one process computes
    # its log-probs with the engine's own forward (logprobs._native) where a strategy's wrapper runs transformers'
    # (the same arithmetic, ~1e-7 apart). Adam turns rounding in near-zero gradient entries into differences of up
    # to its step size (lr 1e-3) on a few of the 233k weights: ~2e-4 on AVX2 machines, 1.2e-3 on 2 of a tensor's
    # 3072 entries on AVX-512 ones (the 99.9th percentile is 2e-6). Those few, bounded by 3 steps' worth of lr;
    # every other entry within 3e-4.
    _assert_same_weights(one, two, atol=3e-4, stray=(0.005, 3e-3))
    rows_one, rows_two = _rows(one), _rows(two)
    assert [r["step"] for r in rows_two] == [1, 2, 3]  # process 0 alone logs; a resumed run's rows continue
    for a, b in zip(rows_one, rows_two, strict=True):
        for key in ("train/reward", "train/accuracy", "completions/mean_length", "train/frac_reward_zero_std",
                    "completions/max_length"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
        for key in ("train/kl", "train/entropy", "train/clip_ratio"):  # token means over the global batch
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
        assert a["train/loss"] == pytest.approx(b["train/loss"], abs=1e-4)
        assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-3)
        assert a["rollout/staleness"] == b["rollout/staleness"]
        # issue 22's case: the same token selection and entropy control
        for key in ("train/entropy_coef", "train/entropy_coef_applied", "train/entropy_kept"):
            assert a.get(key) == pytest.approx(b.get(key), abs=1e-6), key


def test_dynamic_sampling_with_two_processes(tmp_path):
    """Each process tops up its own batch; all draw the same number of extra prompts (the largest need)."""
    run = tmp_path / "run"
    _torchrun(*BASE, "--max_steps=3", "--dynamic_sampling=true", "--max_sampling_tries=4",
              "--per_device_train_batch_size=16", f"--output_dir={run}")  # 4 groups of 4 per process
    rows = [r for r in _rows(run) if "train/sampling_tries" in r]
    assert len(rows) == 3 and max(r["train/sampling_tries"] for r in rows) > 1
    for r in rows:  # informative groups per process: all 4 unless the tries ran out
        assert r["train/informative_groups"] == 4 or r["train/sampling_tries"] == 4


def test_fsdp2_generation_helper():
    out = subprocess.run([TORCHRUN, "--nproc_per_node=2", os.path.join(HERE, "fsdp_generate.py")],
                         capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=600)
    assert out.returncode == 0 and "rank 0: ok" in out.stdout and "rank 1: ok" in out.stdout, out.stderr[-4000:]


@pytest.mark.parametrize("engine", [_engine("ddp"), _engine("zero2")])
def test_sft_with_two_processes_matches_one(tmp_path, engine):
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["--use_peft=true", "--eval_limit=0", "--max_steps=3", "--learning_rate=1e-3", "--logging_steps=1",
            "--num_generations=2"]
    assert main(["sft", *args, "--per_device_train_batch_size=8", f"--output_dir={one}"]) == 0
    _run(_launcher(engine, tmp_path), *args, "--per_device_train_batch_size=4", f"--output_dir={two}",
         command="sft")
    _assert_same_weights(one, two)
    for a, b in zip(_rows(one), _rows(two), strict=True):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)
        assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-4)


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed not installed")
def test_deepspeed_skips_a_non_finite_step():
    out = subprocess.run([*ACCELERATE, f"--config_file={ROOT}/configs/accelerate/zero2.yaml",
                          os.path.join(HERE, "deepspeed_skip.py")], capture_output=True, text=True,
                         cwd=ROOT, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=600)
    assert out.returncode == 0 and "rank 0: ok" in out.stdout and "rank 1: ok" in out.stdout, out.stderr[-4000:]
