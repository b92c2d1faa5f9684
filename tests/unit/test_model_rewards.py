"""Rewards that are models (minigrpo/tasks/model_rewards.py): a sequence-classification reward model built offline,
and a local LLM judge (the shipped tiny-arith model), each scoring a batch and driving 2 GRPO steps."""

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from minigrpo.config import Config
from minigrpo.errors import ConfigError
from minigrpo.tasks import model_rewards
from minigrpo.tasks.model_rewards import Judge, parse_score
from minigrpo.tasks.rewards import load_reward, load_rewards, reward_name
from minigrpo.tiny import tiny_tokenizer
from minigrpo.train import train

ASSET = Path(__file__).resolve().parents[2] / "minigrpo" / "assets" / "tiny-arith"


@pytest.fixture
def reward_model_dir(tmp_path):
    """A tiny reward model: a 2-layer Llama sequence classifier (one label) on the byte-level tiny tokenizer."""
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    model = LlamaForSequenceClassification(config)
    folder = tmp_path / "tiny-rm"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_a_reward_model_scores_a_batch_as_its_own_forward_pass(reward_model_dir):
    rm = load_reward(str(reward_model_dir), {"device": "cpu", "dtype": "float32"})
    assert rm is load_reward(str(reward_model_dir), {"device": "cpu", "dtype": "float32"})  # loaded once
    assert reward_name(str(reward_model_dir)) == "tiny-rm" and rm.slow
    completions = ["#### 4", "four", "I think it is 4, so #### 4", ""]
    values = rm(["P"] * 4, completions, question=["What is 2 + 2?"] * 4)
    by_hand = []
    model = LlamaForSequenceClassification.from_pretrained(reward_model_dir).eval()
    tok = rm.tokenizer
    for text in rm.texts(["P"] * 4, completions, ["What is 2 + 2?"] * 4):
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            by_hand.append(model(**ids).logits[0, 0].item())  # alone: no padding
    assert values == pytest.approx(by_hand, abs=1e-5)  # batched with padding = one by one
    assert len(set(round(v, 6) for v in values)) == 4  # the completion matters
    assert not any(p.requires_grad for p in rm.model.parameters()) and not rm.model.training
    long_question = "x" * 3000  # past max_length: the question's start is cut, the answers still differ
    a, b = rm(["P", "P"], ["#### 4", "#### 999 wrong"], question=[long_question] * 2)
    assert a != b


def test_a_name_that_is_no_reward_says_what_was_tried(tmp_path):
    with pytest.raises(ConfigError, match="not a reward model that loads"):
        load_reward(str(tmp_path))  # a folder, but no model in it
    with pytest.raises(ConfigError, match="a reward model as its hub id or folder"):
        load_reward("corectness")


def test_grpo_with_a_reward_model(reward_model_dir, tiny_data, tmp_path):
    cfg = Config(model="tiny-random", dataset=str(tiny_data), reward_funcs=[str(reward_model_dir)],
                 num_generations=4, per_device_train_batch_size=4, max_completion_length=8, max_steps=2,
                 eval_limit=0, logging_steps=1, seed=0, output_dir=str(tmp_path / "run"))
    run = train(cfg, show_progress=False)
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "train/rewards/tiny-rm/mean" in r]
    assert len(steps) == 2 and all(r["train/rewards/tiny-rm/std"] > 0 and r["train/grad_norm"] > 0 for r in steps)
    assert all(r["perf/reward/tiny-rm_s"] > 0 for r in steps)


def test_parse_score_and_rubrics(tmp_path):
    assert parse_score("ok.\nScore: 7\nthen Score: 9", 10) == 0.9  # the last one
    assert parse_score("**Score:** 3", 10) == 0.3 and parse_score("score = 10", 10) == 1.0
    assert parse_score("Score: -2", 10) == 0.0 and parse_score("I give it a 7", 10) is None
    two = __import__("re").compile(r"Verdict: (\w+)/(\d+)")  # two groups, the first not a number: no verdict
    assert parse_score("Verdict: 7/10", 10, two) == 0.7 and parse_score("Verdict: good/10", 10, two) is None
    judge = Judge.__new__(Judge)  # the rubric filling alone, no model
    judge.template, judge.scale = model_rewards.rubric_text("correct"), 10.0
    text = judge.prompts(["What is 2 + 2?"], ["#### 4"], ["4"])[0]
    assert "Question:\nWhat is 2 + 2?" in text and "Reference answer:\n4" in text and "from 0" in text
    assert "Reference answer" not in judge.prompts(["Q"], ["A"], [None])[0]
    bad = tmp_path / "rubric.txt"
    bad.write_text("Grade {answr}")
    with pytest.raises(ConfigError, match="placeholder"):
        model_rewards.rubric_text(str(bad))
    with pytest.raises(ConfigError, match="neither a built-in rubric"):
        model_rewards.rubric_text("kind")
    with pytest.raises(ConfigError, match="needs a group around the verdict"):
        Judge("m", base_url="http://127.0.0.1:9/v1", pattern="Score: [0-9]")
    with pytest.raises(ConfigError, match="is not a regular expression"):
        Judge("m", base_url="http://127.0.0.1:9/v1", pattern="Score: ([0-9]")
    with pytest.raises(ConfigError, match="judge needs judge_model"):
        load_rewards(Config(reward_funcs=["judge"]))


def arith_judge(tmp_path):
    """The shipped tiny-arith model as a judge with a rubric it can follow: the "answer" is an arith question, which
    it works out; its `#### N` is the verdict (a pattern of this rubric's own), N / 10 the score."""
    rubric = tmp_path / "rubric.txt"
    rubric.write_text("{answer}")
    return Judge(str(ASSET), rubric=str(rubric), pattern=r"####\s*(\d+)", max_tokens=32)


def test_a_local_judge_scores_with_its_rubric(tmp_path):
    judge = arith_judge(tmp_path)
    questions = ["What is 2 + 3?", "What is 4 + 4?", "What is 9 + 9?"]
    values = judge(["p"] * 3, questions, question=["q"] * 3)
    expected = [min(1.0, int(o.rsplit("####", 1)[1].split()[0]) / 10) if "####" in o else None
                for o in judge.outputs]
    assert values == expected and values.count(None) == judge.failures < 3
    plain = Judge(str(ASSET))  # the built-in rubric: the tiny model writes no "Score: N", so no opinion
    assert plain(["p"], ["#### 3"], question=["What is 1 + 2?"], answer=["3"]) == [None] and plain.failures == 1


def test_grpo_with_a_local_judge(tiny_data, tmp_path):
    """2 GRPO steps whose one reward is the judge (from Python, as an object; by name it needs judge_model)."""
    judge = arith_judge(tmp_path)
    cfg = Config(model="tiny-random", dataset=str(tiny_data), reward_funcs=[judge], num_generations=4,
                 per_device_train_batch_size=4, max_completion_length=8, max_steps=2, eval_limit=0,
                 logging_steps=1, seed=0, output_dir=str(tmp_path / "run"))
    run = train(cfg, show_progress=False)
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "train/rewards/judge/mean" in r]
    assert len(steps) == 2 and all(r["perf/reward/judge_s"] > 0 for r in steps)
    assert judge.outputs and len(judge.outputs) == 4  # it judged the last batch's 4 completions
    by_name = Config(reward_funcs=["judge"], judge_model=str(ASSET))
    assert isinstance(load_rewards(by_name)[0][1], Judge)
