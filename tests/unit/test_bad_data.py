"""Bad data is refused at load, naming the file and line (the row, or the hub id) and the fix: invalid UTF-8, empty
prompts, gold answers no model answer can match, unknown splits, an unreachable hub; a UTF-8 byte-order mark is
accepted. Data functions only, no model (issue 17, "Nothing lost, nothing silent")."""

import json
import sys
from pathlib import Path

import pytest

from minigrpo.config import Config
from minigrpo.errors import ConfigError, DataError
from minigrpo.tasks.answers import is_correct
from minigrpo.tasks.sources import Example, load_split, require_columns, rows_to_examples

WHY = "the correctness reward compares to it"


def write(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def rows(n: int = 2) -> list[dict[str, str]]:
    return [{"question": f"{i}+1?", "answer": f"#### {i + 1}"} for i in range(n)]


def test_invalid_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(json.dumps(rows(1)[0]).encode() + b'\n{"question": "caf\xe9?", "answer": "1"}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl, line 2: not valid UTF-8 \(byte 0xe9 at character 18\)\. "
                                        r"Save the file as UTF-8"):
        load_split(Config(dataset=str(path)), "train")
    # skip_bad_rows skips it like any other bad line
    assert len(load_split(Config(dataset=str(path), skip_bad_rows=True), "train")) == 1


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows(2)).encode())
    examples = load_split(Config(dataset=str(path)), "train")
    assert [ex.question for ex in examples] == ["0+1?", "1+1?"] and examples[0].columns["answer"] == "1"
    # only at the start of the file: one in the middle is still a bad line
    path.write_bytes(path.read_bytes() + b"\xef\xbb\xbf" + json.dumps(rows(1)[0]).encode() + b"\n")
    with pytest.raises(DataError, match=r"bom\.jsonl, line 3: not valid JSON"):
        load_split(Config(dataset=str(path)), "train")


