"""`minigrpo demo`: the DeepSeek-R1 recipe in miniature, on the built-in arith task, in minutes on a CPU.

    1. cold-start SFT      a randomly initialised tiny Llama learns the format from worked solutions
    2. GRPO                the correctness reward alone: no solutions are shown
    3. rejection sampling  N completions per train problem; the correct ones are kept
    4. SFT                 on the model's own correct samples (R1's "SFT on RL data" stage)

`minigrpo demo --full` runs R1's four stages as the paper has them, with a generative judge:

    1. cold-start SFT, 2. GRPO with the rule reward (as above)
    3. rejection sampling with a judge: a judge model is fine-tuned on the rule's verdicts of the stage-1 and
       stage-2 policies' own samples, each also against a near-miss reference (R1 asked DeepSeek-V3, given the
       reference and the prediction; here no bigger model exists, so the judge is the policy's copy taught to
       grade: `{answer}` and `= {reference} ?` in, `#### 10` (right) or `#### 0` (wrong) out); it keeps what it
       accepts out of N samples per problem; SFT on them
    4. GRPO on a mixed set: 3-step problems scored by the rule, 4-step problems (standing in for R1's general
       prompts, which have no rule) scored by the judge alone

Held-out greedy accuracy is measured after each stage and printed as a table at the end (with --full also on
4-step problems, and the judge's own figures: its verdicts' accuracy on held-out samples, and its precision and
recall against the rule when it filters).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.table import Table

from minigrpo.config import Config
from minigrpo.evaluate import evaluate
from minigrpo.model import load_model
from minigrpo.monitor import console, make_run_dir, print0
from minigrpo.rollout import generate
from minigrpo.rollout.types import SamplingParams
from minigrpo.sft import sft
from minigrpo.tasks.answers import is_correct
from minigrpo.tasks.model_rewards import Judge, fill_rubric
from minigrpo.tasks.prompts import render_prompts
from minigrpo.tasks.rewards import correctness_reward, load_reward, reward_name
from minigrpo.tasks.sources import load_split
from minigrpo.tools.sample import sample_to_jsonl, write_jsonl
from minigrpo.train import train

# Shared by every stage: the task, held-out evaluation, and CPU settings.
BASE = dict(dataset="arith", arith_steps=3, arith_max_number=10, arith_direct_fraction=0.7, use_peft=False,
            max_completion_length=48, eval_limit=500, eval_batch_size=500, eval_steps=0, logging_steps=50,
            num_threads=1, seed=42)
# The demo judge's rubric, in the tiny model's words (its tokenizer knows no others), and how its verdict reads.
JUDGE_RUBRIC = "{answer}\n= {reference} ?"
JUDGE_PATTERN = r"####\s*([0-9]+)"


def run_demo(root: str | None = None, scale: float = 1.0, show_progress: bool = True, full: bool = False,
             ) -> list[dict]:
    """Run the stages under `root` (default runs/demo-<time>); `scale` shortens every stage (tests); `full`: R1's
    four stages with a judge (module docstring)."""
    out = make_run_dir(root or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    steps = lambda n: max(1, int(n * scale))  # noqa: E731
    table: list[dict] = []
    four_step = Config(**BASE | {"arith_steps": 4}, model="tiny-arith-init")  # --full: the mixed set's other half

    def record(stage: str, run: Path | None, seconds: float, note: str = "") -> None:
        row = {"stage": stage, "accuracy": None, "seconds": round(seconds, 1), "note": note}
        if run is not None:
            row["accuracy"] = json.loads((run / "summary.json").read_text())["after"]["eval/accuracy"]
            if full:  # the same model on 4-step problems, never trained on before stage 4
                row["accuracy_4_steps"] = held_out(four_step, run / "model")
        table.append(row)
        figures = "" if run is None else f": held-out accuracy {row['accuracy']:.3f}" + (
            f" (4 steps: {row['accuracy_4_steps']:.3f})" if full else "")
        print0(f"[bold]{stage}[/bold]{figures}" + (f"; {note}" if note else ""))

    t = time.perf_counter()  # ---- 1. cold-start SFT ------------------------------------------------------
    run = sft(Config(**BASE, model="tiny-arith-init", learning_rate=3e-3, lr_scheduler_type="cosine",
                     warmup_steps=20, per_device_train_batch_size=64, max_steps=steps(1000),
                     output_dir=str(out / "1-sft")), show_progress)
    record("1. cold-start SFT", run, time.perf_counter() - t)
    cold_start_model = run / "model"
    t = time.perf_counter()  # ---- 2. GRPO -----------------------------------------------------------------
    run = train(Config(**BASE, model=str(run / "model"), learning_rate=1e-4, num_generations=8,
                       per_device_train_batch_size=64, reward_funcs=["correctness"], max_steps=steps(100),
                       output_dir=str(out / "2-grpo")), show_progress)
    record("2. GRPO (reward only)", run, time.perf_counter() - t)
    grpo_model = run / "model"
    cfg = Config(**BASE, model=str(grpo_model))
    train_rows = load_split(cfg, "train")

    judge = None
    if full:  # ---- 3a. a judge, taught to grade by the rule's verdicts on the policy's own samples -----------
        t = time.perf_counter()
        verdicts = []
        for policy in (cold_start_model, grpo_model):  # both policies' mistakes (the cold start's are other kinds)
            model, tok = load_model(dataclasses.replace(cfg, model=str(policy)))
            verdicts += graded_samples(model, tok, cfg, train_rows[steps(1000):steps(3000)], n=4)
        split = judge_data(verdicts, out / "3a-judge-data")
        run = sft(Config(**BASE | {"dataset": str(out / "3a-judge-data"), "max_completion_length": 4,
                                   "eval_limit": steps(1000)}, model=str(grpo_model), learning_rate=2e-3,
                         lr_scheduler_type="cosine", warmup_steps=10, per_device_train_batch_size=64,
                         max_steps=steps(600), output_dir=str(out / "3a-judge")), show_progress)
        right = json.loads((run / "summary.json").read_text())["after"]["eval/accuracy"]
        table.append({"stage": "3a. judge: SFT on the rule's verdicts", "accuracy": None,
                      "seconds": round(time.perf_counter() - t, 1),
                      "note": f"verdicts right on {right:.3f} of {split['test']} held-out samples "
                              f"({split['train']} to learn from)"})
        print0(f"[bold]3a. judge[/bold]: its verdicts are right on {right:.3f} of the held-out samples")
        judge = Judge(str(run / "model"), rubric=write_rubric(out), pattern=JUDGE_PATTERN, max_tokens=4,
                      batch_size=512)

    t = time.perf_counter()  # ---- 3. rejection sampling ----------------------------------------------------
    model, tok = load_model(cfg)
    examples = train_rows[:steps(1000)]
    samples = out / "3-samples.jsonl"
    stats = sample_to_jsonl(model, tok, render_prompts(cfg, tok, examples), examples,
                            SamplingParams(n=8, max_new_tokens=48), [("correctness", load_reward("correctness"), 1.0)],
                            samples, batch_size=512, backend=cfg.rollout_backend, keep="judge" if full else "correct",
                            judge=judge)
    note = f"kept {stats['kept']}/{stats['samples']}"
    if full:
        figure = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731  (None: no sample to count)
        note += f"; vs the rule: precision {figure(stats['judge_precision'])}, recall {figure(stats['judge_recall'])}"
    table.append({"stage": "3b. rejection sampling (the judge)" if full else "3. rejection sampling",
                  "accuracy": None, "seconds": round(time.perf_counter() - t, 1), "note": note,
                  "kept": stats["kept"]})
    print0(f"[bold]3. rejection sampling[/bold]: {note} (mean pass rate {stats['mean_pass_rate']:.3f})")
    t = time.perf_counter()  # ---- 4 (3c with --full). SFT on the model's own kept samples ------------------
    stage = "3c. SFT on the judge's picks" if full else "4. SFT on rejection samples"
    if stats["kept"] == 0:  # (a smoke run's untrained judge or policy): nothing to learn from
        record(stage, None, 0.0, "skipped: nothing was kept")
        run = grpo_model.parent
    else:
        run = sft(Config(**BASE | {"dataset": str(samples), "eval_dataset": "arith"}, model=str(grpo_model),
                         learning_rate=1e-4, per_device_train_batch_size=64, max_steps=steps(100),
                         output_dir=str(out / ("3c-sft" if full else "4-sft"))), show_progress)
        record(stage, run, time.perf_counter() - t)
    if full:  # ---- 4. GRPO on a mixed set: the rule where it applies, the judge elsewhere ----------------------
        t, failures = time.perf_counter(), judge.failures
        mixed = out / "4-mixed.jsonl"
        four = load_split(four_step, "train")
        write_jsonl([{"question": ex.question, "answer": ex.answer, "kind": kind}
                     for rows, kind in ((train_rows, "rule"), (four, "judge"))
                     for ex in rows[steps(3000):steps(3000) + steps(2000)]], mixed)
        run = train(Config(**BASE | {"dataset": str(mixed), "eval_dataset": "arith"}, model=str(run / "model"),
                           learning_rate=1e-4, num_generations=8, per_device_train_batch_size=64,
                           reward_funcs=[on_rows(correctness_reward, "rule"), on_rows(judge, "judge")],
                           max_steps=steps(100), output_dir=str(out / "4-grpo-mixed")), show_progress)
        record("4. GRPO, mixed set: rule + judge", run, time.perf_counter() - t,
               f"the judge gave no verdict {judge.failures - failures} times")
    print_table(table, full)
    (out / "stages.json").write_text(json.dumps(table, indent=2))
    return table


def held_out(cfg: Config, model_dir: Path) -> float:
    """Greedy accuracy of the model in `model_dir` on cfg's held-out problems (the first eval_limit)."""
    model, tok = load_model(dataclasses.replace(cfg, model=str(model_dir)))
    examples = load_split(cfg, "test", cfg.eval_limit)
    report = evaluate(model, tok, render_prompts(cfg, tok, examples), [ex.columns["answer"] for ex in examples],
                      max_new_tokens=cfg.max_completion_length, batch_size=cfg.eval_batch_size, backend="engine")
    return report["accuracy"]


