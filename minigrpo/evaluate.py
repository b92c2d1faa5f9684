"""Evaluation: greedy accuracy, and pass@k / maj@k from k samples per problem.

It scores with `answers.is_correct`, the same extractor the correctness reward uses, so the training
reward and the reported accuracy cannot drift apart. Generation goes through the rollout backend.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from minigrpo.rollout import generate
from minigrpo.rollout.types import SamplingParams
from minigrpo.tasks.answers import extract_answer, is_correct


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
             temperature: float = 1.0, top_p: float = 1.0, keep_records: bool = False) -> dict[str, Any]:
    """Greedy accuracy, format compliance and mean length; with k > 1 also pass@k, maj@k and sampled pass@1."""
    greedy = SamplingParams(n=1, max_new_tokens=max_new_tokens, temperature=0.0)
    texts, lengths, truncated = [], [], []
    for chunk in _batched(prompts, batch_size):
        ro = generate(backend, model, tokenizer, chunk, greedy)
        texts += ro.completions
        lengths += ro.completion_mask.sum(1).tolist()
        truncated += ro.truncated.tolist()
    correct = [is_correct(t, g) for t, g in zip(texts, golds)]
    n = max(len(prompts), 1)
    report: dict[str, Any] = {
        "n": len(prompts), "accuracy": sum(correct) / n,
        "format": sum(extract_answer(t) is not None for t in texts) / n,
        "mean_length": sum(lengths) / n, "truncated_ratio": sum(truncated) / n,
    }
    if k > 1:
        sampled = SamplingParams(n=k, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        groups: list[list[str]] = []
        for chunk in _batched(prompts, max(batch_size // k, 1)):
            ro = generate(backend, model, tokenizer, chunk, sampled)
            groups += _batched(ro.completions, k)
        hits = [[is_correct(c, g) for c in group] for group, g in zip(groups, golds)]
        report[f"pass@{k}"] = sum(any(h) for h in hits) / n
        report["pass@1_sampled"] = sum(sum(h) / k for h in hits) / n
        report[f"maj@{k}"] = sum(majority_correct(group, g) for group, g in zip(groups, golds)) / n
    if keep_records:
        report["records"] = [{"prompt": p, "gold": g, "completion": t, "correct": c}
                             for p, g, t, c in zip(prompts, golds, texts, correct)]
    return report