@pytest.mark.parametrize("row, message", [
    ({"question": " \t", "answer": "1"}, r"'question' is empty; remove the row or fill it in"),
    ({"prompt": "", "answer": "1"}, r"'prompt' is empty"),
    ({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  "}], "answer": "1"},
     r"'prompt' asks nothing: its last user message is empty"),
    ({"prompt": [{"role": "system", "content": ""}], "answer": "1"},
     r"'prompt' asks nothing: its last system message is empty"),
])
def test_empty_prompts_are_refused_with_file_and_line(tmp_path, row, message):
    path = write(tmp_path / "data.jsonl", [*rows(2), row])
    with pytest.raises(DataError, match=r"data\.jsonl, line 3: " + message):
        load_split(Config(dataset=str(path)), "train")


def test_empty_prompt_from_python_names_the_row():
    with pytest.raises(DataError, match=r"train_dataset, row 1: 'question' is empty"):
        rows_to_examples([*rows(1), {"question": "", "answer": "2"}], "train_dataset")


@pytest.mark.parametrize("answer, problem", [
    (None, r"its gold answer 'answer' is null"),
    (True, r"its gold answer 'answer' is a boolean \(true\)"),
    ([1, 2], r"its gold answer 'answer' is a list \(\[1, 2\]\)"),
    ({"value": 3}, r"its gold answer 'answer' is an object \(\{'value': 3\}\)"),
    ("  ", r"its gold answer 'answer' is empty"),
    ("\\text{}", r"its gold answer '\\\\text\{\}' holds no number or math that math-verify reads"),
    ("x" * 1200, r"its gold answer 'answer' has no '#### N' line, number or \\boxed\{\} answer, and its 1200 "
                 r"characters are more than math-verify compares \(1000\)"),
])
def test_gold_answers_that_cannot_be_compared_are_refused_when_needed(tmp_path, answer, problem):
    path = write(tmp_path / "golds.jsonl", [*rows(3), {"question": "q?", "answer": answer}])
    examples = load_split(Config(dataset=str(path)), "train")  # loading alone is fine: answers may not be needed
    require_columns(examples, [], "golds", "")  # ... and are not checked when the run needs none
    with pytest.raises(DataError, match=r"golds\.jsonl, line 4: " + problem + r", so no model answer can match "
                                        r"it; this run needs one \(the correctness reward compares to it\)\. Give a "
                                        r"number, a '#### N' solution or math"):
        require_columns(examples, ["answer"], "golds", WHY)


def test_legitimate_golds_pass_and_compare(tmp_path):
    golds = [72, 2.5, "#### 1,234", "Half is 36.\n#### 72", "\\frac{1}{2}", "5\\sqrt{3}", "\\pi", "(1, 2)",
             "x" * 1200 + " so \\boxed{\\frac{3}{4}}", "-7"]
    path = write(tmp_path / "ok.jsonl", [{"question": f"q{i}", "answer": g} for i, g in enumerate(golds)])
    examples = load_split(Config(dataset=str(path)), "train")
    require_columns(examples, ["answer"], "ok", WHY)  # no error
    answers = [ex.columns["answer"] for ex in examples]
    assert answers[:4] == ["72", "2.5", "1234", "72"] and answers[8] == "\\frac{3}{4}"
    # a completion answering the gold itself is credited; bare LaTeX is read as math, not as its leading number
    assert all(is_correct(f"\\boxed{{{a}}}", a) for a in answers)
    assert is_correct("\\boxed{0.75}", examples[8].columns["answer"])
    assert not is_correct("\\boxed{5}", "5\\sqrt{3}")


def test_gold_problems_in_rows_from_python_name_the_row():
    examples = rows_to_examples([*rows(2), {"question": "q", "answer": False}], "train_dataset")
    with pytest.raises(DataError, match=r"train_dataset, row 2: its gold answer 'answer' is a boolean \(false\)"):
        require_columns(examples, ["answer"], "train_dataset", WHY)
    hand_made = [Example("q", None, {"question": "q", "answer": None})]  # built in Python, not loaded
    with pytest.raises(DataError, match=r"eval data, row 0: its gold answer 'answer' is null"):
        require_columns(hand_made, ["answer"], "eval data", WHY)


def test_unknown_split_of_a_folder_names_the_key_and_the_splits(tmp_path):
    folder = tmp_path / "gsm"
    folder.mkdir()
    write(folder / "train.jsonl", rows(2))
    write(folder / "test.jsonl", rows(2))
    cfg = Config(dataset=str(folder), train_split="trian")
    with pytest.raises(DataError, match=r"train_split: 'trian' is not a split of .*gsm: .*trian\.jsonl does not "
                                        r"exist; the folder holds \['test\.jsonl', 'train\.jsonl'\]; set "
                                        r"train_split to one of 'test', 'train'"):
        load_split(cfg, cfg.train_split)
    cfg = Config(dataset=str(folder), eval_split="validation")
    with pytest.raises(FileNotFoundError, match=r"^eval_split: 'validation' is not a split"):
        load_split(cfg, cfg.eval_split)


@pytest.mark.parametrize("dataset, name", [("arith", "the arith task"), ("gsm8k", "openai/gsm8k")])
def test_unknown_split_of_a_built_in_dataset(dataset, name):
    cfg = Config(dataset=dataset, train_split="trian", eval_split="dev")
    with pytest.raises(ConfigError, match=rf"^train_split: 'trian' is not a split of {name}; its splits are "
                                          r"'train', 'test'$"):
        load_split(cfg, cfg.train_split)
    with pytest.raises(ConfigError, match=rf"^eval_split: 'dev' is not a split of {name}"):
        load_split(cfg, cfg.eval_split, 5)


def test_a_hub_dataset_offline_names_the_id_and_the_way_out(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without the network: fails at once
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    if "datasets" in sys.modules:  # imported earlier in this process: it read the environment then
        monkeypatch.setattr(sys.modules["datasets"].config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as err:
        load_split(Config(dataset="nobody-xyz/no-such-dataset"), "train")
    message = str(err.value)
    assert message.startswith("the dataset 'nobody-xyz/no-such-dataset' could not be loaded: the Hugging Face hub "
                              "could not be reached and it is not in the local cache"), message
    assert "give a local .jsonl file or a folder of {split}.jsonl files" in message
    assert "set HF_DATASETS_OFFLINE=1" in message
