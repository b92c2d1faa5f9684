"""Bad input stops before any training with exit code 2 and a message naming the file and line, or the
key, and the fix; `skip_bad_rows` skips and counts bad rows instead."""

import json

import huggingface_hub.constants
import pytest

from minigrpo.cli import main


def _data(tmp_path, train_lines):
    d = tmp_path / "data"
    d.mkdir()
    (d / "train.jsonl").write_text("".join(line + "\n" for line in train_lines))
    (d / "test.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    return d


GOOD = [json.dumps({"question": f"{a}+1?", "answer": f"#### {a + 1}"}) for a in range(8)]
BASE = ["--max_steps=1", "--eval_limit=0", "--num_generations=2", "--per_device_train_batch_size=4",
        "--max_completion_length=4"]


@pytest.mark.parametrize("lines, message", [
    (GOOD[:2] + ['{"question": "3+1?", "answer": '] + GOOD[2:], r"train\.jsonl, line 3: not valid JSON"),
    (GOOD[:1] + [json.dumps({"question": "2+2?"})] + GOOD[1:],
     r"train\.jsonl, line 2: no 'answer' column \(the correctness reward compares to it\)"),
    (GOOD[:3] + ["[1, 2]"], r"train\.jsonl, line 4: expected a JSON object"),
    ([], r"train\.jsonl: the dataset is empty"),
])
def test_bad_rows_stop_the_run_naming_file_and_line(tmp_path, capsys, lines, message):
    data = _data(tmp_path, lines)
    out = tmp_path / "run"
    assert main(["train", *BASE, f"--dataset={data}", f"--output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "data error" in err
    assert __import__("re").search(message, err), err
    assert not (out / "metrics.jsonl").exists()  # nothing trained


def test_skip_bad_rows_counts_them_and_trains(tmp_path, capsys):
    data = _data(tmp_path, GOOD[:2] + ["{oops", json.dumps({"q": 1})] + GOOD[2:])
    assert main(["train", *BASE, "--skip_bad_rows=true", f"--dataset={data}", f"--output_dir={tmp_path / 'r'}"]) == 0
    assert "skipped 2 bad row(s)" in capsys.readouterr().out


def test_missing_dataset_file(tmp_path, capsys):
    assert main(["train", *BASE, f"--dataset={tmp_path / 'nope.jsonl'}", f"--output_dir={tmp_path / 'r'}"]) == 2
    assert "nope.jsonl: no such .jsonl file" in capsys.readouterr().err


def test_prompt_over_the_limit(tmp_path, capsys):
    data = _data(tmp_path, GOOD)
    assert main(["train", *BASE, "--max_prompt_length=5", f"--dataset={data}", f"--output_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err
    assert "row 1: the prompt has" in err and "max_prompt_length=5" in err and "raise max_prompt_length" in err


@pytest.mark.parametrize("flags, message", [
    (["--reward_funcs=corectness"], "unknown reward 'corectness'"),
    (["--reward_funcs=no_such_module_xyz:f"], "cannot import module 'no_such_module_xyz'"),
    (["--num_generations=1"], "num_generations: must be >= 2"),
    (["--per_device_train_batch_size=6", "--num_generations=4"], "per_device_train_batch_size"),
    (["--learning_rate=fast"], "learning_rate"),
])
def test_bad_keys_stop_before_anything_runs(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert main(["train", "--max_steps=1", "--eval_limit=0", *flags, f"--output_dir={out}"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # checked before the run folder is made


@pytest.mark.parametrize("command", [["plan"], ["eval", "--limit=1"], ["train", *BASE, "--output_dir=OUT"]])
def test_a_model_that_cannot_be_found_names_the_key(tmp_path, capsys, monkeypatch, command):
    # as on a machine without the network: fails at once (the variable for child processes; the hub library read
    # it when first imported, so this process is told through its constant: the variable alone left it trying the
    # network until its timeouts, ~40 s a case)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    args = [a.replace("OUT", str(tmp_path)) for a in command[1:]]
    assert main([command[0], "--model=nobody-xyz/no-such-model", *args]) == 2
    err = capsys.readouterr().err
    assert "model: 'nobody-xyz/no-such-model' could not be loaded" in err and "a hub id with the network" in err
