"""`minigrpo bench rollout`: the rollout engine vs transformers' generate, same model, prompts and sampling.

Repetitions are interleaved (engine, hf, engine, hf, ...) in one process so machine noise hits both alike;
the report gives the median tokens/s of each, the spread (min-max) and the ratio of medians.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch


def bench_rollout(model: Any, tokenizer: Any, prompts: list[str], n: int, max_new_tokens: int, reps: int = 5,
                  temperature: float = 1.0, warmup: int = 1) -> dict[str, Any]:
    """Tokens/s of each backend over `reps` interleaved repetitions (seeded identically per repetition)."""
    from minigrpo.rollout import SamplingParams, engine_generate, hf_generate

    params = SamplingParams(n=n, max_new_tokens=max_new_tokens, temperature=temperature)
    backends = {"engine": engine_generate, "hf": hf_generate}
    rates: dict[str, list[float]] = {k: [] for k in backends}
    for rep in range(warmup + reps):
        for name, fn in backends.items():
            torch.manual_seed(rep)
            t0 = time.perf_counter()
            ro = fn(model, tokenizer, prompts, params)
            seconds = time.perf_counter() - t0
            if rep >= warmup:
                rates[name].append(ro.num_completion_tokens / seconds)  # real tokens, up to each EOS
    report: dict[str, Any] = {}
    for name, values in rates.items():
        report[name] = {"median_tokens_per_s": statistics.median(values), "min": min(values), "max": max(values)}
    report["ratio_engine_over_hf"] = report["engine"]["median_tokens_per_s"] / report["hf"]["median_tokens_per_s"]
    return report
