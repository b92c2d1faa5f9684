"""`minigrpo sample`: rejection sampling, the R1 recipe's third stage.

N completions per prompt, scored by the reward functions; the correct ones (or the best k, or those an LLM judge
accepts) are kept and written as an SFT JSONL in TRL's prompt-completion form (`question`, `completion` = the kept
completion, trained on as written, `answer` = the gold answer where the row has one) that `minigrpo sft --dataset
FILE.jsonl` trains on, with statistics: kept fraction and the rule's per-prompt pass rate.

With a judge (R1's "generative reward model": model_rewards.Judge, local or on a server) `keep="judge"` keeps
the distinct completions it scores at least `threshold` (its score is N / scale, in [0, 1]) and that are not
empty; a sample it gives no verdict is not kept (counted in `judge_failures`). Where the gold answers are numbers,
the statistics also say how the judge's verdicts agree with the rule's (`is_correct`): its precision and recall.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from minigrpo.rollout import generate
from minigrpo.rollout.types import SamplingParams
from minigrpo.tasks.answers import gold_answer, is_correct, normalize_number
from minigrpo.tasks.rewards import score
from minigrpo.tasks.sources import Example

KEEP = ("correct", "best", "judge")


def rejection_sample(model: Any, tokenizer: Any, prompts: list[str], examples: list[Example], params: SamplingParams,
                     reward_funcs: list[tuple[str, Callable, float]], keep: str = "correct", best_k: int = 1,
                     batch_size: int = 32, backend: str = "engine", judge: Callable | None = None,
                     threshold: float = 0.8) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Sample params.n completions per prompt; keep the correct ones ('correct'), the best_k by reward ('best':
    the judge's score counts as one more reward when there is one), or those the judge scores >= threshold
    ('judge')."""
    if keep not in KEEP:
        raise ValueError(f"keep: {keep!r} is not one of {', '.join(KEEP)}")
    if keep == "judge" and judge is None:
        raise ValueError("keep='judge' needs a judge")
    funcs = ([] if keep == "judge" else reward_funcs) + ([("judge", judge, 1.0)] if judge is not None else [])
    rows: list[dict[str, Any]] = []
    pass_rates: list[float] = []  # the rule's, per prompt with a gold answer
    kept_per_prompt: list[int] = []
    verdicts: list[tuple[float | None, bool | None]] = []  # (judge score, the rule's verdict where it has one)
    per_call = max(batch_size // params.n, 1)
    for start in range(0, len(prompts), per_call):
        chunk, exs = prompts[start:start + per_call], examples[start:start + per_call]
        ro = generate(backend, model, tokenizer, chunk, params)
        columns = {k: [ex.columns.get(k) for ex in exs for _ in range(params.n)]
                   for k in dict.fromkeys(k for ex in exs for k in ex.columns)}
        totals, per_func = score(funcs, ro.prompts, ro.completions, columns)
        judged = per_func.get("judge", [None] * len(ro.completions))
        for g, ex in enumerate(exs):
            idx = range(g * params.n, (g + 1) * params.n)
            gold = ex.columns.get("answer")
            right = {i for i in idx if gold is not None and is_correct(ro.completions[i], gold)}
            if gold is not None:
                pass_rates.append(len(right) / params.n)
            if judge is not None:  # the rule's verdict beside the judge's, where the gold answer is a number
                numeric = gold is not None and normalize_number(gold_answer(gold)) is not None
                verdicts += [(judged[i], (i in right) if numeric else None) for i in idx]
            if keep == "best":
                passed = sorted((i for i in idx if totals[i] is not None), key=lambda i: -totals[i])[:best_k]
                chosen = [(ro.completions[i], judged[i]) for i in passed]
            else:
                passed = sorted(right) if keep == "correct" else [
                    i for i in idx if judged[i] is not None and judged[i] >= threshold]
                # distinct (with the best score a copy got), never empty (a judge may accept an empty answer)
                best: dict[str, float | None] = {}
                for i in passed:
                    if ro.completions[i].strip():
                        old = best.get(ro.completions[i])
                        best[ro.completions[i]] = judged[i] if old is None or (judged[i] or 0) > old else old
                chosen = list(best.items())
            kept_per_prompt.append(len(chosen))
            rows += [{"question": ex.question, "completion": c} | ({"answer": gold} if gold is not None else {})
                     | ({"judge_score": v} if judge is not None else {}) for c, v in chosen]
    n, samples = max(len(kept_per_prompt), 1), len(kept_per_prompt) * params.n
    stats = {"prompts": len(kept_per_prompt), "samples": samples, "kept": len(rows),
             "kept_fraction": len(rows) / max(samples, 1),
             "prompts_with_a_kept_sample": sum(1 for k in kept_per_prompt if k > 0) / n,
             "mean_pass_rate": sum(pass_rates) / len(pass_rates) if pass_rates else None,
             "pass_rate_histogram": dict(sorted(Counter(round(p, 3) for p in pass_rates).items()))}
    if judge is not None:
        stats |= judge_stats(verdicts, threshold)
    return rows, stats


def judge_stats(verdicts: list[tuple[float | None, bool | None]], threshold: float) -> dict[str, Any]:
    """The judge's figures over the samples: how many it accepted (`judge_accept_rate`: of all samples), how many it
    gave no verdict; and over the samples where both it and the rule have a verdict, its agreement with the rule,
    precision (accepted and correct / accepted) and recall (accepted and correct / correct); None where a ratio has
    no samples. (As a filter, a sample without a verdict is not kept: `judge_failures` says how often.)

    >>> s = judge_stats([(1.0, True), (0.9, False), (0.0, False), (None, True), (0.2, None)], 0.8)
    >>> s["judge_precision"], s["judge_recall"], s["judge_agreement_with_rule"], s["judge_accept_rate"]
    (0.5, 1.0, 0.6666666666666666, 0.4)
    """
    accepted = [s is not None and s >= threshold for s, _ in verdicts]
    ruled = [(a, r) for a, (s, r) in zip(accepted, verdicts, strict=True) if r is not None and s is not None]
    ratio = lambda num, den: num / den if den else None  # noqa: E731
    return {"judge_threshold": threshold, "judge_accepted": sum(accepted),
            "judge_accept_rate": ratio(sum(accepted), len(verdicts)),
            "judge_failures": sum(s is None for s, _ in verdicts),
            "judge_agreement_with_rule": ratio(sum(a == r for a, r in ruled), len(ruled)),
            "judge_precision": ratio(sum(a and r for a, r in ruled), sum(a for a, _ in ruled)),
            "judge_recall": ratio(sum(a and r for a, r in ruled), sum(r for _, r in ruled))}


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    """One JSON object per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def sample_to_jsonl(model: Any, tokenizer: Any, prompts: list[str], examples: list[Example], params: SamplingParams,
                    reward_funcs: list[tuple[str, Callable, float]], out: Path, keep: str = "correct",
                    best_k: int = 1, batch_size: int = 32, backend: str = "engine", judge: Callable | None = None,
                    threshold: float = 0.8) -> dict[str, Any]:
    """Rejection sampling into `out` (the SFT JSONL) and its statistics beside it (OUT.stats.json); the stats."""
    rows, stats = rejection_sample(model, tokenizer, prompts, examples, params, reward_funcs, keep, best_k,
                                   batch_size, backend=backend, judge=judge, threshold=threshold)
    write_jsonl(rows, out)
    out.with_suffix(".stats.json").write_text(json.dumps(stats, indent=2))
    return stats
