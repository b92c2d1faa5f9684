"""`eval` / `sample` reopen a run's config only for a run's policy folder, tolerate keys this version does not
know, and evaluate prompts of any length (max_prompt_length is a training limit)."""

import json

import yaml

from minigrpo.cli import main


def test_eval_ignores_a_config_yaml_that_is_not_a_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an accelerate / hydra config.yaml in the working folder
    (tmp_path / "config.yaml").write_text("mixed_precision: fp16\nmax_prompt_length: 8\n")
    assert main(["eval", "--model", "tiny-arith", "--data", "arith", "--limit", "4", "--out", "e.json"]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["n"] == 4


def test_eval_of_a_runs_model_reads_its_config_leniently(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["sft", "--max_steps=1", "--eval_limit=0", "--per_device_train_batch_size=4",
                 "--arith_train_size=20", f"--output_dir={run}"]) == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump(cfg | {"a_key_from_a_later_version": 1,
                                                           "max_prompt_length": 8}))
    assert main(["eval", "--model", str(run / "model"), "--limit", "4", "--out", str(tmp_path / "e.json")]) == 0
    assert "ignoring key 'a_key_from_a_later_version'" in capsys.readouterr().err
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["n"] == 4 and report["settings"]["data"] == "arith"  # the run's dataset
