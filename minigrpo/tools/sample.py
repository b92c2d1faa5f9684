"""`minigrpo sample`: rejection sampling, the R1 recipe's third stage.

N completions per prompt, scored by the reward functions; the correct ones (or the best k) are kept and
written as an SFT JSONL (`question`, `answer` = the kept completion, ending in `#### N`) that
`minigrpo sft --dataset FILE.jsonl` trains on, with statistics: kept fraction and per-prompt pass rate.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from minigrpo.rollout import generate
from minigrpo.rollout.types import SamplingParams
from minigrpo.tasks.answers import is_correct
from minigrpo.tasks.rewards import score
from minigrpo.tasks.sources import Example


def rejection_sample(model: Any, tokenizer: Any, prompts: list[str], examples: list[Example], params: SamplingParams,
                     reward_funcs: list[tuple[str, Callable, float]], keep: str = "correct", best_k: int = 1,
                     batch_size: int = 32, backend: str = "engine") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Sample params.n completions per prompt; keep the correct ones ('correct') or the best_k by reward."""
    rows: list[dict[str, Any]] = []
    pass_rates: list[float] = []
    per_call = max(batch_size // params.n, 1)
    for start in range(0, len(prompts), per_call):
        chunk, exs = prompts[start:start + per_call], examples[start:start + per_call]
        ro = generate(backend, model, tokenizer, chunk, params)
        columns = {k: [ex.columns[k] for ex in exs for _ in range(params.n)] for k in exs[0].columns}
        totals, _ = score(reward_funcs, ro.prompts, ro.completions, columns)
        for g, ex in enumerate(exs):
            idx = range(g * params.n, (g + 1) * params.n)
            correct = [i for i in idx if is_correct(ro.completions[i], ex.columns["answer"])]
            pass_rates.append(len(correct) / params.n)
            if keep == "correct":
                chosen = list(dict.fromkeys(ro.completions[i] for i in correct))  # drop exact duplicates
            else:
                ranked = sorted((i for i in idx if totals[i] is not None), key=lambda i: -totals[i])
                chosen = [ro.completions[i] for i in ranked[:best_k]]
            rows += [{"question": ex.question, "answer": c, "gold": ex.columns["answer"]} for c in chosen]
    n = max(len(pass_rates), 1)
    stats = {"prompts": len(pass_rates), "samples": len(pass_rates) * params.n, "kept": len(rows),
             "kept_fraction": len(rows) / max(len(pass_rates) * params.n, 1),
             "prompts_with_a_kept_sample": sum(1 for p in pass_rates if p > 0) / n,
             "mean_pass_rate": sum(pass_rates) / n,
             "pass_rate_histogram": dict(sorted(Counter(round(p, 3) for p in pass_rates).items()))}
    return rows, stats


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    """One JSON object per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def sample_to_jsonl(model: Any, tokenizer: Any, prompts: list[str], examples: list[Example], params: SamplingParams,
                    reward_funcs: list[tuple[str, Callable, float]], out: Path, keep: str = "correct",
                    best_k: int = 1, batch_size: int = 32, backend: str = "engine") -> dict[str, Any]:
    """Rejection sampling into `out` (the SFT JSONL) and its statistics beside it (OUT.stats.json); the stats."""
    rows, stats = rejection_sample(model, tokenizer, prompts, examples, params, reward_funcs, keep, best_k,
                                   batch_size, backend=backend)
    write_jsonl(rows, out)
    out.with_suffix(".stats.json").write_text(json.dumps(stats, indent=2))
    return stats
