"""One extractor: the gold `answer` column a reward receives is `extract_gold` of the data's answer field, for
every source (JSONL, a folder, the arith task), and the SFT target ends in the same normalised number."""

import json

import pytest

from minigrpo.config import Config
from minigrpo.tasks.answers import extract_gold, gold_answer
from minigrpo.tasks.rewards import score
from minigrpo.tasks.sources import Example, load_examples, load_split, sft_target

# Raw answer fields, as data has them, that the old data-side extractor disagreed on with the reward's.
RAW = ["#### 1,234.50", "#### **18**", "Half is 36.\n#### 72", "#### $5", "#### 18.", "72", "1,000", "#### -3",
       "Step.\n#### 4\nthen #### 5"]


def test_the_gold_column_is_extract_gold_of_the_raw_answer(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": raw}) + "\n" for i, raw in enumerate(RAW)))
    seen = {}

    def spy(prompts, completions, answer, **kwargs):  # a custom reward: what it is given as `answer`
        seen.update(zip(kwargs["question"], answer))
        return [0.0] * len(completions)

    examples = load_examples(str(path), "train")
    score([("spy", spy, 1.0)], [ex.question for ex in examples], ["x"] * len(examples),
          {k: [ex.columns[k] for ex in examples] for k in examples[0].columns})
    assert [seen[f"q{i}"] for i in range(len(RAW))] == [extract_gold(raw) for raw in RAW]
    assert [seen[f"q{i}"] for i in range(len(RAW))] == ["1234.5", "18", "72", "5", "18", "72", "1000", "-3", "5"]
    assert [ex.columns["solution"] for ex in examples] == RAW  # the answer as written stays in `solution`


def test_a_non_numeric_gold_is_kept_as_written():
    assert extract_gold("\\frac{1}{2}") is None and gold_answer("  \\frac{1}{2} ") == "\\frac{1}{2}"
    assert gold_answer(72) == "72"  # a JSON number


@pytest.mark.parametrize("raw", RAW)
def test_the_sft_target_ends_in_the_gold_number(raw):
    target = sft_target(Example(question="q", answer=raw, columns={}))
    assert target.rstrip().splitlines()[-1] == f"#### {extract_gold(raw)}"


def test_arith_rows_get_the_same_columns():
    examples = load_split(Config(), "test", limit=20)
    assert all(ex.columns["answer"] == extract_gold(ex.answer) == ex.answer.rsplit("#### ", 1)[1]
               and ex.columns["solution"] == ex.answer for ex in examples)
