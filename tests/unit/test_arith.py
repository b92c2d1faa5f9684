"""The built-in arith task and the tiny model's tokenizer."""

import pytest

from minigrpo.tasks.answers import extract_gold, gold_answer, is_correct
from minigrpo.tasks.arith import arith_rows, make_problem
from minigrpo.tiny import arith_tokenizer


def test_worked_solutions_are_right_and_scored_by_the_gsm8k_extractor():
    for row in arith_rows("train", 300, steps=3, max_number=20):
        gold = gold_answer(row["answer"])
        lines = row["answer"].splitlines()
        assert len(lines) == 4 and lines[-1] == f"#### {gold}"
        for line in lines[:-1]:  # "a + b = c." with the arithmetic right
            a, op, b, _, c = line.rstrip(".").split()
            assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0
        assert extract_gold(row["answer"]) == gold and is_correct(row["answer"], gold)


def test_seeded_and_disjoint():
    a, b = arith_rows("test", 200), arith_rows("test", 200)
    assert [r["question"] for r in a] == [r["question"] for r in b]
    train = {r["question"] for r in arith_rows("train", 20000)}
    assert not train & {r["question"] for r in arith_rows("test", 1000)}
    assert len({r["question"] for r in a}) == 200


def test_direct_fraction_changes_only_the_solutions():
    worked = arith_rows("train", 1000, steps=2, max_number=10)
    mixed = arith_rows("train", 1000, steps=2, max_number=10, direct_fraction=0.7)
    assert [r["question"] for r in worked] == [r["question"] for r in mixed]
    direct = [m for m in mixed if m["answer"].startswith("####")]
    assert 0.65 < len(direct) / 1000 < 0.75
    assert all(m["answer"] == f"#### {gold_answer(m['answer'])}" for m in direct)
    assert arith_rows("test", 50, direct_fraction=1.0)[0]["answer"].count("\n") == 3  # test keeps worked steps


def test_tokenizer_round_trips_every_problem_and_digit_tokens():
    tok = arith_tokenizer()
    for row in arith_rows("train", 200):
        for text in (row["question"], row["answer"]):
            ids = tok(text, add_special_tokens=False).input_ids
            assert tok.decode(ids) == text and tok.unk_token_id not in ids[:0]
    assert tok.convert_ids_to_tokens(tok("12", add_special_tokens=False).input_ids) == ["1", "2"]
    prompt = tok.apply_chat_template([{"role": "system", "content": "ignored"}, {"role": "user", "content": "Hi"}],
                                     tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>Hi<|assistant|>"


def test_make_problem_never_goes_negative():
    import random

    rng = random.Random(0)
    for _ in range(2000):
        _, solution, answer = make_problem(rng, 4, 5)
        assert answer >= 0 and "-" not in solution.split("####")[1]


def test_bad_arguments():
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        arith_rows("dev", 5)
