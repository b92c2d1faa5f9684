"""The Python API (minigrpo/api.py): TRL's shape, the CLI's loop and checks."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
import yaml

from minigrpo import Callback, ConfigError, GRPOConfig, GRPOTrainer, SFTTrainer

TINY = dict(model="tiny-random", num_generations=4, per_device_train_batch_size=8, max_completion_length=6,
            max_steps=2, logging_steps=1, eval_steps=0, learning_rate=1e-2, num_threads=1)


def conversational(n: int, offset: int = 0) -> datasets.Dataset:
    return datasets.Dataset.from_list([
        {"prompt": [{"role": "system", "content": "Answer with letters."},
                    {"role": "user", "content": f"Say {i + offset}"}], "target": "a" * (i % 3 + 1)}
        for i in range(n)])


class Recorder(Callback):
    def __init__(self) -> None:
        self.logged, self.evaluated, self.saved, self.ended = [], [], [], None

    def on_log(self, step, metrics):
        self.logged.append(step)

    def on_evaluate(self, step, metrics):
        self.evaluated.append((step, sorted(metrics)))

    def on_save(self, step, path):
        self.saved.append((step, path.name))

    def on_train_end(self, result):
        self.ended = result


def test_lambda_reward_and_conversational_dataset_train_two_steps(tmp_path):
    seen = {}

    def count_a(prompts, completions, target, **kwargs):  # TRL's convention: keywords, conversational forms
        seen.update(prompt=prompts[0], completion=completions[0], target=target[0], keys=sorted(kwargs))
        return [float(c[0]["content"].count("a")) for c in completions]

    recorder = Recorder()
    trainer = GRPOTrainer(
        model="tiny-random",
        reward_funcs=[count_a, lambda completions, **kw: [-0.1 * len(c[0]["content"]) for c in completions]],
        args=GRPOConfig(**TINY, output_dir=str(tmp_path / "run"), save_steps=1, eval_limit=4),
        train_dataset=conversational(8), eval_dataset=conversational(4, offset=100), callbacks=[recorder])
    result = trainer.train()

    assert result.run_dir == tmp_path / "run" and trainer.model is result.model
    assert seen["prompt"][1] == {"role": "user", "content": seen["prompt"][1]["content"]}
    assert seen["prompt"][0] == {"role": "system", "content": "Answer with letters."}
    assert seen["completion"][0]["role"] == "assistant" and isinstance(seen["completion"][0]["content"], str)
    assert seen["target"] in ("a", "aa", "aaa") and "completion_ids" in seen["keys"]
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/reward" in r]
    assert steps == [1, 2]
    train_row = next(r for r in rows if r["step"] == 1 and "train/reward" in r)
    assert {"train/rewards/count_a/mean", "train/rewards/<lambda>/mean", "train/advantage_mean",
            "train/advantage_std"} <= set(train_row)
    assert "train/accuracy" not in train_row  # no gold answers: no math accuracy
    # No answer column: the held-out metric is the weighted reward, before and after, on the eval rows.
    assert set(result.metrics["before"]) == {"eval/reward", "eval/mean_length"} == set(result.metrics["after"])
    assert recorder.logged[0] == 0 and recorder.logged.count(1) == 1 and recorder.logged[-1] == 2
    assert [s for s, _ in recorder.evaluated] == [0, 2]
    assert recorder.saved == [(1, "checkpoint-1"), (2, "checkpoint-2")] and recorder.ended is result
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["reward_funcs"] == ["python:count_a", "python:<lambda>"] and saved["dataset"] == "<python>"


def test_trained_weights_change_and_a_loaded_model_is_used(tmp_path):
    from minigrpo.config import Config
    from minigrpo.model import load_model

    model, tok = load_model(Config(model="tiny-random"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = GRPOTrainer(model=model, processing_class=tok,
                          reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
                          args=GRPOConfig(**TINY, output_dir=str(tmp_path / "run"), eval_limit=0),
                          train_dataset=[{"prompt": f"Count to {i}:"} for i in range(8)])
    result = trainer.train()
    assert result.model is model  # trained in place, as handed over
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == len(before)  # full fine-tuning: every weight moved
    # a model built in code has no name to record: config.yaml says it came from Python
    assert yaml.safe_load((result.run_dir / "config.yaml").read_text())["model"] == "python:LlamaForCausalLM"


@pytest.mark.parametrize("make", [
    lambda: GRPOConfig(max_steps="3"),
    lambda: GRPOConfig(dataset=datasets.Dataset.from_list([{"prompt": "x"}])),
    lambda: GRPOConfig(reward_funcs=[42]),
    lambda: GRPOTrainer(reward_funcs=["no_such_reward"], args=GRPOConfig(num_generations=1)),
    lambda: GRPOTrainer(train_dataset=[{"text": "no prompt column"}]),
    lambda: GRPOTrainer(train_dataset=[{"prompt": [{"role": "user"}]}]),
    lambda: GRPOConfig(reward_funcs=None),
    lambda: GRPOConfig(bf16=True),  # a TRL-only key: named, with the closest keys
    lambda: GRPOTrainer(reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                        args=GRPOConfig(**TINY, eval_metric="no_such_metric"),
                        train_dataset=[{"prompt": "p"}] * 8, eval_dataset=[{"prompt": "q"}] * 4).train(),
    lambda: GRPOTrainer(reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                        args=GRPOConfig(**TINY, eval_metric="correctness"),  # eval rows without an answer
                        train_dataset=[{"prompt": "p"}] * 8, eval_dataset=[{"prompt": "q", "answer": None}] * 4
                        ).train(),
    lambda: SFTTrainer(model="tiny-random", train_dataset=[{"prompt": "no target"}] * 4,
                       args=GRPOConfig(model="tiny-random", max_steps=1)).train(),
])
def test_bad_values_are_refused_before_any_folder(make, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises((ConfigError, ValueError)) as err:
        make()
    assert type(err.value).__module__ == "minigrpo.errors"  # ConfigError or DataError, a message not a traceback
    assert not any(tmp_path.iterdir())  # nothing was written


def test_config_error_messages_name_the_key():
    with pytest.raises(ConfigError, match=r"max_steps: got '3' \(str\), expected an integer"):
        GRPOConfig(max_steps="3")
    with pytest.raises(ConfigError, match=r"dataset: got .* \(Dataset\), expected a string; rows in memory go to "
                                          r"GRPOTrainer\(train_dataset="):
        GRPOConfig(dataset=datasets.Dataset.from_list([{"prompt": "x"}]))
    with pytest.raises(ConfigError, match=r"reward_funcs\[1\]: got 42 \(int\)"):
        GRPOConfig(reward_funcs=["correctness", 42])
    assert GRPOConfig(reward_funcs=len).reward_funcs == [len]  # one function alone, as TRL takes it
    with pytest.raises(ConfigError, match=r"bf16: unknown key \(in GRPOConfig\(\.\.\.\)\)\. TRL's bf16 is "
                                          r"dtype: bfloat16"):
        GRPOConfig(bf16=True)


def test_functions_are_saved_by_a_name_that_loads_them_back():
    import functools

    from minigrpo.config import function_name
    from minigrpo.tasks.rewards import correctness_reward, format_reward_soft

    assert function_name(correctness_reward) == "minigrpo.tasks.rewards:correctness_reward"
    assert function_name(lambda completions, **kw: []) == "python:<lambda>"
    # a partial or a callable object is not the thing its module and qualname would import
    assert function_name(functools.partial(format_reward_soft)) == "python:partial"

    class Scorer:
        def __call__(self, completions, **kwargs):
            return [0.0] * len(completions)

    assert function_name(Scorer()) == "python:Scorer"


def test_a_run_with_a_python_function_resumes_only_from_python(tmp_path, capsys):
    trainer = GRPOTrainer(reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                          args=GRPOConfig(**TINY, output_dir=str(tmp_path / "run"), eval_limit=0, save_steps=1),
                          train_dataset=[{"prompt": f"p{i}"} for i in range(8)])
    trainer.train()
    from minigrpo.cli import main

    assert main(["train", "--resume", str(tmp_path / "run")]) == 2  # the shell cannot pass the lambda again
    assert "was a function handed over from Python" in capsys.readouterr().err


def test_sft_trainer_on_prompt_completion_rows(tmp_path):
    rows = [{"prompt": f"Say {i}", "completion": " ok"} for i in range(8)]
    trainer = SFTTrainer(model="tiny-random", args=GRPOConfig(model="tiny-random", max_steps=3, learning_rate=1e-2,
                                                              per_device_train_batch_size=4, eval_limit=0,
                                                              output_dir=str(tmp_path / "sft")),
                         train_dataset=rows)
    result = trainer.train()
    losses = [json.loads(line)["train/loss"] for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and losses[-1] < losses[0]
