"""Evaluation: the report's figures, maj@k voting, and the `minigrpo eval` command end to end."""

import json

import pytest

from minigrpo.cli import main
from minigrpo.evaluate import evaluate, majority_correct


def test_majority_vote():
    assert majority_correct(["#### 3", "#### 4", "x\n#### 4"], "4")
    assert not majority_correct(["#### 3", "#### 3", "#### 4"], "4")
    assert not majority_correct(["no answer", "none"], "4")  # no answer never wins
    assert majority_correct(["none", "none", "#### 4"], "4")


def test_evaluate_scores_with_the_reward_extractor(monkeypatch):
    """With generation stubbed, the report's numbers follow from the texts alone."""
    import torch

    from minigrpo import evaluate as ev
    from minigrpo.rollout.types import Rollout

    texts = iter([["#### 4", "#### 5", "nothing"]])

    def fake_generate(backend, model, tok, prompts, params):
        out = next(texts)
        mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
        return Rollout(torch.zeros(3, 1), torch.ones(3, 1), torch.zeros(3, 3), mask,
                       torch.tensor([False, True, False]), prompts, out)

    monkeypatch.setattr(ev, "generate", fake_generate)
    report = evaluate(None, None, ["a", "b", "c"], ["4", "6", "1"], max_new_tokens=3)
    assert report == {"n": 3, "accuracy": pytest.approx(1 / 3), "format": pytest.approx(2 / 3),
                      "mean_length": pytest.approx(2.0), "truncated_ratio": pytest.approx(1 / 3)}


def test_eval_cli_writes_json_report(gsm8k_dir, tmp_path, capsys):
    out = tmp_path / "report.json"
    code = main(["eval", "--model", "tiny-random", "--data", str(gsm8k_dir / "test.jsonl"), "--limit", "3",
                 "--max_new_tokens", "8", "--k", "2", "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["n"] == 3 and len(report["records"]) == 3
    for key in ("accuracy", "format", "mean_length", "pass@2", "maj@2", "pass@1_sampled", "settings"):
        assert key in report
    assert report["records"][0]["gold"] == "18"  # Janet's ducks, the first GSM8K test problem
    assert "accuracy=" in capsys.readouterr().out


def test_eval_cli_loads_adapter_of_a_run(tiny_data, tmp_path):
    from minigrpo.config import Config
    from minigrpo.train import train

    run = train(Config(model="tiny-random", dataset=str(tiny_data), num_generations=2, use_peft=True,
                       per_device_train_batch_size=4, max_completion_length=4, max_steps=1, eval_limit=0,
                       output_dir=str(tmp_path / "run")), show_progress=False)
    assert main(["eval", "--adapter", str(run / "adapter"), "--data", str(tiny_data), "--limit", "2"]) == 0
    report = json.loads((run / "eval_test.json").read_text())
    assert report["settings"]["model"] == "tiny-random" and report["settings"]["max_new_tokens"] == 4
