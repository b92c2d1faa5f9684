"""Tests for answer extraction, reward functions, reward loading and scoring."""

import doctest
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minigrpo.tasks import answers, rewards
from minigrpo.tasks.answers import extract_answer, extract_gold, extract_hash_answer, is_correct, normalize_number
from minigrpo.tasks.rewards import (
    REWARD_FUNCS,
    RewardGuard,
    correctness_reward,
    format_reward_soft,
    format_reward_strict,
    load_reward,
    score,
    think_format_reward,
)

GSM8K_TEST = Path(__file__).resolve().parents[2].parent / "shared/data/gsm8k/test.jsonl"

# A GSM8K-style answer field, calculator annotations included.
GSM8K_ANSWER = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
    "#### 72"
)


# --- extraction ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,234", "1234"),
        ("$5", "5"),
        ("-3", "-3"),
        ("2.50", "2.5"),
        ("7.0", "7"),
        ("0.5", "0.5"),
        (".5", "0.5"),
        ("100", "100"),  # no exponent notation ("1E+2")
        (" 18. ", "18"),
        ("**42**", "42"),
        ("-0.0", "0"),
        ("1{,}234", "1234"),
        ("123456789012345678901234567890.5", "123456789012345678901234567890.5"),  # no float rounding
        ("abc", None),
        ("", None),
        ("1e5", None),
        ("NaN", None),
        ("1_000", None),
        ("1.2.3", None),
    ],
)
def test_normalize_number(text: str, expected: str | None) -> None:
    assert normalize_number(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so the total is\n#### 1,234", "1234"),
        ("#### $5", "5"),
        ("#### -7", "-7"),
        ("#### 3.50", "3.5"),
        ("#### $1,234.00", "1234"),
        ("#### 18.", "18"),
        ("#### **42**", "42"),
        ("first #### 3 then\n#### 4", "4"),
        ("no answer here", None),
        ("#### nothing", None),
    ],
)
def test_extract_hash_answer(text: str, expected: str | None) -> None:
    assert extract_hash_answer(text) == expected


def test_extract_gold_from_gsm8k_answer_and_bare_number() -> None:
    assert extract_gold(GSM8K_ANSWER) == "72"
    assert extract_gold("72") == "72"
    assert extract_gold("1,234") == "1234"
    assert extract_gold("no number") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("the answer is \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{1} and finally \\boxed{ 2 }", "2"),
        ("\\boxed{7} \n#### 8", "8"),  # `####` wins over a box
        ("\\boxed{5} then a truncated \\boxed{6", "5"),  # an unclosed last box falls back
        ("\\boxed{$1,000$}", "1000"),
        ("\\boxed{}", None),
        ("nothing to see", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [
        ("#### 72", "72", True),
        ("#### 72.0", "72", True),
        ("#### 71", "72", False),
        ("#### 1,234", "1234", True),
        ("\\boxed{\\frac{1}{2}}", "0.5", True),  # math-verify fallback
        ("\\boxed{\\frac{1}{3}}", "0.5", False),
        ("I think it is 72", "72", False),  # no `####`, no box: nothing extracted
        ("#### 72", GSM8K_ANSWER, True),  # a raw GSM8K answer field as gold
        ("#### 72", 72, True),  # a JSON number as gold
        ("\\boxed{\\sqrt{\\frac{}{", "72", False),
    ],
)
def test_is_correct(completion: str, gold: str, expected: bool) -> None:
    assert is_correct(completion, gold) is expected


# --- reward functions ---------------------------------------------------------------------------------


def test_correctness_reward() -> None:
    completions = ["#### 72", "#### 71", "\\boxed{72}", "no answer"]
    values = correctness_reward(["q"] * 4, completions, answer=["72"] * 4, extra=[0] * 4)  # extra: ignored
    assert values == [1.0, 0.0, 1.0, 0.0]


def test_module_doctests() -> None:
    results = [doctest.testmod(module) for module in (rewards, answers)]  # the old rewards module, now two
    assert sum(r.attempted for r in results) >= 1
    assert sum(r.failed for r in results) == 0