def graded_samples(model: Any, tok: Any, cfg: Config, examples: list[Any], n: int) -> list[dict[str, Any]]:
    """n samples per problem from the policy, each with the rule's verdict: what the judge learns from."""
    prompts = render_prompts(cfg, tok, examples)
    out: list[dict[str, Any]] = []
    for start in range(0, len(examples), 64):  # 64 problems x n samples a call
        ro = generate("engine", model, tok, prompts[start:start + 64],
                      SamplingParams(n=n, max_new_tokens=cfg.max_completion_length))
        for i, completion in enumerate(ro.completions):
            gold = examples[start + i // n].columns["answer"]
            out.append({"answer": completion, "reference": gold, "right": is_correct(completion, gold)})
    return out


def judge_data(graded: list[dict[str, Any]], folder: Path, test_fraction: float = 0.1,
               near_misses: bool = True) -> dict[str, int]:
    """The judge's SFT data in `folder` (train.jsonl, test.jsonl): the rubric filled in as the judge will read it,
    its verdict `#### 10` or `#### 0` the target, distinct samples only, as many right as wrong (the larger side
    subsampled). The test split holds `test_fraction` of them, as sampled. With `near_misses` each train sample is
    also shown against a reference 1 to 3 off its own, labelled by the rule as well (mostly wrong: the hard cases,
    an answer one off its reference, which the policy's own mistakes are too few to teach); the row counts."""
    rng = random.Random(0)
    distinct = list({(g["answer"], g["reference"]): g for g in graded}.values())
    right, wrong = [g for g in distinct if g["right"]], [g for g in distinct if not g["right"]]
    if min(len(right), len(wrong)) < 2:
        raise ValueError(f"judge data: the policy's {len(distinct)} distinct samples are all right or all wrong "
                         f"({len(right)} right, {len(wrong)} wrong): no judge can learn to tell them apart; run the "
                         f"demo at a larger --scale")
    rng.shuffle(right)
    rng.shuffle(wrong)
    n_test = max(1, int(min(len(right), len(wrong)) * test_fraction))
    parts = {"test": (right[:n_test], wrong[:n_test]), "train": (right[n_test:], wrong[n_test:])}
    if near_misses:
        shifted = []
        for g in parts["train"][0] + parts["train"][1]:
            near = str(max(0, int(g["reference"]) + rng.choice([-3, -2, -1, 1, 2, 3])))
            if near != g["reference"]:  # (0 - 1 stays 0)
                shifted.append({"answer": g["answer"], "reference": near, "right": is_correct(g["answer"], near)})
        yes, no = parts["train"]
        parts["train"] = (yes + [g for g in shifted if g["right"]], no + [g for g in shifted if not g["right"]])
    counts = {}
    for name, (yes, no) in parts.items():
        k = min(len(yes), len(no))
        chosen = rng.sample(yes, k) + rng.sample(no, k)
        rng.shuffle(chosen)
        write_jsonl([{"question": fill_rubric(JUDGE_RUBRIC, "", g["answer"], g["reference"]),
                      "answer": "#### 10" if g["right"] else "#### 0"} for g in chosen], folder / f"{name}.jsonl")
        counts[name] = len(chosen)
    return counts


def write_rubric(out: Path) -> str:
    """The demo judge's rubric as a file (what `judge_rubric` takes): its path."""
    path = out / "judge-rubric.txt"
    path.write_text(JUDGE_RUBRIC)
    return str(path)


def on_rows(fn: Callable, which: str) -> Callable:
    """`fn` as a reward that scores only the rows whose `kind` column is `which` (no opinion, None, on the others):
    R1's stage 4 scores reasoning prompts by rule and general ones by a model. Async if `fn` is (a server judge)."""

    def pick(prompts: list[Any], completions: list[Any], kind: list[str], columns: dict[str, Any]) -> tuple:
        rows = [i for i, k in enumerate(kind) if k == which]
        return rows, ([prompts[i] for i in rows], [completions[i] for i in rows]), \
            {k: [v[i] for i in rows] for k, v in columns.items()}

    def spread(rows: list[int], values: list[Any], n: int) -> list[float | None]:
        out: list[float | None] = [None] * n
        for i, v in zip(rows, values, strict=True):
            out[i] = v
        return out

    if inspect.iscoroutinefunction(fn):
        async def routed(prompts: list[Any], completions: list[Any], kind: list[str], **columns: Any) -> list:
            rows, args, kwargs = pick(prompts, completions, kind, columns)
            return spread(rows, await fn(*args, **kwargs) if rows else [], len(completions))
    else:
        def routed(prompts: list[Any], completions: list[Any], kind: list[str], **columns: Any) -> list:
            rows, args, kwargs = pick(prompts, completions, kind, columns)
            return spread(rows, fn(*args, **kwargs) if rows else [], len(completions))
    routed.slow = getattr(fn, "slow", False)
    routed.__name__ = reward_name(fn).removesuffix("_reward")
    return routed


def print_table(rows: list[dict], full: bool = False) -> None:
    """The per-stage accuracy table."""
    table = Table(title=f"R1 recipe in miniature (arith task, {BASE['eval_limit']} held-out problems, greedy)")
    columns = ["stage", "held-out accuracy"] + (["4-step problems"] if full else []) + ["notes", "seconds"]
    for col in columns:
        table.add_column(col)
    for r in rows:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        four = [f"{r['accuracy_4_steps']:.3f}" if "accuracy_4_steps" in r else "-"] if full else []
        table.add_row(r["stage"], acc, *four, r.get("note", ""), str(r["seconds"]))
    console.print(table)
