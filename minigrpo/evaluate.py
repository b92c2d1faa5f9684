"""Evaluation: greedy accuracy, and pass@k / maj@k from k samples per problem; or, for any task, the mean of a
named metric on greedy completions.

Math accuracy scores with `answers.is_correct`, the same extractor the correctness reward uses, so the training
reward and the reported accuracy cannot drift apart. Another task names its metric (`eval_metric`: a reward, the
run's weighted reward, or a function of its own; `resolve_metric`). Generation goes through the rollout backend.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from minigrpo.agent.turns import MultiTurn
from minigrpo.rollout import generate
from minigrpo.rollout.types import SamplingParams
from minigrpo.tasks.answers import extract_answer, is_correct
from minigrpo.tasks.rewards import (
    RewardGuard,
    correctness_reward,
    load_reward,
    load_rewards,
    reward_inputs,
    reward_name,
    reward_options,
    score,
)
from minigrpo.tasks.sources import Example, require_columns

PASS_METRICS = ("code_tests", "code_tests_all", "reasoning_gym")  # metrics in [0, 1] whose 1 is a pass (pass@k)
Metric = list[tuple[str, Callable, float]] | None  # functions summed as a reward is; None: math accuracy


def resolve_metric(cfg: Any, examples: list[Example]) -> tuple[str, Metric]:
    """The run's held-out metric: its name (logged as eval/<name>; math accuracy is eval/accuracy) and the
    functions to score it with (None: `evaluate`'s accuracy, format and length). `auto` is accuracy when every
    eval row has a gold answer, else the weighted reward of the run; on reasoning-gym tasks, their verifiers."""
    metric = cfg.eval_metric
    if metric == "auto" and examples and all(isinstance(ex.columns.get("metadata"), dict)
                                             and "source_dataset" in ex.columns["metadata"] for ex in examples):
        metric = "reasoning_gym"  # its tasks' own verifiers: most answers are not numbers
    elif metric == "auto" and examples and all("tests" in ex.columns for ex in examples):
        metric = "code_tests"  # programs run against their tests
    elif metric == "auto":
        metric = "correctness" if all("answer" in ex.columns for ex in examples) else "reward"
    if metric == "correctness":
        require_columns(examples, ["answer"], "the eval data", "eval_metric correctness compares to it")
        return "accuracy", None
    if metric == "reward":
        funcs = load_rewards(cfg)
    else:
        funcs = [(reward_name(metric), load_reward(metric, reward_options(cfg)), 1.0)]
    if any(fn is correctness_reward for _, fn, _ in funcs):
        require_columns(examples, ["answer"], "the eval data", f"eval_metric {metric}: the correctness reward "
                                                               f"compares to it")
    if any(name.startswith("code_tests") for name, _, _ in funcs):
        require_columns(examples, ["tests"], "the eval data", f"eval_metric {metric}: programs run against them")
    return ("reward" if metric == "reward" else funcs[0][0]), funcs


def evaluate_metric(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                    examples: list[Example], metric: list[tuple[str, Callable, float]], name: str,
                    max_new_tokens: int, batch_size: int = 32, backend: str = "hf",
                    stop: list[str] | tuple[str, ...] = (), guard: RewardGuard | None = None,
                    turns: MultiTurn | None = None, k: int = 0, temperature: float = 1.0,
                    top_p: float = 1.0, engine_decode: str = "auto") -> dict[str, Any]:
    """The mean of `metric` (samples it scores None are left out) over greedy completions, and their mean length.
    With k > 1 also pass@k and sampled pass@1 from k samples per problem, a sample passing when the metric gives
    it full marks (1: every test passed, a verifier's full credit). `guard`: the run's time limit on reward calls
    (a metric is a reward); `turns`: multi-turn, with tools; `engine_decode`: the config key of that name."""
    greedy = SamplingParams(n=1, max_new_tokens=max_new_tokens, temperature=0.0, stop=stop, turns=turns,
                            engine_decode=engine_decode)
    values, lengths = [], []
    for totals, ro in _scored(model, tokenizer, prompts, examples, metric, greedy, batch_size, backend, guard):
        lengths += ro.completion_mask.sum(1).tolist()
        values += [v for v in totals if v is not None]
    report = {"n": len(prompts), name: sum(values) / len(values) if values else float("nan"), "scored": len(values),
              "mean_length": sum(lengths) / max(len(lengths), 1)}
    if k > 1:
        sampled = SamplingParams(n=k, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop=stop,
                                 turns=turns, engine_decode=engine_decode)
        passes = [[v is not None and v >= 1.0 for v in totals[i:i + k]] for totals, _ in _scored(
            model, tokenizer, prompts, examples, metric, sampled, max(batch_size // k, 1), backend, guard)
            for i in range(0, len(totals), k)]
        report[f"pass@{k}"] = sum(any(p) for p in passes) / max(len(passes), 1)
        report["pass@1_sampled"] = sum(sum(p) / k for p in passes) / max(len(passes), 1)
    return report


def _scored(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], examples: list[Example],
            metric: list[tuple[str, Callable, float]], params: SamplingParams, batch_size: int, backend: str,
            guard: RewardGuard | None) -> Iterator[tuple[list[float | None], Any]]:
    """Per batch of problems: the metric of each of its completions (params.n per problem), and the rollout."""
    for chunk, exs in zip(_batched(prompts, batch_size), _batched(examples, batch_size)):
        ro = generate(backend, model, tokenizer, chunk, _bound(params, [ex.columns for ex in exs]))
        reward_prompts, completions, columns = reward_inputs(exs, ro.prompts, ro.completions, params.n, ro.stats)
        ids = [row[:int(n)] for row, n in zip(ro.completion_ids.tolist(), ro.completion_mask.sum(1).tolist())]
        totals, _ = score(metric, reward_prompts, completions, columns | {"completion_ids": ids}, None, guard)
        yield totals, ro


def _bound(params: SamplingParams, rows: list[dict[str, Any]]) -> SamplingParams:
    """`params` for a batch of problems whose dataset rows are `rows` (an environment is reset with them)."""
    return params if params.turns is None else dataclasses.replace(params, turns=params.turns.bound(rows, params.n))


def _batched(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def majority_correct(completions: list[str], gold: str) -> bool:
    """maj@k: the most frequent extracted answer (ties: first seen) is correct; no answer never wins."""
    answers = [(extract_answer(c), c) for c in completions]
    votes = Counter(a for a, _ in answers if a is not None)
    if not votes:
        return False
    winner = votes.most_common(1)[0][0]
    return is_correct(next(c for a, c in answers if a == winner), gold)


def evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], golds: list[str],
             max_new_tokens: int, batch_size: int = 32, backend: str = "hf", k: int = 0,
             temperature: float = 1.0, top_p: float = 1.0, keep_records: bool = False,
             stop: list[str] | tuple[str, ...] = (), turns: MultiTurn | None = None,
             rows: list[dict[str, Any]] | None = None, engine_decode: str = "auto") -> dict[str, Any]:
    """Greedy accuracy, format compliance and mean length; with k > 1 also pass@k, maj@k and sampled pass@1.
    `stop`: the strings that end a completion (the template's, prompts.stop_strings). `turns`: multi-turn, with
    tools; the report then adds tool_call_frequency (the share of problems whose trajectory called a tool).
    `rows`: the problems' dataset rows, what an environment is reset with (needed with one). `engine_decode`: the
    config key of that name."""
    if turns is not None and turns.environment is not None and rows is None:
        raise ValueError("evaluate: an environment is reset with each problem's dataset row: pass rows=")
    rows = rows if rows is not None else [{} for _ in prompts]
    greedy = SamplingParams(n=1, max_new_tokens=max_new_tokens, temperature=0.0, stop=stop, turns=turns,
                            engine_decode=engine_decode)
    texts, lengths, truncated, called = [], [], [], []
    for chunk, chunk_rows in zip(_batched(prompts, batch_size), _batched(rows, batch_size), strict=True):
        ro = generate(backend, model, tokenizer, chunk, _bound(greedy, chunk_rows))
        texts += ro.completions
        lengths += ro.completion_mask.sum(1).tolist()
        truncated += ro.truncated.tolist()
        called += [c > 0 for c in ro.stats["tool_calls"]] if ro.stats else []
    correct = [is_correct(t, g) for t, g in zip(texts, golds)]
    n = max(len(prompts), 1)
    report: dict[str, Any] = {
        "n": len(prompts), "accuracy": sum(correct) / n,
        "format": sum(extract_answer(t) is not None for t in texts) / n,
        "mean_length": sum(lengths) / n, "truncated_ratio": sum(truncated) / n,
    }
    if turns is not None and turns.tools:
        report["tool_call_frequency"] = sum(called) / n
    if k > 1:
        sampled = SamplingParams(n=k, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop=stop,
                                 turns=turns, engine_decode=engine_decode)
        groups: list[list[str]] = []
        size = max(batch_size // k, 1)
        for chunk, chunk_rows in zip(_batched(prompts, size), _batched(rows, size), strict=True):
            ro = generate(backend, model, tokenizer, chunk, _bound(sampled, chunk_rows))
            groups += _batched(ro.completions, k)
        hits = [[is_correct(c, g) for c in group] for group, g in zip(groups, golds)]
        report[f"pass@{k}"] = sum(any(h) for h in hits) / n
        report["pass@1_sampled"] = sum(sum(h) / k for h in hits) / n
        report[f"maj@{k}"] = sum(majority_correct(group, g) for group, g in zip(groups, golds)) / n
    if keep_records:
        report["records"] = [{"prompt": p, "gold": g, "completion": t, "correct": c}
                             for p, g, t, c in zip(prompts, golds, texts, correct)]
    return report
