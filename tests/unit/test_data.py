"""Tests for minigrpo.tasks.sources and minigrpo.tasks.prompts: loading (local GSM8K, JSONL, hub wiring) and
prompt templates. Offline, CPU."""

import json
from pathlib import Path

import datasets
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from minigrpo.tasks.answers import gold_answer
from minigrpo.tasks.prompts import R1_SYSTEM_PROMPT, SYSTEM_PROMPT, TEMPLATES, build_prompt
from minigrpo.tasks.sources import Example, load_examples, require_columns, sft_target, strip_calculator

GSM8K_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gsm8k"
needs_gsm8k = pytest.mark.skipif(not GSM8K_DIR.is_dir(), reason=f"no local GSM8K copy at {GSM8K_DIR}")

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NATALIA_Q = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)
NATALIA_A = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)
NATALIA_SFT = (
    "Natalia sold 48/2 = 24 clips in May.\n"
    "Natalia sold 48+24 = 72 clips altogether in April and May.\n#### 72"
)


def make_tokenizer(chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """A tiny word-level tokenizer built in memory, so no test touches the hub."""
    vocab = {"[UNK]": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tokenizer.chat_template = chat_template
    return tokenizer


def natalia() -> Example:
    """The first GSM8K train row, written out so template tests do not need the data."""
    return Example(NATALIA_Q, NATALIA_A, {"question": NATALIA_Q, "answer": "72", "solution": NATALIA_A})


def write_lines(path: Path, lines: list[str]) -> Path:
    """Write `lines` as a file, one per line."""
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---- loading ----------------------------------------------------------------------------------


@needs_gsm8k
def test_local_gsm8k_sizes_and_first_row() -> None:
    train = load_examples(str(GSM8K_DIR), "train")
    test = load_examples(str(GSM8K_DIR), "test")
    assert (len(train), len(test)) == (7473, 1319)
    first = train[0]
    assert first.question.startswith("Natalia sold clips")
    assert first.answer == NATALIA_A
    assert first.columns["answer"] == "72"
    assert first.columns["solution"] == NATALIA_A
    assert first.columns["question"] == first.question
    assert sft_target(first) == NATALIA_SFT


@needs_gsm8k
def test_local_gsm8k_limit() -> None:
    examples = load_examples(str(GSM8K_DIR), "train", limit=5)
    assert len(examples) == 5
    assert examples[1].columns["answer"] == "10"  # Weng: "#### 10"


@needs_gsm8k
def test_missing_split_names_the_files_present() -> None:
    with pytest.raises(FileNotFoundError, match=r"validation\.jsonl.*test\.jsonl.*train\.jsonl"):
        load_examples(str(GSM8K_DIR), "validation")


def test_jsonl_custom_fields_and_blank_lines(tmp_path: Path) -> None:
    rows = [
        {"problem": "1+1?", "solution_text": "1+1 = <<1+1=2>>2\n#### 2", "level": 1},
        {"problem": "Pay?", "solution_text": "#### $1,250.5"},
        {"problem": "Bare?", "solution_text": " 7 "},
    ]
    lines = [json.dumps(rows[0]), "", "   ", json.dumps(rows[1]), json.dumps(rows[2]), ""]
    path = write_lines(tmp_path / "custom.jsonl", lines)
    examples = load_examples(str(path), "ignored", prompt_field="problem", answer_field="solution_text")
    assert [ex.question for ex in examples] == ["1+1?", "Pay?", "Bare?"]
    assert [ex.columns["answer"] for ex in examples] == ["2", "1250.5", "7"]
    assert examples[0].answer == "1+1 = <<1+1=2>>2\n#### 2"
    assert examples[0].columns == {
        "problem": "1+1?",
        "solution_text": "1+1 = <<1+1=2>>2\n#### 2",
        "level": 1,
        "question": "1+1?",
        "solution": "1+1 = <<1+1=2>>2\n#### 2",
        "answer": "2",
    }
    assert len(load_examples(str(path), "x", "problem", "solution_text", limit=2)) == 2


def test_jsonl_last_hash_answer_wins(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"question": "q", "answer": "#### 3\nno\n#### -4"})])
    assert load_examples(str(path), "train")[0].columns["answer"] == "-4"


def test_jsonl_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    good = json.dumps({"question": "q", "answer": "#### 1"})
    path = write_lines(tmp_path / "bad.jsonl", [good, good, '{"question": "q", "answer": '])
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 3: not valid JSON"):
        load_examples(str(path), "train")


def test_jsonl_non_object_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "list.jsonl", ['["q", "a"]'])
    with pytest.raises(ValueError, match=r"list\.jsonl, line 1: expected a JSON object, got list"):
        load_examples(str(path), "train")


