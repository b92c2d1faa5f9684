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
    assert set(train[0]) == {"question", "answer", "metadata", "reasoning_gym_task"}
    assert train[0]["reasoning_gym_task"] == spec
    assert train[0]["metadata"]["source_dataset"] == "basic_arithmetic"
    # without the exclusion the streams would overlap (that is what it is for)
    raw = rg._generator(spec, "train", 300)  # (here, in this process: the same task, hash-independent)
    assert {raw[i]["question"] for i in range(300)} & {r["question"] for r in test}


def test_load_split_gives_examples_with_the_gold_and_metadata_columns():
    cfg = Config(dataset="reasoning_gym:leg_counting,word_sorting", reasoning_gym_size=40)
    train, test = load_split(cfg, "train"), load_split(cfg, "test", 5)
    assert len(train) == 40 and len(test) == 5 and has_held_out(cfg)
    assert {ex.columns["metadata"]["source_dataset"] for ex in train} == {"leg_counting", "word_sorting"}
    ex = next(ex for ex in train if ex.columns["metadata"]["source_dataset"] == "word_sorting")
    assert ex.columns["solution"] == ex.answer and "," in ex.answer  # the oracle answer as the task wrote it
    assert ex.where == f"reasoning_gym:leg_counting,word_sorting [train], row {train.index(ex)}"


def test_rows_are_the_same_in_every_process():
    """isomorphic_strings iterates over sets: generated in this process its problems depend on PYTHONHASHSEED; `rows`
    makes them in a child with PYTHONHASHSEED=0, so a second process (another rank, a later eval) gets the same."""
    import subprocess
    import sys

    code = ("import json, sys; from minigrpo.tasks import reasoning_gym as rg; "
            "print(json.dumps([r['question'] for r in rg.{fn}('reasoning_gym:isomorphic_strings', 'test', 4)]))")
    def run(fn, seed):
        out = subprocess.run([sys.executable, "-c", code.format(fn=fn)], capture_output=True, text=True, check=True,
                             env=__import__("os").environ | {"PYTHONHASHSEED": seed})
        return out.stdout
    assert run("rows_here", "1") != run("rows_here", "2")  # what the child process is for
    assert run("rows", "1") == run("rows", "2")


def test_a_task_that_draws_its_set_by_size_gives_a_prefix():
    """acre generates its whole set from one seed and the set's size: the test split is always its 1000 rows,
    sliced, so eval_limit 5 is the first 5 of what the train split was kept apart from."""
    assert rg.rows("reasoning_gym:acre", "test", 5) == rg.rows("reasoning_gym:acre", "test", 50)[:5]


def test_the_reward_scores_with_the_task_config_the_rows_were_made_with(tmp_path):
    """decimal_arithmetic's verifier reads its config (the decimal places it compares): a row made with 6 places is
    scored with 6, not the task's default."""
    spec_file = tmp_path / "dec.yaml"
    spec_file.write_text("datasets:\n  - name: decimal_arithmetic\n    config: {min_num_decimal_places: 6, "
                         "max_num_decimal_places: 6}\n")
    ex = load_split(Config(dataset=f"reasoning_gym:{spec_file}", reasoning_gym_size=5), "test", 1)[0]
    gold = ex.answer
    at = gold.index(".") + 3  # off by 0.001: within the default places' tolerance (2), not within 6's
    close = gold[:at] + str((int(gold[at]) + 1) % 10) + gold[at + 1:]
    prompts, comps, columns = reward_inputs([ex], ["p", "p"], [f"#### {gold}", f"#### {close}"], 2)
    assert reasoning_gym_reward(prompts, comps, **columns) == [1.0, 0.0]
    del columns["reasoning_gym_task"]  # rows that name no config: the task's defaults (2 places) take it as right
    assert reasoning_gym_reward(prompts, comps, **columns) == [1.0, 1.0]


@pytest.mark.parametrize("text, expected", [
    ("I think <answer>12</answer> no wait <answer> 13 </answer>", "13"),
    ("2 + 5 = 7\n#### 7", "7"),
    ("#### apple, banana\nthat is all", "apple, banana"),
    ("so \\boxed{x + 1}", "x + 1"),
    ("#### \n", None),
    ("#### Final Answer\nso the total is \\boxed{42}", "42"),  # the answer that comes last, not a heading
    ("##### 42", None),  # a markdown heading, not the answer line
    ("<answer>7</answer> then <answer></answer>", "7"),  # an empty tag is skipped
    ("#### **12**.", "12"),
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


def test_correctness_on_text_answers_is_refused():
    words = load_split(Config(dataset="reasoning_gym:word_sorting", reasoning_gym_size=5), "train")
    with pytest.raises(ConfigError, match=r"correctness compares numbers, .*word_sorting .*\[reasoning_gym\]"):
        rg.check_correctness(words)
    rg.check_correctness(load_split(Config(dataset="reasoning_gym:leg_counting", reasoning_gym_size=5), "train"))


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
