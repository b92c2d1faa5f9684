"""Smoke runs of the whole loop on a tiny random model built offline (TRL's 'parameters changed' test)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from minigrpo.config import Config
from minigrpo.run import PromptSampler
from minigrpo.tasks import rewards
from minigrpo.train import train

METRIC_KEYS = {
    "train/reward", "train/rewards/digits/mean", "train/rewards/digits/std", "train/rewards/correctness/mean",
    "train/rewards/correctness/std", "train/advantage_mean", "train/advantage_std", "train/accuracy", "train/kl",
    "train/clip_ratio", "train/entropy", "train/grad_norm", "train/learning_rate", "train/loss",
    "train/frac_reward_zero_std", "completions/mean_length", "completions/truncated_ratio", "perf/generate_s",
    "perf/score_s", "perf/train_s", "perf/step_s", "perf/tokens_per_s", "memory/peak_gb",
}


def digits(prompts, completions, **kwargs):
    """A reward a random model gets varied values of (so advantages and gradients are non-zero)."""
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


@pytest.fixture
def smoke_cfg(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setitem(rewards.REWARD_FUNCS, "digits", digits)
    return dict(model="tiny-random", dataset=str(tiny_data), reward_funcs=["digits", "correctness"],
                num_generations=4, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                max_completion_length=16, learning_rate=1e-2, max_steps=2, eval_limit=4, seed=0,
                output_dir=str(tmp_path / "run"))


def test_two_steps_lora_changes_adapter_and_logs(smoke_cfg):
    from minigrpo.model import load_model

    before, _ = load_model(Config(model="tiny-random", seed=0, use_peft=True))  # the same init (seeded) before training
    lora_before = {n: p.detach().clone() for n, p in before.named_parameters() if "lora_B" in n}
    run = train(Config(**smoke_cfg, beta=0.04, use_peft=True), show_progress=False)
    for name in ("config.yaml", "metrics.jsonl", "samples.jsonl", "summary.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (run / name).exists(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert METRIC_KEYS <= set(steps[0])
    assert steps[0]["train/grad_norm"] > 0
    assert steps[1]["train/kl"] > 0  # the policy moved away from the base after step 1
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[-1]
    trained = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert len([n for n in trained if "lora_B" in n]) == len(lora_before) > 0
    changed = [n for n, p in lora_before.items() if not torch.equal(p, trained[n.replace(".default", "")])]
    assert changed, "LoRA B matrices (zero at init) must have moved"


def test_two_steps_full_finetune_with_reference(smoke_cfg):
    from minigrpo.model import load_model

    before, _ = load_model(Config(model="tiny-random", seed=0, use_peft=False))
    run = train(Config(**smoke_cfg, use_peft=False, beta=0.1, num_iterations=2, loss_type="grpo"),
                show_progress=False)
    from transformers import AutoModelForCausalLM

    after = AutoModelForCausalLM.from_pretrained(run / "model")
    diffs = [(p - q).abs().max().item() for p, q in zip(before.parameters(), after.parameters())]
    assert max(diffs) > 0
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("train/kl", 0) > 0 for r in steps)


def test_prompt_sampler_covers_each_pass_once():
    s = PromptSampler(5, seed=0)
    first, second = s.take(5), s.take(5)
    assert sorted(first) == sorted(second) == [0, 1, 2, 3, 4]
    assert PromptSampler(5, seed=0).take(7) == first + second[:2]  # reproducible from the seed


def test_prompt_too_long_is_an_error_naming_the_row(smoke_cfg):
    with pytest.raises(ValueError, match=r"row 1: the prompt has \d+ tokens > max_prompt_length=10"):
        train(Config(**smoke_cfg | {"max_prompt_length": 10}), show_progress=False)
