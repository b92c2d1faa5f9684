"""The built-in arith task and the tiny model's tokenizer."""

import pytest

from minigrpo.arith import arith_examples, make_problem
from minigrpo.rewards import extract_gold, is_correct
from minigrpo.tiny import arith_tokenizer


def test_worked_solutions_are_right_and_scored_by_the_gsm8k_extractor():
    for ex in arith_examples("train", 300, steps=3, max_number=20):
        lines = ex.answer.splitlines()
        assert len(lines) == 4 and lines[-1] == f"#### {ex.columns['answer']}"
        for line in lines[:-1]:  # "a + b = c." with the arithmetic right
            a, op, b, _, c = line.rstrip(".").split()
            assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0
        assert extract_gold(ex.answer) == ex.columns["answer"] and is_correct(ex.answer, ex.columns["answer"])


def test_seeded_and_disjoint():
    a, b = arith_examples("test", 200), arith_examples("test", 200)
    assert [e.question for e in a] == [e.question for e in b]
    train = {e.question for e in arith_examples("train", 20000)}
    assert not train & {e.question for e in arith_examples("test", 1000)}
    assert len({e.question for e in a}) == 200


def test_direct_fraction_changes_only_the_solutions():
    worked = arith_examples("train", 1000, steps=2, max_number=10)
    mixed = arith_examples("train", 1000, steps=2, max_number=10, direct_fraction=0.7)
    assert [e.question for e in worked] == [e.question for e in mixed]
    direct = [m for m in mixed if m.answer.startswith("####")]
    assert 0.65 < len(direct) / 1000 < 0.75
    assert all(m.answer == f"#### {m.columns['answer']}" for m in direct)
    assert arith_examples("test", 50, direct_fraction=1.0)[0].answer.count("\n") == 3  # test keeps worked steps


def test_tokenizer_round_trips_every_problem_and_digit_tokens():
    tok = arith_tokenizer()
    for ex in arith_examples("train", 200):
        for text in (ex.question, ex.answer):
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
        arith_examples("dev", 5)
