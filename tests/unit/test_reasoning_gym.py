"""reasoning-gym as a dataset source (`dataset: reasoning_gym:TASK`) and its verifier as the reward `reasoning_gym`."""

import pytest

from minigrpo.config import Config
from minigrpo.errors import ConfigError, DataError
from minigrpo.evaluate import resolve_metric
from minigrpo.tasks import reasoning_gym as rg
from minigrpo.tasks.rewards import load_reward, reasoning_gym_reward, reward_inputs
from minigrpo.tasks.sources import has_held_out, load_split

pytest.importorskip("reasoning_gym")  # in the lock (the dev extra); a bare install may not have it

# 1-digit sums of two terms: a small problem space, where train and test streams share questions
SMALL = "datasets:\n  - name: basic_arithmetic\n    weight: 1\n    config: {min_terms: 2, max_terms: 2, " \
        "min_digits: 1, max_digits: 1}\n"


def test_rows_are_deterministic_and_splits_never_share_a_question(tmp_path):
    spec_file = tmp_path / "small.yaml"
    spec_file.write_text(SMALL)
    spec = f"reasoning_gym:{spec_file}"
    test = rg.rows(spec, "test", rg.HELD_OUT)
    train = rg.rows(spec, "train", 300)
    assert len(train) == 300 and train == rg.rows(spec, "train", 300)
    assert rg.rows(spec, "test", 7) == test[:7]  # a smaller eval set is a prefix
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    assert set(train[0]) == {"question", "answer", "metadata"}
    assert train[0]["metadata"]["source_dataset"] == "basic_arithmetic"
    # without the exclusion the streams would overlap (that is what it is for)
    raw = rg._generator(spec, "train", 300)
    assert {raw[i]["question"] for i in range(300)} & {r["question"] for r in test}


def test_load_split_gives_examples_with_the_gold_and_metadata_columns():
    cfg = Config(dataset="reasoning_gym:leg_counting,word_sorting", reasoning_gym_size=40)
    train, test = load_split(cfg, "train"), load_split(cfg, "test", 5)
    assert len(train) == 40 and len(test) == 5 and has_held_out(cfg)
    assert {ex.columns["metadata"]["source_dataset"] for ex in train} == {"leg_counting", "word_sorting"}
    ex = next(ex for ex in train if ex.columns["metadata"]["source_dataset"] == "word_sorting")
    assert ex.columns["solution"] == ex.answer and "," in ex.answer  # the oracle answer as the task wrote it
    assert ex.where == f"reasoning_gym:leg_counting,word_sorting [train], row {train.index(ex)}"


@pytest.mark.parametrize("text, expected", [
    ("I think <answer>12</answer> no wait <answer> 13 </answer>", "13"),
    ("2 + 5 = 7\n#### 7", "7"),
    ("#### apple, banana\nthat is all", "apple, banana"),
    ("so \\boxed{x + 1}", "x + 1"),
    ("#### \n", None),
    ("no answer here", None),
])
def test_answer_text(text, expected):
    assert rg.answer_text(text) == expected


def test_reward_scores_with_the_task_verifier():
    cfg = Config(dataset="reasoning_gym:word_sorting,leg_counting", reasoning_gym_size=10)
    exs = load_split(cfg, "test", 2)
    exs.sort(key=lambda ex: ex.columns["metadata"]["source_dataset"], reverse=True)
    assert [ex.columns["metadata"]["source_dataset"] for ex in exs] == ["word_sorting", "leg_counting"]
    words, legs = exs[0].answer, exs[1].answer
    completions = [f"sorted:\n#### {words}", "<answer>nope</answer>", f"<answer>{legs}</answer>", "I do not know"]
    prompts, comps, columns = reward_inputs(exs, ["p0", "p0", "p1", "p1"], completions, 2)
    assert load_reward("reasoning_gym") is reasoning_gym_reward
    assert reasoning_gym_reward(prompts, comps, **columns) == [1.0, 0.0, 1.0, 0.0]
    # a row not from reasoning-gym (no task in its metadata): no opinion
    assert reasoning_gym_reward(["p"], ["#### 3"], question=["q"], solution=["3"], metadata=[None]) == [None]
    assert reasoning_gym_reward(["p"], ["#### 3"], answer=["3"]) == [None]


def test_eval_metric_auto_is_the_verifier_on_reasoning_gym_tasks():
    cfg = Config(dataset="reasoning_gym:leg_counting", reasoning_gym_size=10)
    name, funcs = resolve_metric(cfg, load_split(cfg, "test", 3))
    assert name == "reasoning_gym" and funcs[0][1] is reasoning_gym_reward
    assert resolve_metric(Config(), load_split(Config(), "test", 3))[0] == "accuracy"  # arith: unchanged


def test_bad_specs_are_refused_with_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match=r"'leg_count' is not a reasoning-gym task .*did you mean leg_counting"):
        rg.rows("reasoning_gym:leg_count", "train", 5)
    with pytest.raises(ConfigError, match="named twice"):
        rg.rows("reasoning_gym:gcd,gcd", "train", 5)
    with pytest.raises(ConfigError, match="'validation' is not a split of reasoning_gym:gcd"):
        load_split(Config(dataset="reasoning_gym:gcd"), "validation")
    with pytest.raises(ConfigError, match="at most 1000 held-out rows"):
        rg.rows("reasoning_gym:gcd", "test", 1001)
    with pytest.raises(ConfigError, match="no such file"):
        rg.rows(f"reasoning_gym:{tmp_path / 'missing.yaml'}", "train", 5)
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 3\n" + SMALL)
    with pytest.raises(ConfigError, match="'seed' is set by minigrpo"):
        rg.rows(f"reasoning_gym:{bad}", "train", 5)
    bad.write_text("datasets: []\n")
    with pytest.raises(ConfigError, match="non-empty 'datasets' list"):
        rg.rows(f"reasoning_gym:{bad}", "train", 5)
    bad.write_text(SMALL.replace("min_terms: 2", "min_terms: 2, no_such_option: 1"))
    with pytest.raises(ConfigError, match="reasoning-gym refused the task config.*no_such_option"):
        rg.rows(f"reasoning_gym:{bad}", "train", 5)
    # a problem space too small for the train size asked for
    # a+b of one digit: ~100 problems, all among the 1000 held-out rows
    bad.write_text(SMALL.replace("max_digits: 1", "max_digits: 1, operators: ['+'], allow_negation: false, "
                                                  "allow_parentheses: false"))
    with pytest.raises(DataError, match="too few distinct problems for reasoning_gym_size 50"):
        rg.rows(f"reasoning_gym:{bad}", "train", 50)
    with pytest.raises(ConfigError, match="reasoning_gym_size"):
        Config(dataset="reasoning_gym:gcd", reasoning_gym_size=0)