STRICT_CASES = [
    ("Half of 48 is 24.\n48 + 24 = 72\n#### 72", 1.0),
    ("<think>48/2 = 24</think>\n#### 72", 1.0),
    ("reasoning\n#### $1,234.00  \n\n", 1.0),
    ("#### 72", 0.0),  # no reasoning before
    ("reasoning #### 72", 0.0),  # not on its own line
    ("reasoning\n#### 72\nthat's it", 0.0),  # text after the answer
    ("reasoning\n#### seventy-two", 0.0),
    ("<think>unclosed\n#### 72", 0.0),
    ("<think>a</think><think>b</think>\n#### 72", 0.0),
]


def test_format_reward_strict() -> None:
    completions = [c for c, _ in STRICT_CASES]
    prompts = [""] * len(completions)
    assert format_reward_strict(prompts, completions) == [r for _, r in STRICT_CASES]


def test_format_reward_soft() -> None:
    completions = ["#### 72 and more text", "x #### -3.5", "#### abc", "72", ""]
    assert format_reward_soft([""] * 5, completions) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_think_format_reward() -> None:
    cases = [
        ("Q", "<think>48/2 = 24, 48 + 24 = 72</think>\nThe answer is 72.\n#### 72", 1.0),
        ("Q", "<think>reasoning</think> #### 72  ", 1.0),
        ("Q", "<think>reasoning</think>\n#### 72\nbye", 0.0),  # the answer must end the text
        ("Q", "<think></think>\n#### 72", 0.0),  # empty reasoning
        ("Q", "<think>a</think><think>b</think>\n#### 72", 0.0),  # two think blocks
        ("Q", "reasoning</think>\n#### 72", 0.0),  # no opening tag and none in the prompt
        ("Q", "<think>reasoning\n#### 72", 0.0),  # unclosed
        ("Q", "<think>reasoning</think>\nThe answer is 72", 0.0),  # no `#### N`
        ("...assistant\n<think>\n", "reasoning</think>\n#### 72", 1.0),  # template prefilled <think>
        ("...assistant\n<think>", "<think>again</think>\n#### 72", 1.0),  # model repeats the tag: one block
        ("...assistant\n<think>", "reasoning\n#### 72", 0.0),  # prefilled, but never closed
        ("...assistant\n<think>", "a<think>b</think>\n#### 72", 0.0),  # a second block opened mid-text
    ]
    prompts = [p for p, _, _ in cases]
    completions = [c for _, c, _ in cases]
    assert think_format_reward(prompts, completions) == [r for _, _, r in cases]


def test_format_reward_strict_accepts_prefilled_think() -> None:
    prompts = ["<|im_start|>assistant\n<think>\n", "Q"]
    completions = ["reasoning</think>\n#### 5", "reasoning</think>\n#### 5"]
    assert format_reward_strict(prompts, completions) == [1.0, 0.0]


# --- loading ------------------------------------------------------------------------------------------


def test_load_reward_builtin_and_dotted_path() -> None:
    assert set(REWARD_FUNCS) == {"correctness", "environment", "format_strict", "format_soft", "think_format",
                                 "reasoning_gym"}
    assert load_reward("correctness") is correctness_reward
    assert load_reward("minigrpo.tasks.rewards:format_reward_soft") is format_reward_soft


def test_load_reward_from_user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_rewards.py").write_text(
        "def length_reward(prompts, completions, **kwargs):\n"
        "    return [float(len(c)) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_reward("my_rewards:length_reward")
    assert fn(["p", "p"], ["ab", "abcd"]) == [2.0, 4.0]


def test_load_reward_unknown_name_message() -> None:
    with pytest.raises(ValueError, match="unknown reward 'corectness'") as info:
        load_reward("corectness")
    message = str(info.value)
    assert all(name in message for name in REWARD_FUNCS)
    assert "package.module:function" in message


def test_load_reward_import_errors() -> None:
    with pytest.raises(ValueError, match="no_such_module_xyz") as info:
        load_reward("no_such_module_xyz:fn")
    assert "No module named" in str(info.value)
    with pytest.raises(ValueError, match="has no function 'missing_fn'"):
        load_reward("minigrpo.tasks.rewards:missing_fn")


