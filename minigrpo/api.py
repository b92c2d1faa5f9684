"""The Python API, in TRL's shape: `GRPOConfig`, `GRPOTrainer`, `SFTTrainer`; `trainer.train()`.

    from minigrpo import GRPOConfig, GRPOTrainer

    def reward_len(completions, **kwargs):
        return [-abs(20 - len(completion)) for completion in completions]

    trainer = GRPOTrainer(model="Qwen/Qwen2-0.5B-Instruct", reward_funcs=reward_len,
                          args=GRPOConfig(output_dir="Qwen2-0.5B-GRPO"), train_dataset=dataset)
    result = trainer.train()  # result.model, result.run_dir, result.metrics

Why TRL's classes rather than a `train(...)` function: most GRPO scripts are written against TRL's quick start, and
with the same names (`model`, `reward_funcs`, `args`, `train_dataset`, `eval_dataset`, `processing_class`,
`callbacks`, `peft_config`) such a script ports by changing its import line. There is no second code path:
`GRPOConfig` IS the command line's `Config` (every check the CLI makes, the same `ConfigError`, raised when the
config is made), and `train()` runs the loop `minigrpo train` runs (train.run_grpo), handing over what a YAML file
cannot hold (a loaded model, rows in memory, functions, callbacks) as `run.Inputs`.

What the trainer takes:
- model: a hub id, a folder, a packaged name ('tiny-arith', 'smollm2-135m'), or a loaded model (+ its tokenizer as
  `processing_class`);
- reward_funcs: one or a list of built-in names, 'package.module:function' paths or functions (sync or
  `async def`), called as TRL calls them (tasks/rewards.py);
- train_dataset / eval_dataset: a `datasets.Dataset`, an `IterableDataset` (its first rows, as many as the run
  draws) or a list of dicts, with TRL's `prompt` column (a text or a list of messages) or `question`; any other
  column reaches the rewards; or a dataset name / folder / .jsonl file as the config takes it;
- callbacks: objects with any of `on_log(step, metrics)`, `on_evaluate(step, metrics)`, `on_save(step, path)`,
  `on_train_end(result)` (a plain function is an on_log);
- peft_config: a `peft.LoraConfig` (its r, alpha, dropout and target modules), or `use_peft` in the config.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minigrpo.config import PACKAGED_MODELS, Config, check_key
from minigrpo.errors import ConfigError
from minigrpo.tasks.sources import IN_MEMORY, Example, rows_to_examples


def GRPOConfig(**values: Any) -> Config:  # noqa: N802  (TRL's name: a TRL script ports by its import line)
    """The config of every stage (`minigrpo.config.Config`, the command line's): the names TRL's GRPOConfig and
    SFTConfig use where the concept is the same. A key minigrpo does not have (a TRL-only one, e.g. bf16) is a
    ConfigError naming it and the closest keys, as on the command line."""
    for key in values:
        check_key(key, "in GRPOConfig(...)")
    return Config(**values)


SFTConfig = GRPOConfig


@dataclass
class TrainResult:
    """What `train()` returns: the run folder, the trained policy in memory, and the held-out figures."""
    run_dir: Path
    model: Any
    tokenizer: Any
    metrics: dict[str, dict[str, float]]  # {"before": {...}, "after": {...}}, as summary.json


class Callback:
    """Subclass and override what you need (each is optional; a callback may also be any object with these)."""

    def on_log(self, step: int, metrics: dict[str, float]) -> None:
        """Every logged row: each step's metrics, and the evaluations (step 0 = before training)."""

    def on_evaluate(self, step: int, metrics: dict[str, float]) -> None:
        """The held-out figures (eval/...) after an evaluation."""

    def on_save(self, step: int, path: Path) -> None:
        """A checkpoint was written (`path`)."""

    def on_train_end(self, result: TrainResult) -> None:
        """Training finished: the result `train()` returns."""


def _rows(data: Any, where: str, cfg: Config, limit: int | None) -> list[Example] | None:
    """Rows handed over in Python -> Examples (checked now, before any folder); a name or path -> None (the
    config's own loading)."""
    if data is None or isinstance(data, (str, os.PathLike)):
        return None
    streamed = not hasattr(data, "__len__")  # an IterableDataset: take as many rows as the run can draw
    return rows_to_examples(data, where, cfg.prompt_field, cfg.answer_field, limit if streamed else None)


class _Trainer:
    stage = "GRPO"

    def __init__(self, model: Any = None, args: Config | None = None, train_dataset: Any = None,
                 eval_dataset: Any = None, processing_class: Any = None, callbacks: list[Any] | None = None,
                 peft_config: Any = None, **changes: Any) -> None:
        if args is not None and not isinstance(args, Config):  # GRPOConfig(...) makes a Config
            raise ConfigError(f"args: expected a minigrpo GRPOConfig, got {type(args).__name__}")
        self._model = None
        base = args or Config()
        if isinstance(model, (str, os.PathLike)):
            changes["model"] = os.fspath(model)
        elif model is not None:  # a loaded model: config.yaml records where it came from
            if processing_class is None and not getattr(model, "name_or_path", ""):
                raise ConfigError("processing_class: a model built in code has no name to load its tokenizer "
                                  "from; pass the tokenizer as processing_class=")
            self._model = model
            changes["model"] = getattr(model, "name_or_path", "") or f"python:{type(model).__name__}"
        for key, data in (("dataset", train_dataset), ("eval_dataset", eval_dataset)):
            if data is not None:
                changes[key] = os.fspath(data) if isinstance(data, (str, os.PathLike)) else IN_MEMORY
        if peft_config is not None:
            targets = peft_config.target_modules
            targets = ["all-linear"] if targets in (None, "all-linear") else \
                [targets] if isinstance(targets, str) else sorted(targets)
            changes |= {"use_peft": True, "lora_r": peft_config.r, "lora_alpha": peft_config.lora_alpha,
                        "lora_dropout": peft_config.lora_dropout, "lora_target_modules": targets}
        if "model" in changes and changes["model"] != base.model and \
                base.gguf_file == PACKAGED_MODELS.get(base.model, (None, None))[1]:
            changes["gguf_file"] = None  # the config's packaged GGUF belongs to its model, not to this one
        self.args = dataclasses.replace(base, **changes)  # every check of the CLI, now
        if self.stage == "GRPO":
            self.args.validate_grpo()
        cfg = self.args
        # A stream gives as many rows as the run can draw (every process draws all of them, and keeps its share).
        world = int(os.environ.get("WORLD_SIZE", "1"))
        per_step = cfg.prompts_per_step * (cfg.max_sampling_tries if cfg.dynamic_sampling else 1) \
            if self.stage == "GRPO" else cfg.completions_per_step
        self.train_set = _rows(train_dataset, "train_dataset", cfg, cfg.max_steps * per_step * world)
        self.eval_set = _rows(eval_dataset, "eval_dataset", cfg, cfg.eval_limit) if cfg.eval_limit else None
        self.tokenizer = processing_class
        self.callbacks = list(callbacks or [])
        self.model, self.run_dir, self._run, self._start = self._model, None, None, None

    def _inputs(self) -> Any:
        from minigrpo.run import Inputs  # here: the loops load transformers and peft; making a trainer does not

        return Inputs(self._model, self.tokenizer, self.train_set, self.eval_set, self.callbacks)

    def _loop(self, inputs: Any) -> Any:
        from minigrpo.train import run_grpo  # here: see _inputs

        return run_grpo(self.args, inputs=inputs)

    def train(self) -> TrainResult:
        """Run the stage (the loop the command line runs); returns the run folder, the trained model and the
        held-out figures. `trainer.model` is the trained model afterwards."""
        run = self._run = self._loop(self._inputs())
        summary = run.run_dir / "summary.json"
        metrics = json.loads(summary.read_text()) if summary.is_file() else {}
        self.model, self.tokenizer, self.run_dir = run.model, run.tokenizer, run.run_dir
        result = TrainResult(run.run_dir, run.model, run.tokenizer, metrics)
        for callback in self.callbacks:
            if hasattr(callback, "on_train_end"):
                callback.on_train_end(result)
        return result

    def evaluate(self) -> dict[str, float]:
        """The held-out metric of the current model (the trained one after `train()`), as the loop logs it."""
        from minigrpo.model import load_model  # here: see _inputs
        from minigrpo.run import Run, prepare_data, run_eval

        if self._run is None:  # before training: the loop's own set-up, without a run folder
            cfg, tok, _, eval_set, _, eval_prompts = prepare_data(self.args, self.stage, self._inputs())
            model, tok = load_model(cfg, tok, self._model)
            self._start = Run(cfg, Path(cfg.output_dir or "."), model, tok, [], eval_set, [], eval_prompts,
                              stage=self.stage)
        run = self._run or self._start
        if not run.eval_prompts:
            raise ConfigError("evaluate: no held-out rows; pass eval_dataset= (or set eval_dataset and eval_limit)")
        return run_eval(run)


class GRPOTrainer(_Trainer):
    """GRPO from Python, as TRL's GRPOTrainer is called (module docstring)."""

    stage = "GRPO"

    def __init__(self, model: Any = None, reward_funcs: Any = None, args: Config | None = None,
                 train_dataset: Any = None, eval_dataset: Any = None, processing_class: Any = None,
                 callbacks: list[Any] | None = None, peft_config: Any = None) -> None:
        changes = {} if reward_funcs is None else {"reward_funcs": reward_funcs}
        super().__init__(model, args, train_dataset, eval_dataset, processing_class, callbacks, peft_config,
                         **changes)


class SFTTrainer(_Trainer):
    """Supervised fine-tuning from Python (the R1 recipe's cold start): rows with a prompt and a `completion`
    (TRL's prompt-completion format) or a gold `answer` / worked solution (sft.py)."""

    stage = "SFT"

    def _loop(self, inputs: Any) -> Any:
        from minigrpo.sft import run_sft  # here: see _inputs

        return run_sft(self.args, inputs=inputs)
