"""Runs that keep going: a reward that raises costs only its samples; non-finite updates are skipped, and
too many in a row stop the run with the last good policy saved and a message saying what to do."""

import torch

from minigrpo.cli import main
from minigrpo.tasks.rewards import score


def _flaky(prompts, completions, **kw):
    if any("boom" in c for c in completions):
        raise ZeroDivisionError("a bug in the user's reward")
    return [float(len(c)) for c in completions]


def test_a_raising_reward_costs_only_the_samples_it_fails_on(capsys):
    errors = {}
    totals, per_func = score([("flaky", _flaky, 1.0)], ["q"] * 3, ["ab", "boom", "abcd"], {"x": [1, 2, 3]}, errors)
    assert per_func["flaky"] == [2.0, None, 4.0] and totals == [2.0, None, 4.0]
    assert errors == {"flaky": 1}
    err = capsys.readouterr().err
    assert "reward 'flaky' raised" in err and "ZeroDivisionError" in err
    score([("flaky", _flaky, 1.0)], ["q"], ["boom"], {}, errors)
    assert errors == {"flaky": 2} and "Traceback" not in capsys.readouterr().err  # the first traceback only


def test_training_goes_on_through_reward_errors(tmp_path, monkeypatch):
    import json

    import minigrpo.tasks.rewards as R

    def picky(prompts, completions, **kw):
        if any("1" in c for c in completions):  # a user's bug that hits some samples
            raise RuntimeError("cannot score a completion with a 1 in it")
        return [1.0 for _ in completions]

    monkeypatch.setitem(R.REWARD_FUNCS, "picky", picky)
    out = tmp_path / "run"
    assert main(["train", "--reward_funcs=correctness,picky", "--max_steps=3", "--eval_limit=0",
                 "--per_device_train_batch_size=16", f"--output_dir={out}"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    errors = [r["train/reward_errors"] for r in rows if "train/reward_errors" in r]
    assert len(errors) == 3 and sum(errors) > 0  # counted, and the run finished
    assert all(0 < e < 16 for e in errors if e)  # only the samples it failed on


def test_non_finite_updates_in_a_row_stop_the_run_with_the_last_good_policy(tmp_path, monkeypatch, capsys):
    from minigrpo.config import Config
    from minigrpo.model import load_model

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: torch.tensor(float("nan")))
    out = tmp_path / "run"
    code = main(["train", "--max_steps=10", "--max_bad_steps=3", "--eval_limit=0", "--per_device_train_batch_size=16",
                 f"--output_dir={out}"])
    assert code == 3
    err = capsys.readouterr().err
    assert "step 3: 3 steps in a row had a non-finite loss or gradient" in err and "max_bad_steps: 0" in err
    saved = out / "checkpoint-3"
    from transformers import AutoModelForCausalLM

    start, _ = load_model(Config())
    after = AutoModelForCausalLM.from_pretrained(saved)
    for (name, a), b in zip(start.named_parameters(), after.parameters()):
        assert torch.equal(a, b), name  # every update was skipped: the saved policy is the starting one