# --- score --------------------------------------------------------------------------------------------


def _constant(values: list) -> Callable:
    """A reward function returning fixed values, ignoring its inputs."""
    return lambda prompts, completions, **kwargs: list(values)


def test_score_weights_and_none() -> None:
    funcs = [
        ("correctness", correctness_reward, 2.0),
        ("format_soft", format_reward_soft, 0.5),
        ("custom", _constant([None, 1.0, None]), 1.0),
    ]
    completions = ["#### 72", "#### 71", "nothing"]
    totals, per_func = score(funcs, ["q"] * 3, completions, {"answer": ["72"] * 3})
    assert totals == [2.5, 1.5, 0.0]
    assert per_func == {
        "correctness": [1.0, 0.0, 0.0],
        "format_soft": [1.0, 1.0, 0.0],
        "custom": [None, 1.0, None],
    }


def test_score_all_none_and_non_numeric() -> None:
    funcs = [("a", _constant([None, math.nan, 1]), 1.0), ("b", _constant([None, "high", None]), 3.0)]
    totals, per_func = score(funcs, ["q"] * 3, ["x", "y", "z"], {})
    assert totals == [None, None, 1.0]
    assert per_func == {"a": [None, None, 1.0], "b": [None, None, None]}


def test_score_wrong_length_names_the_function() -> None:
    funcs = [("ok", _constant([1.0, 1.0]), 1.0), ("too_short", _constant([1.0]), 1.0)]
    with pytest.raises(ValueError, match="too_short"):
        score(funcs, ["q", "q"], ["x", "y"], {})


# --- robustness ---------------------------------------------------------------------------------------

# Fragments that reach the interesting branches far more often than uniform random text.
_FRAGMENTS = ["####", " ", "\n", "\\boxed{", "{", "}", "<think>", "</think>", "-", ".", ",", "$", "**", "7"]
_texts = st.one_of(st.text(), st.lists(st.sampled_from(_FRAGMENTS + ["\\frac{1}{2}", "x"])).map("".join))


@settings(max_examples=300, deadline=None)
@given(prompt=_texts, completion=_texts)
def test_never_raises(prompt: str, completion: str) -> None:
    extract_answer(completion)
    assert isinstance(is_correct(completion, "72"), bool)
    for name, fn in REWARD_FUNCS.items():
        values = fn([prompt], [completion], answer=["72"])
        assert len(values) == 1
        # no environment, no reasoning-gym task in the row: no opinion
        assert values[0] in ((None,) if name in ("environment", "reasoning_gym") else (0.0, 1.0))
    task = {"question": ["Calculate 8 * 9."], "solution": ["72"], "metadata": [{"source_dataset": "basic_arithmetic"}]}
    assert 0.0 <= REWARD_FUNCS["reasoning_gym"]([prompt], [completion], **task)[0] <= 1.0  # its verifier, any text


@pytest.mark.parametrize(
    "text",
    [
        "1" * 1_000_000,
        "\\boxed{" * 10_000,
        "\\boxed{" * 10_000 + "7" + "}" * 10_000,
        "####" + " " * 1_000_000 + "x",
        "reasoning\n####" + "1" * 1_000_000 + "x",
        "reasoning\n#### **$" + " " * 1_000_000 + "x",
        "#### " + "\u0663" * 1_000_000,  # Arabic-Indic digits: not ASCII digits, never an answer
        "\U0001F642 7 " * 200_000 + "\\boxed{\u00e9",
    ],
    ids=["digits", "open-boxes", "closed-boxes", "hash-spaces", "hash-digits", "hash-dollar-spaces", "unicode-digits",
         "emoji-and-open-box"],
)
def test_bounded_time_on_large_inputs(text: str) -> None:
    start = time.perf_counter()
    extract_answer(text)
    for fn in REWARD_FUNCS.values():
        fn(["<think>"], [text], answer=["72"])
    assert time.perf_counter() - start < 3.0


