"""How much of a run's held-out gain is the answer format, and how much is getting the number right.

    python scripts/format_vs_reasoning.py RUN_DIR [--limit N]

Evaluates the run's starting model and its trained adapter on the run's held-out rows (greedy, the run's prompts
and stop strings) and prints, for each: strict accuracy (the reward's check: the last '#### N'), format (a '#### N'
is there), accuracy among the formatted answers, and lenient accuracy (the last number anywhere in the completion
equals the gold answer, whatever the format). A gain in strict accuracy that lenient accuracy does not show was
the format only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import torch
from peft import PeftModel

from minigrpo.compat import peft_wrapping
from minigrpo.config import run_config
from minigrpo.evaluate import evaluate
from minigrpo.model import load_model, load_tokenizer
from minigrpo.run import held_out
from minigrpo.tasks.answers import normalize_number
from minigrpo.tasks.prompts import render_prompts, resolve_template, stop_strings

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> str | None:
    found = NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


def breakdown(report: dict) -> dict[str, float]:
    records = report["records"]
    n = len(records)
    formatted = [r for r in records if "####" in r["completion"]]
    return {"strict_accuracy": sum(r["correct"] for r in records) / n, "format": len(formatted) / n,
            "accuracy_when_formatted": sum(r["correct"] for r in formatted) / max(len(formatted), 1),
            "lenient_accuracy": sum(last_number(r["completion"]) == str(r["gold"]) for r in records) / n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--limit", type=int, default=None, help="held-out rows (default: the run's eval_limit)")
    args = p.parse_args()
    torch.set_num_threads(1)
    overrides = {"use_peft": False, "device": "cpu", "resume": False}
    overrides |= {"eval_limit": args.limit} if args.limit else {}
    cfg = run_config(args.run_dir, **overrides)
    tok = load_tokenizer(cfg)
    rows = held_out(cfg)
    cfg = dataclasses.replace(cfg, template=resolve_template(cfg, tok, rows))
    prompts = render_prompts(cfg, tok, rows, check_length=False)
    golds = [ex.columns["answer"] for ex in rows]
    model, tok = load_model(cfg, tok)
    out = {}
    for name in ("before", "after"):
        if name == "after":
            with peft_wrapping():
                model = PeftModel.from_pretrained(model, str(args.run_dir / "adapter"))
        report = evaluate(model, tok, prompts, golds, cfg.max_completion_length, batch_size=cfg.eval_batch_size,
                          backend=cfg.rollout_backend, keep_records=True, stop=stop_strings(cfg))
        out[name] = breakdown(report)
        print(name, "  ".join(f"{k} {v:.3f}" for k, v in out[name].items()), flush=True)
    (args.run_dir / "format_vs_reasoning.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