def test_jsonl_missing_key_names_key_line_and_fix(tmp_path: Path) -> None:
    # The answer column is optional when read (a task may need none); a run whose rewards need it checks every row.
    rows = [{"question": "q", "answer": "#### 1"}, {"question": "q", "solution": "#### 2"}]
    path = write_lines(tmp_path / "miss.jsonl", [json.dumps(r) for r in rows])
    examples = load_examples(str(path), "train")
    assert [ex.answer for ex in examples] == ["#### 1", None] and "answer" not in examples[1].columns
    with pytest.raises(ValueError, match=r"miss\.jsonl, line 2: no 'answer' column \(the reward needs it\)") as err:
        require_columns(examples, ["answer"], "miss.jsonl", "the reward needs it")
    assert "['solution']" in str(err.value)
    assert "answer_field=" in str(err.value)
    with pytest.raises(ValueError, match=r"noq\.jsonl, line 1: missing key 'prompt' or 'question'"):
        load_examples(str(write_lines(tmp_path / "noq.jsonl", [json.dumps({"problem": "q"})])), "train")


def test_jsonl_empty_file(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ValueError, match=r"empty\.jsonl: the dataset is empty"):
        load_examples(str(path), "train")


def test_missing_local_path_does_not_go_to_the_hub(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_examples(str(tmp_path / "nope.jsonl"), "train")


def test_bad_limit() -> None:
    with pytest.raises(ValueError, match="limit must be a positive"):
        load_examples("gsm8k", "train", limit=0)


def test_hub_path_uses_gsm8k_alias_and_main_config(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    rows = [{"question": f"q{i}", "answer": f"step\n#### {i + 1},000"} for i in range(3)]

    def fake_load_dataset(*args: object, **kwargs: object) -> list[dict[str, str]]:
        calls.append((args, kwargs))
        return rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    examples = load_examples("gsm8k", "test", limit=2)
    assert calls == [(("openai/gsm8k", "main"), {"split": "test"})]
    assert [ex.columns["answer"] for ex in examples] == ["1000", "2000"]

    load_examples("someone/other", "train")
    assert calls[-1] == (("someone/other", None), {"split": "train"})


# ---- prompts ----------------------------------------------------------------------------------


def test_templates_constant() -> None:
    assert tuple(TEMPLATES) == ("auto", "chat", "r1", "fewshot", "raw")  # a dict: name -> description
    assert "#### <number>" in SYSTEM_PROMPT and "<think>" not in SYSTEM_PROMPT
    assert "<think>" in R1_SYSTEM_PROMPT and "#### <number>" in R1_SYSTEM_PROMPT


def test_chat_prompt_exact() -> None:
    prompt = build_prompt(make_tokenizer(), "What is 2+2?")
    assert prompt == (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_prompt_custom_system() -> None:
    prompt = build_prompt(make_tokenizer(), "Q?", system_prompt="Be brief.")
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert SYSTEM_PROMPT not in prompt


def test_r1_prompt() -> None:
    prompt = build_prompt(make_tokenizer(), "What is 2+2?", template="r1")
    assert "<think>" in prompt and R1_SYSTEM_PROMPT in prompt
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>\n" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_chat_template_without_system_role_gets_system_text_in_user_turn() -> None:
    no_system = (
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "[{{ m['role'] }}]{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    prompt = build_prompt(make_tokenizer(no_system), "Q?", system_prompt="Be brief.")
    assert prompt == "[user]Be brief.\n\nQ?[assistant]"


def test_no_chat_template_points_to_fewshot() -> None:
    with pytest.raises(ValueError, match="no chat template.*template: fewshot"):
        build_prompt(make_tokenizer(chat_template=None), "Q?")


def test_fewshot_prompt_exact() -> None:
    prompt = build_prompt(None, "What is 2+2?", template="fewshot", fewshot=[natalia()])
    assert prompt == f"Question: {NATALIA_Q}\nAnswer: {NATALIA_SFT}\n\nQuestion: What is 2+2?\nAnswer:"
    assert build_prompt(None, "Q?", template="fewshot") == "Question: Q?\nAnswer:"


def test_unknown_template_lists_the_allowed_names() -> None:
    with pytest.raises(ValueError, match="'chatml'.*chat, r1, fewshot"):
        build_prompt(make_tokenizer(), "Q?", template="chatml")


# ---- text helpers -----------------------------------------------------------------------------


def test_strip_calculator_exact() -> None:
    assert strip_calculator("48/2 = <<48/2=24>>24 and $<<0.2*50=10>>10.") == "48/2 = 24 and $10."
    assert strip_calculator("no annotations") == "no annotations"


def test_sft_target_exact() -> None:
    assert sft_target(natalia()) == NATALIA_SFT
    assert sft_target(Example("q", "It costs $<<2*5=10>>10.\n#### $1,000", {})) == "It costs $10.\n#### 1000"
    assert sft_target(Example("q", " 7 ", {})) == "#### 7"


def test_gold_final() -> None:
    assert gold_answer("a\n#### 1,234") == "1234"
    assert gold_answer("#### $ -3.5") == "-3.5"
    assert gold_answer("  forty two ") == "forty two"