# --- real data ----------------------------------------------------------------------------------------


@pytest.mark.skipif(not GSM8K_TEST.exists(), reason=f"needs {GSM8K_TEST}")
def test_gsm8k_test_split_gold_is_self_consistent() -> None:
    rows = [json.loads(line) for line in GSM8K_TEST.read_text().splitlines() if line.strip()]
    assert len(rows) == 1319
    golds = [extract_gold(row["answer"]) for row in rows]
    assert all(gold is not None and normalize_number(gold) == gold for gold in golds)
    completions = [row["answer"] for row in rows]
    prompts = [row["question"] for row in rows]
    assert correctness_reward(prompts, completions, answer=golds) == [1.0] * len(rows)
    assert correctness_reward(prompts, completions, answer=completions) == [1.0] * len(rows)


def test_async_rewards_run_together_on_one_loop_kept_between_batches() -> None:
    import asyncio

    import numpy as np
    import torch

    from minigrpo.tasks.rewards import score

    loops: list = []
    events: dict = {}

    async def first(prompts, completions, **kwargs):  # waits for `second`: only concurrent calls finish
        loops.append(asyncio.get_running_loop())
        events["first"].set()
        await asyncio.wait_for(events["second"].wait(), 5)
        return [1.0] * len(completions)

    async def second(prompts, completions, **kwargs):
        loops.append(asyncio.get_running_loop())
        events["second"].set()
        await asyncio.wait_for(events["first"].wait(), 5)
        return np.array([2.0] * len(completions))  # an array of values, as numpy code returns them

    def scalars(completions, **kwargs):  # numpy and torch scalars count as their numbers
        return [torch.tensor(0.5), np.float32(0.25)]

    for _ in range(2):  # two batches: an object bound to the loop in the first (an HTTP session) works in the second
        events.update(first=asyncio.Event(), second=asyncio.Event())
        totals, per = score([("first", first, 1.0), ("second", second, 1.0), ("scalars", scalars, 1.0)],
                            ["p"] * 2, ["a", "b"], {})
        assert totals == [3.5, 3.25] and per["second"] == [2.0, 2.0] and per["scalars"] == [0.5, 0.25]
    assert len(loops) == 4 and len(set(map(id, loops))) == 1  # one loop for every call


def test_slow_and_async_rewards_run_together_and_each_is_timed() -> None:
    """Two sync rewards marked slow and an async one, 0.4 s each, overlap (~0.4 s, not 1.2); a plain one runs after
    them; every function's seconds add up in the guard."""
    import asyncio
    import time

    def sleepy(prompts, completions, **kwargs):
        time.sleep(0.4)
        return [1.0] * len(completions)

    async def waits(prompts, completions, **kwargs):
        await asyncio.sleep(0.4)
        return [2.0] * len(completions)

    def quick(prompts, completions, **kwargs):
        return [0.5] * len(completions)

    slow_a, slow_b = (lambda **kw: sleepy(**kw)), (lambda **kw: sleepy(**kw))
    slow_a.slow = slow_b.slow = True
    guard = RewardGuard()
    funcs = [("a", slow_a, 1.0), ("b", slow_b, 1.0), ("c", waits, 1.0), ("d", quick, 1.0)]
    t0 = time.perf_counter()
    totals, by_name = score(funcs, ["p", "p"], ["x", "y"], {}, guard=guard)
    assert time.perf_counter() - t0 < 0.9
    assert totals == [4.5, 4.5] and by_name["c"] == [2.0, 2.0]
    assert all(0.35 < guard.seconds[k] < 0.9 for k in "abc") and guard.seconds["d"] < 0.1
    score(funcs, ["p"], ["x"], {}, guard=guard)  # they add up over calls
    assert 0.7 < guard.seconds["a"] < 1.8
    slow_a.slow = False  # the same function unmarked runs alone first: now ~0.8 s
    t0 = time.perf_counter()
    score(funcs, ["p"], ["x"], {}, guard=RewardGuard(timeout=5))
    assert time.perf_counter() - t0 > 0.75
