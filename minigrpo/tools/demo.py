"""`minigrpo demo`: the DeepSeek-R1 recipe in miniature, on the built-in arith task, in minutes on a CPU.

    1. cold-start SFT      a randomly initialised tiny Llama learns the format from worked solutions
    2. GRPO                the correctness reward alone: no solutions are shown
    3. rejection sampling  N completions per train problem; the correct ones are kept
    4. SFT                 on the model's own correct samples (R1's "SFT on RL data" stage)

Held-out greedy accuracy is measured after each stage and printed as a table at the end.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.table import Table

from minigrpo.config import Config
from minigrpo.model import load_model
from minigrpo.monitor import console, make_run_dir, print0
from minigrpo.rollout.types import SamplingParams
from minigrpo.sft import sft
from minigrpo.tasks.prompts import render_prompts
from minigrpo.tasks.rewards import load_reward
from minigrpo.tasks.sources import load_split
from minigrpo.tools.sample import sample_to_jsonl
from minigrpo.train import train

# Shared by every stage: the task, held-out evaluation, and CPU settings.
BASE = dict(dataset="arith", arith_steps=3, arith_max_number=10, arith_direct_fraction=0.7, use_peft=False,
            max_completion_length=48, eval_limit=500, eval_batch_size=500, eval_steps=0, logging_steps=50,
            num_threads=1, seed=42)


def run_demo(root: str | None = None, scale: float = 1.0, show_progress: bool = True) -> list[dict]:
    """Run the four stages under `root` (default runs/demo-<time>); `scale` shortens every stage (tests)."""
    out = make_run_dir(root or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    steps = lambda n: max(1, int(n * scale))  # noqa: E731
    table: list[dict] = []

    def record(stage: str, run: Path, seconds: float) -> None:
        after = json.loads((run / "summary.json").read_text())["after"]
        table.append({"stage": stage, "accuracy": after["eval/accuracy"], "seconds": round(seconds, 1)})
        print0(f"[bold]{stage}[/bold]: held-out accuracy {after['eval/accuracy']:.3f}")

    t = time.perf_counter()  # ---- 1. cold-start SFT ------------------------------------------------------
    run = sft(Config(**BASE, model="tiny-arith-init", learning_rate=3e-3, lr_scheduler_type="cosine",
                     warmup_steps=20, per_device_train_batch_size=64, max_steps=steps(600),
                     output_dir=str(out / "1-sft")), show_progress)
    record("1. cold-start SFT", run, time.perf_counter() - t)
    t = time.perf_counter()  # ---- 2. GRPO -----------------------------------------------------------------
    run = train(Config(**BASE, model=str(run / "model"), learning_rate=1e-4, num_generations=8,
                       per_device_train_batch_size=64, reward_funcs=["correctness"], max_steps=steps(100),
                       output_dir=str(out / "2-grpo")), show_progress)
    record("2. GRPO (reward only)", run, time.perf_counter() - t)
    t = time.perf_counter()  # ---- 3. rejection sampling ----------------------------------------------------
    cfg = Config(**BASE, model=str(run / "model"))
    model, tok = load_model(cfg)
    examples = load_split(cfg, "train")[:steps(1000)]
    samples = out / "3-samples.jsonl"
    stats = sample_to_jsonl(model, tok, render_prompts(cfg, tok, examples), examples,
                            SamplingParams(n=8, max_new_tokens=48), [("correctness", load_reward("correctness"), 1.0)],
                            samples, batch_size=512, backend=cfg.rollout_backend)
    print0(f"[bold]3. rejection sampling[/bold]: kept {stats['kept']}/{stats['samples']} "
           f"(mean pass rate {stats['mean_pass_rate']:.3f})")
    table.append({"stage": "3. rejection sampling", "accuracy": None, "seconds": round(time.perf_counter() - t, 1),
                  "kept": stats["kept"]})
    t = time.perf_counter()  # ---- 4. SFT on the model's own correct samples --------------------------------
    run = sft(Config(**BASE | {"dataset": str(samples), "eval_dataset": "arith"}, model=str(run / "model"),
                     learning_rate=1e-4, per_device_train_batch_size=64, max_steps=steps(100),
                     output_dir=str(out / "4-sft")), show_progress)
    record("4. SFT on rejection samples", run, time.perf_counter() - t)
    print_table(table)
    (out / "stages.json").write_text(json.dumps(table, indent=2))
    return table


def print_table(rows: list[dict]) -> None:
    """The per-stage accuracy table."""
    table = Table(title="R1 recipe in miniature (arith task, 500 held-out problems, greedy)")
    for col in ("stage", "held-out accuracy", "seconds"):
        table.add_column(col)
    for r in rows:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        table.add_row(r["stage"] + (f" ({r['kept']} kept)" if "kept" in r else ""), acc, str(r["seconds"]))
    console.print(table)
