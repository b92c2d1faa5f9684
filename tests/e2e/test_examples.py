"""examples/*.py run as users run them, on tiny models: the TRL port against a local stand-in of the Hugging Face
cache (a tiny random Qwen2 under "Qwen/Qwen2-0.5B-Instruct" and a small "trl-lib/tldr", both read offline by
transformers and datasets exactly as the real ones would be), the others with MODEL=tiny-random. Each run is cut
to a few steps by wrapping GRPOConfig's defaults, nothing else of the script changes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from datasets.packaged_modules.parquet.parquet import Parquet
from transformers import Qwen2Config, Qwen2ForCausalLM

from minigrpo.tiny import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
SHORT = "max_steps=2, num_generations=4, per_device_train_batch_size=8, max_completion_length=8, eval_limit=4, " \
        "eval_steps=0, logging_steps=1, num_threads=1"


def hub_repo(home: Path, kind: str, repo_id: str) -> Path:
    """A snapshot folder of `repo_id` in the hub cache layout (refs/main -> snapshots/<commit>/)."""
    commit = "0" * 40
    repo = home / "hub" / f"{kind}s--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    return repo / "snapshots" / commit


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    """HF_HOME holding the TRL quick start's model and dataset, as a real download would leave them."""
    home = tmp_path_factory.mktemp("hf_home")
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                         tie_word_embeddings=True))
    snapshot = hub_repo(home, "model", "Qwen/Qwen2-0.5B-Instruct")
    model.save_pretrained(snapshot)
    tok.save_pretrained(snapshot)
    posts = [{"prompt": f"SUBREDDIT: r/cats\nPOST: My cat {i} sleeps all day on the sofa.\nTL;DR:",
              "completion": " my cat sleeps"} for i in range(32)]
    snapshot = hub_repo(home, "dataset", "trl-lib/tldr")
    (snapshot / "data").mkdir()
    parquet = snapshot / "data" / "train-00000-of-00001.parquet"
    datasets.Dataset.from_list(posts).to_parquet(parquet)
    # datasets reads a hub dataset offline from its own prepared cache: {namespace}___{name}/default/0.0.0/<hash>/
    Parquet(cache_dir=str(home / "datasets"), dataset_name="trl-lib___tldr", hash="0" * 16,
            data_files={"train": str(parquet)}).download_and_prepare()
    prepared = home / "datasets" / "trl-lib___tldr"
    next(prepared.glob("default-*")).rename(prepared / "default")
    for arrow in prepared.rglob("trl-lib___tldr-*.arrow"):
        arrow.rename(arrow.with_name(arrow.name.replace("trl-lib___tldr", "tldr")))
    return home


def run_example(name: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """examples/NAME as `python examples/NAME` runs it, with GRPOConfig's and SFTConfig's values cut to a smoke run
    (SHORT's keys replace the example's own)."""
    code = (f"import functools, runpy, minigrpo.api as api; "
            f"api.GRPOConfig = api.SFTConfig = lambda **kw: api.Config(**(kw | dict({SHORT}))); "
            f"runpy.run_path({str(ROOT / 'examples' / name)!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"OMP_NUM_THREADS": "1", **env})


def test_trl_quickstart_port(hf_home, tmp_path):
    out = run_example("trl_quickstart.py", tmp_path, {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    run = tmp_path / "Qwen2-0.5B-GRPO"  # TRL's output_dir, as the script names it
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # no eval set given: no held-out evaluation, and it says so
    assert "no held-out evaluation" in out.stdout
    assert rows[0]["train/rewards/reward_len/mean"] <= 0  # -|20 - len| of each completion
    sample = json.loads((run / "samples.jsonl").read_text().splitlines()[0])
    assert sample["prompt"].startswith("SUBREDDIT: r/cats")  # TRL's standard format: the text as given
    assert (run / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("name,metric", [("custom_task.py", "eval/uses_keyword"),
                                         ("conversational.py", "eval/accuracy")])
def test_examples_run_on_a_tiny_model(name, metric, tmp_path):
    out = run_example(name, tmp_path, {"MODEL": "tiny-random"})
    assert out.returncode == 0, out.stdout + out.stderr
    run = next(p for p in (tmp_path / "runs").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert metric in summary["before"] and metric in summary["after"]
    assert (run / "adapter" / "adapter_config.json").is_file()  # both use LoRA


def test_the_python_tool_example_runs_on_a_tiny_model(tmp_path):
    """The cold start on python-calling conversations, then GRPO with the sandboxed tool, on the ChatML tiny model
    (a random model calls nothing: the path, not the skill; the SmolLM2 figures are in BENCHMARKS.md)."""
    from minigrpo.agent import sandbox  # here: only this test needs it

    if (missing := sandbox.check()) and not os.environ.get("CI"):
        pytest.skip(f"the python tool's sandbox: {missing}")
    out = run_example("python_tool.py", tmp_path, {"MODEL": "tiny-random"})
    assert out.returncode == 0, out.stdout + out.stderr
    cold = json.loads((tmp_path / "runs" / "python-tool-sft" / "summary.json").read_text())
    grpo = json.loads((tmp_path / "runs" / "python-tool" / "summary.json").read_text())
    assert cold["stage"] == "SFT" and grpo["stage"] == "GRPO" and cold["steps"] == grpo["steps"] == 2
    assert "eval/tool_call_frequency" in grpo["after"]  # evaluated with the tool
    assert (tmp_path / "runs" / "python-tool" / "adapter" / "adapter_config.json").is_file()
