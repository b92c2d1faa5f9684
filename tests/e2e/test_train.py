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
    "perf/score_s", "perf/train_s", "perf/step_s", "perf/tokens_per_s", "memory/peak_gb", "perf/reward/digits_s",
    "perf/reward/correctness_s",
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


def test_multi_turn_run_with_a_tool_logs_tool_use(smoke_cfg, monkeypatch):
    """Two GRPO steps whose trajectories hold answers between turns (tool_mask on), end to end: the loss passes,
    the evaluation and the metrics. The random model writes no tool call, so every turn (ended by any letter or
    digit, a stop string) is answered as a tool would be."""
    import string

    from minigrpo.agent.turns import Episodes

    def respond(self, rows, texts):
        self.pending = {r: {"tool_calls": 1.0} for r in rows}  # counted when delivered
        return [[{"role": "tool", "name": "calculator", "content": "42"}] for _ in rows]

    monkeypatch.setattr(Episodes, "respond", respond)
    cfg = Config(**smoke_cfg | {"max_completion_length": 48}, tools=["calculator"], max_turns=3, logging_steps=1,
                 stop_strings=list(string.ascii_letters + string.digits))
    run = train(cfg, show_progress=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/reward" in r]
    assert len(steps) == 2 and all(r["tools/turns"] > 1.5 and r["tools/call_frequency"] > 0.5 for r in steps)
    assert all(r["train/grad_norm"] > 0 for r in steps)
    assert "eval/tool_call_frequency" in rows[-1]
    sample = json.loads((run / "samples.jsonl").read_text().splitlines()[0])
    assert "tool\n42\nassistant\n" in sample["completion"]  # the whole trajectory is what the rewards saw


class Echo:
    """An environment for a random model: it answers every turn; its first step's reward is the row's answer plus
    0.1 for a turn of odd length (so the samples of a group differ, and a reward landing on another row shows)."""

    def reset(self, row):
        self.answer, self.steps = int(row["answer"]), 0

    def step(self, text):
        self.steps += 1
        return "Say more.", self.answer + len(text) % 2 / 10 if self.steps == 1 else 0.0, False


def test_multi_turn_run_with_an_environment_rewards_from_it(smoke_cfg):
    """Two GRPO steps whose turns an environment answers and scores: its rewards are the reward `environment`."""
    import string

    cfg = Config(**smoke_cfg | {"max_completion_length": 64, "reward_funcs": ["environment"]}, environment=Echo,
                 max_turns=3, logging_steps=1, stop_strings=list(string.ascii_letters + string.digits))
    run = train(cfg, show_progress=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/reward" in r]
    assert len(steps) == 2 and all(r["tools/turns"] > 1.5 and r["env/errors"] == 0 for r in steps)
    assert all(r["env/reward"] > 0 and r["train/rewards/environment/mean"] == pytest.approx(r["env/reward"])
               for r in steps)
    assert all(r["train/grad_norm"] > 0 for r in steps)
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert "user\nSay more.\nassistant\n" in samples[0]["completion"]  # the whole trajectory is what rewards saw
    assert all(round(s["rewards/environment"] - int(s["answer"]), 6) in (0.0, 0.1) for s in samples)  # its own row


def test_tools_are_checked_at_start(smoke_cfg):
    from minigrpo.errors import ConfigError

    with pytest.raises(ConfigError, match="tools: unknown tool 'search'"):
        train(Config(**smoke_cfg, tools=["search"]), show_progress=False)
    with pytest.raises(ConfigError, match="max_turns: must be >= 1"):
        Config(**smoke_cfg, tools=["calculator"], max_turns=0).validate()


def test_reasoning_gym_task_trains_and_evaluates_with_its_verifier(smoke_cfg):
    """Two GRPO steps on a reasoning-gym task: its verifier is a reward and the held-out metric (eval_metric auto)."""
    pytest.importorskip("reasoning_gym")
    cfg = Config(**smoke_cfg | {"dataset": "reasoning_gym:leg_counting", "reward_funcs": ["digits", "reasoning_gym"]},
                 reasoning_gym_size=16, max_prompt_length=1024, logging_steps=1)
    run = train(cfg, show_progress=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/reward" in r]
    assert len(steps) == 2 and all(0 <= r["train/rewards/reasoning_gym/mean"] <= 1 for r in steps)
    assert "eval/reasoning_gym" in rows[0] and "eval/reasoning_gym" in rows[-1]
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert "how many legs" in samples[0]["prompt"] and "rewards/reasoning_gym" in samples[0]


def test_code_task_trains_with_its_tests_as_the_reward(smoke_cfg, tmp_path):
    """Two GRPO steps on a small code task (a JSONL of problems with `tests`): the code_tests reward runs every
    sample against its row's tests in the sandbox, and is the held-out metric."""
    from minigrpo.agent import sandbox

    if sandbox.check() is not None:
        pytest.skip(f"no sandbox here: {sandbox.check()}")
    data = tmp_path / "code"
    data.mkdir()
    for split, offset in (("train", 0), ("test", 10)):
        rows = [{"question": f"Write f(x) returning x + {k}.", "code_prompt": "def f(x):\n",
                 "tests": [f"assert f(1) == {1 + k}", f"assert f(0) == {k}"]} for k in range(offset, offset + 4)]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = Config(**smoke_cfg | {"dataset": str(data), "reward_funcs": ["digits", "code_tests"]}, logging_steps=1,
                 code_timeout=3)
    run = train(cfg, show_progress=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/reward" in r]
    assert len(steps) == 2 and all(r["train/rewards/code_tests/mean"] == 0.0 for r in steps)  # random bytes: no code
    assert rows[0]["eval/code_tests"] == 0.0 and "eval/code_tests" in rows[-1]
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert all(s["rewards/code_tests"] == 0.0 for s in samples)


def test_bfloat16_rollouts_log_and_correct_their_mismatch(smoke_cfg):
    """rollout_dtype bfloat16 under float32 weights (LoRA merged, then cast): the run trains, each step logs the
    sampler's mismatch (larger than float32 sampling's ~1e-6, small) and the correction's ratios, and the saved
    adapter stays float32."""
    run = train(Config(**smoke_cfg, use_peft=True, rollout_dtype="bfloat16"), show_progress=False)
    steps = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "train/reward" in r]
    assert len(steps) == 2
    for s in steps:
        assert 1e-4 < s["rollout/logprob_diff_mean"] < 0.05, s
        assert abs(s["rollout/is_ratio_mean"] - 1) < 0.05 and s["rollout/is_ratio_min"] < 1 < s["rollout/is_ratio_max"]
    trained = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert {t.dtype for t in trained.values()} == {torch.float32}
