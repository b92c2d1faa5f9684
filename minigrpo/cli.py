"""`minigrpo COMMAND`: the command line. One small cmd_* per sub-command: parse, call the library, and map its
errors to exit codes (README, "Exit codes"): a bad key, value, file or row exits 2 with a message naming it, a
run that stopped itself (Ctrl-C, non-finite updates) exits 3. Heavy libraries load only once the input is known
to be good."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from minigrpo.config import (
    DEVICE_RE,
    RANGES,
    Config,
    check_number,
    check_out_path,
    help_text,
    load_config,
    parse_overrides,
    run_config,
)
from minigrpo.errors import ConfigError, DataError, TrainingStopped
from minigrpo.monitor import quiet_libraries
from minigrpo.rollout import BACKENDS
from minigrpo.tasks.prompts import TEMPLATES

TRAIN_USAGE = """usage: minigrpo train [--config FILE.yaml] [--key=value ...]

Train with GRPO. Settings come from the defaults, then the YAML file, then --key=value overrides
(lists are comma-separated: --reward_funcs=correctness,format_strict). The resolved config is saved
in the run folder as config.yaml. Keys:
"""


def config_from_argv(argv: list[str]) -> Config:
    """`[--config FILE] [--key=value ...]` -> Config."""
    config_path = None
    rest = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            config_path, rest = argv[i + 1], argv[:i] + argv[i + 2:]
            break
        if arg.startswith("--config="):
            config_path, rest = arg.split("=", 1)[1], argv[:i] + argv[i + 1:]
            break
    return load_config(config_path, parse_overrides(rest))


def resume_argv(argv: list[str]) -> list[str]:
    """`--resume RUN_DIR` -> that run's config.yaml, its folder as output_dir, resume on; other flags after it."""
    for i, arg in enumerate(argv):
        if arg == "--resume" and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            run_dir, rest = argv[i + 1], argv[:i] + argv[i + 2:]
        elif arg.startswith("--resume=") and arg.split("=", 1)[1].lower() not in ("true", "false", "1", "0"):
            run_dir, rest = arg.split("=", 1)[1], argv[:i] + argv[i + 1:]
        else:
            continue
        if not (Path(run_dir) / "config.yaml").is_file():
            raise ConfigError(f"--resume {run_dir}: no config.yaml there; give the folder of a minigrpo run")
        if any(a == "--output_dir" or a.startswith(("--output_dir=", "--output-dir")) for a in rest):
            raise ConfigError(f"--output_dir: a resumed run stays in its folder ({run_dir}); leave --output_dir out "
                              f"(to train on from it elsewhere, start a new run with --model {run_dir}/model)")
        return ["--config", str(Path(run_dir) / "config.yaml"), "--resume=true", f"--output_dir={run_dir}", *rest]
    return argv


def run_stage(argv: list[str], stage: str) -> int:
    """`train` (GRPO) or `sft`: the same config keys, `--help` lists them, then the stage runs."""
    if "-h" in argv or "--help" in argv:
        usage = TRAIN_USAGE if stage == "train" else TRAIN_USAGE.replace("minigrpo train", "minigrpo sft").replace(
            "Train with GRPO", "Supervised fine-tuning on worked solutions (targets end in '#### N')")
        print(usage + help_text())
        return 0
    cfg = config_from_argv(resume_argv(argv))  # GRPO's own rules: train() checks them before any work
    # here, not at the top (as in every command below): the loops load torch and transformers, which take
    # seconds; a bad flag or --help answers at once
    if stage == "train":
        from minigrpo.train import train as run
    else:
        from minigrpo.sft import sft as run
    run(cfg)
    return 0


def cmd_train(argv: list[str]) -> int:
    """Parse `train` options, build the config and run the GRPO loop."""
    return run_stage(argv, "train")


def cmd_sft(argv: list[str]) -> int:
    """Parse `sft` options (the same keys as train) and run supervised fine-tuning."""
    return run_stage(argv, "sft")


def check_flags(args: argparse.Namespace, bounds: dict[str, tuple | str]) -> None:
    """Every numeric flag finite and in range before any work: a ConfigError names the flag as typed (`--batch_size:
    must be >= 1, got -4`). bounds: flag -> (low, high, low_open, high_open) as check_number takes them, or the
    Config key the flag mirrors, whose RANGES entry holds its bounds (they live in one place)."""
    for flag, b in bounds.items():
        check_number(f"--{flag}", getattr(args, flag), *(RANGES[b] if isinstance(b, str) else b))


def check_device(flag: str, device: str) -> None:
    """The device names Config's `device` accepts (one pattern, config.DEVICE_RE), for a flag."""
    if not DEVICE_RE.fullmatch(device):
        raise ConfigError(f"{flag}: got {device!r}, expected 'auto', 'cpu', 'cuda', 'cuda:N', 'mps' or 'xpu[:N]'")


def check_samples(args: argparse.Namespace, flag: str, consequence: str, fallback: int = 1) -> None:
    """Temperature 0 is greedy: more than one sample per problem would be the same completion again (`flag`: the
    count's flag, `consequence`: what that would do to the command's figures, `fallback`: the count for greedy)."""
    n = getattr(args, flag)
    if args.temperature == 0 and n > 1:
        raise ConfigError(f"--temperature: 0 is greedy decoding: the --{flag} {n} samples of a problem would all be "
                          f"the same completion ({consequence}); give --temperature > 0 (e.g. 1.0), or "
                          f"--{flag} {fallback}")


# Bounds of the flags every inference command shares: --max_new_tokens and --temperature mirror Config keys.
INFERENCE_BOUNDS: dict[str, tuple | str] = {"limit": (1,), "batch_size": (1,),
                                            "max_new_tokens": "max_completion_length", "temperature": "temperature"}


def check_inference(args: argparse.Namespace, bounds: dict[str, tuple | str]) -> None:
    """The shared flags of `eval`, `sample` and `bench rollout` and the command's own `bounds`, and --adapter's
    folder: checked before anything loads."""
    check_flags(args, INFERENCE_BOUNDS | bounds)
    check_device("--device", args.device)
    if args.adapter is not None:
        if not Path(args.adapter).is_dir():
            raise ConfigError(f"--adapter {args.adapter}: no such folder; give a LoRA run's RUN_DIR/adapter (or "
                              f"one of its checkpoint-N folders)")
        if not (Path(args.adapter) / "adapter_config.json").is_file():
            raise ConfigError(f"--adapter {args.adapter}: no adapter_config.json there: not a LoRA adapter (a full "
                              f"fine-tune's policy is RUN_DIR/model: give it as --model)")


def inference_parser(prog: str, description: str, backend: bool = True) -> argparse.ArgumentParser:
    """Options shared by `eval` and `sample`: which model, which data, how to generate."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--model", help="hub id, local dir (a run's model/ too), 'tiny-arith', 'tiny-random'; "
                   "default: the model of the adapter's run")
    p.add_argument("--gguf_file", help="GGUF file name inside --model (a dir or hub id)")
    p.add_argument("--adapter", help="a LoRA adapter dir saved by `minigrpo train` (RUN_DIR/adapter)")
    p.add_argument("--data", default=None, help="'arith', 'gsm8k' / hub id, a dir with {split}.jsonl, or a "
                   ".jsonl file (default: the run's dataset)")
    p.add_argument("--split", default="test", help="split to use (default: test)")
    p.add_argument("--limit", type=int, default=None, help="use the first N problems (default: all)")
    p.add_argument("--prompt_field", default=None, help="column with the prompt (default: 'prompt', else 'question')")
    p.add_argument("--answer_field", default="answer", help="JSONL field with the gold answer")
    p.add_argument("--template", choices=list(TEMPLATES), default=None,
                   help="prompt template (default: the run's, else auto)")
    p.add_argument("--max_new_tokens", type=int, default=None, help="default: the run's max_completion_length")
    p.add_argument("--batch_size", type=int, default=32, help="sequences per generate call")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--tools", default=None, help="tools the model may call, comma-separated (calculator, python, "
                   "package.module:function): multi-turn; default: the run's")
    p.add_argument("--environment", default=None, help="a multi-turn environment answering each turn (retry, "
                   "package.module:Class; 'none': without one); default: the run's")
    p.add_argument("--max_turns", type=int, default=None, help="with tools: assistant turns per trajectory (default: "
                   "the run's, else 4)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    if backend:
        p.add_argument("--backend", choices=list(BACKENDS), default="engine",
                       help="generation: " + "; ".join(f"{name}: {what}" for name, (_, what) in BACKENDS.items()))
    return p


def load_for_inference(args: argparse.Namespace, check: Callable[[Config, list[Any]], None] | None = None,
                       ) -> tuple[Config, Any, Any, list[Any], list[str]]:
    """Config (from the run that made the adapter/model, then the flags), model, tokenizer, examples, prompts.
    `check(cfg, examples)`: the command's own checks, once the data is loaded and before any model loads."""
    # A run's config.yaml, beside its adapter/ or model/, tells the base model and how its prompts looked.
    source = Path(args.adapter or args.model or ".")
    is_policy = source.name in ("adapter", "model") or source.name.startswith("checkpoint-")  # of a run folder
    run_dir = source.parent if args.adapter or (args.model and is_policy) else None
    values = {key: getattr(args, flag) for key, flag in (("model", "model"), ("gguf_file", "gguf_file"),
              ("template", "template"), ("dataset", "data"), ("max_completion_length", "max_new_tokens"),
              ("max_turns", "max_turns")) if getattr(args, flag) is not None}
    if args.tools is not None:
        values["tools"] = [t for t in args.tools.split(",") if t]
        values["environment"] = None  # tools given: they answer the turns (a run's environment is left out)
    if args.environment is not None:
        values["environment"] = None if args.environment == "none" else args.environment
    if args.prompt_field is not None or args.answer_field != "answer":
        values |= {"prompt_field": args.prompt_field, "answer_field": args.answer_field}
    values |= {"use_peft": False, "load_in_4bit": False, "device": args.device, "resume": False,
               "rollout_backend": getattr(args, "backend", "engine")}
    if run_dir and (run_dir / "config.yaml").is_file():
        cfg = run_config(run_dir, strict=False, **values)
    elif "model" not in values:
        raise ConfigError("--model: give a model (hub id, dir, tiny-arith) or an --adapter from a minigrpo run")
    else:
        cfg = Config(**{"dataset": "gsm8k"} | values)

    # here: heavy (torch, transformers, peft), loaded once the flags are good
    from minigrpo import rollout
    from minigrpo.model import check_device, load_model, load_tokenizer
    from minigrpo.tasks.prompts import render_prompts, resolve_template
    from minigrpo.tasks.sources import load_split

    rollout.check(cfg)
    check_device(cfg.device)  # a device this machine lacks: named, before anything loads
    tok = load_tokenizer(cfg)
    # --data names the rows (a file is taken whole); else the run's: its eval_dataset for the eval split, its
    # dataset's split otherwise (a single training file has no other split: an error, not the training rows)
    named = args.data or (cfg.eval_dataset if run_dir and args.split == cfg.eval_split else None)
    examples = load_split(cfg, args.split, args.limit, named)
    cfg = dataclasses.replace(cfg, template=resolve_template(cfg, tok, examples))  # "auto" made concrete
    fewshot = load_split(cfg, "train", cfg.num_fewshot) if cfg.template == "fewshot" else None
    if check is not None:
        check(cfg, examples)
    model, tok = load_model(cfg, tok)
    if args.adapter:
        from peft import PeftModel  # here: heavy, as above

        from minigrpo.compat import peft_wrapping
        with peft_wrapping():
            model = PeftModel.from_pretrained(model, args.adapter)
    rollout.start(cfg, model, tok)
    prompts = render_prompts(cfg, tok, examples, fewshot, check_length=False)  # no training: any length
    return cfg, model, tok, examples, prompts


def cmd_eval(argv: list[str]) -> int:
    """Load the model (+ adapter), evaluate, print a summary and write the JSON report."""
    p = inference_parser("minigrpo eval", "Evaluate a model (and adapter) on a math dataset: greedy accuracy, "
                         "format compliance, mean length; pass@k and maj@k with --k. Scores with the same "
                         "answer extractor as the training reward.")
    p.add_argument("--k", type=int, default=0, help="also sample k completions per problem for pass@k and maj@k")
    p.add_argument("--out", default=None, help="JSON report path (default: eval_<split>.json beside the "
                   "adapter, else in the current folder)")
    args = p.parse_args(argv)
    check_inference(args, {"k": (0,)})
    if args.k == 1:
        raise ConfigError("--k: 1 gives no pass@k or maj@k (they need k >= 2 samples per problem); give --k 0 "
                          "(greedy accuracy only) or --k >= 2")
    check_samples(args, "k", "pass@k and maj@k would repeat the greedy accuracy", fallback=0)
    out = Path(args.out) if args.out else (Path(args.adapter).parent if args.adapter else Path(".")) / \
        f"eval_{args.split}.json"
    check_out_path("--out", out)
    cfg, model, tok, examples, prompts = load_for_inference(args)
    from minigrpo.agent.turns import multi_turn  # here: heavy, as in load_for_inference
    from minigrpo.evaluate import PASS_METRICS, evaluate, evaluate_metric, resolve_metric
    from minigrpo.monitor import print0
    from minigrpo.tasks.prompts import stop_strings

    name, metric = resolve_metric(cfg, examples)  # the run's eval_metric: math accuracy, or its own
    if args.k and metric is not None and name not in PASS_METRICS:
        raise ConfigError(f"--k: pass@k needs a metric that says when a sample passes ({', '.join(PASS_METRICS)}, "
                          f"or math accuracy); this data's metric is {name!r}. Leave --k out, or set eval_metric")
    if metric is None:
        report = evaluate(model, tok, prompts, [ex.columns["answer"] for ex in examples],
                          max_new_tokens=cfg.max_completion_length, batch_size=args.batch_size, k=args.k,
                          temperature=args.temperature, keep_records=True, backend=cfg.rollout_backend,
                          stop=stop_strings(cfg), turns=multi_turn(cfg), rows=[ex.columns for ex in examples],
                          engine_decode=cfg.engine_decode)
    else:
        report = evaluate_metric(model, tok, prompts, examples, metric, name, cfg.max_completion_length,
                                 args.batch_size, cfg.rollout_backend, stop=stop_strings(cfg), turns=multi_turn(cfg),
                                 k=args.k, temperature=args.temperature, engine_decode=cfg.engine_decode)
    report["settings"] = {"model": cfg.model, "gguf_file": cfg.gguf_file, "adapter": args.adapter,
                          "data": cfg.dataset, "split": args.split, "template": cfg.template,
                          "max_new_tokens": cfg.max_completion_length, "decoding": "greedy", "k": args.k,
                          "metric": name}
    if metric is None:  # math accuracy's extractor (a named metric reads completions its own way)
        report["settings"]["extraction"] = "last '#### N', then \\boxed{}; numeric equality, math-verify fallback"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    summary = {k: v for k, v in report.items() if k not in ("records", "settings")}
    print0("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    print0(f"report: {out}")
    return 0


def cmd_sample(argv: list[str]) -> int:
    """Rejection sampling: N completions per prompt, keep the correct (or best-k, or judge-accepted), write an SFT
    JSONL."""
    p = inference_parser("minigrpo sample", "Rejection sampling: sample N completions per problem, score them, "
                         "keep the correct ones (or the best k by reward, or those an LLM judge accepts) and write "
                         "them as an SFT JSONL.")
    p.add_argument("--n", type=int, default=8, help="completions sampled per problem")
    p.add_argument("--keep", choices=["correct", "best", "judge"], default=None, help="keep every distinct correct "
                   "completion, the best --best_k by total reward, or every distinct one the --judge scores >= "
                   "--judge_threshold (default: judge with --judge, else correct)")
    p.add_argument("--best_k", type=int, default=None, help="with --keep best: completions kept per problem "
                   "(default 1)")
    p.add_argument("--reward_funcs", default=None, help="comma-separated reward names (for --keep best; default "
                   "correctness)")
    p.add_argument("--judge", default=None, help="an LLM judge: a local model (hub id, folder, built-in name), or "
                   "the model --judge_base_url serves; its verdicts' agreement with the rule is reported")
    p.add_argument("--judge_base_url", default=None, help="an OpenAI-compatible endpoint serving --judge (key from "
                   "OPENAI_API_KEY)")
    p.add_argument("--judge_rubric", default=None, help="the judge's rubric: built-in 'correct' (the default) or a "
                   "template file ({question}, {answer}, {reference}, {scale})")
    p.add_argument("--judge_pattern", default=None, help="a regex whose first group is the verdict's number "
                   "(default: the last 'Score: N')")
    p.add_argument("--judge_max_tokens", type=int, default=None, help="tokens the judge may write per verdict "
                   "(default 256)")
    p.add_argument("--judge_threshold", type=float, default=None, help="with --keep judge: the least score kept "
                   "(N / 10; default 0.8: keeps 8, 9 and 10)")
    p.add_argument("--out", required=True, help="output JSONL; statistics go to OUT with .stats.json")
    args = p.parse_args(argv if "--split" in argv else [*argv, "--split", "train"])
    check_inference(args, {"n": (1,), "best_k": (1,), "judge_max_tokens": "judge_max_tokens",
                           "judge_threshold": (0, 1)})
    judge_flags = ("judge_base_url", "judge_rubric", "judge_pattern", "judge_max_tokens", "judge_threshold")
    for flag in judge_flags:
        if getattr(args, flag) is not None and not args.judge:
            raise ConfigError(f"--{flag}: there is no judge to use it; give --judge MODEL")
    args.keep = args.keep or ("judge" if args.judge else "correct")
    if args.keep == "judge" and not args.judge:
        raise ConfigError("--keep judge: give the judge, --judge MODEL (a local model, or the model --judge_base_url "
                          "serves)")
    if args.keep == "judge" and (args.best_k is not None or args.reward_funcs is not None):
        raise ConfigError("--best_k / --reward_funcs: with --keep judge only the judge's verdict decides; give "
                          "--keep best to rank by the rewards (and the judge's score)")
    args.best_k, args.reward_funcs = args.best_k or 1, args.reward_funcs or "correctness"
    if args.judge and "judge" in args.reward_funcs.split(","):
        raise ConfigError("--reward_funcs: judge is already scored with --judge; leave it out of --reward_funcs")
    if args.keep == "best" and args.best_k > args.n:
        raise ConfigError(f"--best_k: {args.best_k} is more than the --n {args.n} completions sampled per problem "
                          f"(all would be kept); give --best_k <= --n")
    check_samples(args, "n", "at most one distinct completion would be kept per problem")
    check_out_path("--out", args.out)
    check_out_path("--out", Path(args.out).with_suffix(".stats.json"))  # the statistics beside it
    # here: an unknown reward name or a bad rubric fails before the model loads
    from minigrpo.tasks.model_rewards import load_judge, rubric_text
    from minigrpo.tasks.rewards import load_reward
    from minigrpo.tasks.sources import require_columns

    options = {"judge_model": args.judge, "device": args.device} | {
        k: getattr(args, k) for k in judge_flags[:4] if getattr(args, k) is not None}
    if args.judge:
        try:
            rubric_text(options.get("judge_rubric", "correct"))
            if args.judge_pattern is not None and re.compile(args.judge_pattern).groups < 1:
                raise ConfigError(f"--judge_pattern: {args.judge_pattern!r} needs a group around the verdict's "
                                  f"number, e.g. 'Verdict: ([0-9]+)'")
        except ConfigError as e:
            raise ConfigError(str(e) if str(e).startswith("--") else f"--{e}") from None  # as typed: --judge_...
        except re.error as e:
            raise ConfigError(f"--judge_pattern: {args.judge_pattern!r} is not a regular expression: {e}") from None
    funcs = [(name, load_reward(name, options), 1.0) for name in args.reward_funcs.split(",")]

    def check(cfg: Config, examples: list[Any]) -> None:  # before any model loads
        if args.keep == "correct" or (args.keep == "best" and "correctness" in args.reward_funcs.split(",")):
            require_columns(examples, ["answer"], args.data or cfg.dataset,
                            f"--keep {args.keep} compares each sample with its gold answer")

    cfg, model, tok, examples, prompts = load_for_inference(args, check)
    try:
        judge = load_judge(options) if args.judge else None  # once the policy and data are good
    except ConfigError as e:
        raise ConfigError(f"--judge {args.judge}: {e}") from None
    from minigrpo.monitor import print0  # here: heavy, as in load_for_inference
    from minigrpo.rollout.types import SamplingParams
    from minigrpo.tasks.prompts import stop_strings
    from minigrpo.tools.sample import sample_to_jsonl

    params = SamplingParams(n=args.n, max_new_tokens=cfg.max_completion_length, temperature=args.temperature,
                            stop=stop_strings(cfg), engine_decode=cfg.engine_decode)
    stats = sample_to_jsonl(model, tok, prompts, examples, params, funcs, Path(args.out), args.keep, args.best_k,
                            args.batch_size, backend=cfg.rollout_backend, judge=judge,
                            threshold=0.8 if args.judge_threshold is None else args.judge_threshold)
    rate = "-" if stats["mean_pass_rate"] is None else f"{stats['mean_pass_rate']:.3f}"
    print0(f"kept {stats['kept']}/{stats['samples']} samples ({stats['kept_fraction']:.3f}); "
           f"{stats['prompts_with_a_kept_sample']:.3f} of prompts have one; mean pass rate (the rule's) {rate} "
           f"-> {args.out}")
    if judge is not None:
        figures = {k: stats[k] for k in ("judge_accepted", "judge_accept_rate", "judge_failures",
                                         "judge_agreement_with_rule", "judge_precision", "judge_recall")}
        print0("judge: " + "  ".join(f"{k.removeprefix('judge_')}={'-' if v is None else round(v, 3)}"
                                     for k, v in figures.items()))
    return 0


def cmd_plot(argv: list[str]) -> int:
    """Draw a run's curves as RUN_DIR/curves.png."""
    p = argparse.ArgumentParser(prog="minigrpo plot", description="Training curves of a run as one PNG; of "
                                "several runs, overlaid (to compare them).")
    p.add_argument("run_dir", nargs="+", help="a run folder (holds metrics.jsonl), or several")
    p.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/curves.png; with several runs the "
                                               "first one's compare.png)")
    args = p.parse_args(argv)
    first = Path(args.run_dir[0])
    if args.out is not None or first.is_dir():  # (a bad RUN_DIR is plot_run's to name)
        check_out_path("--out", args.out or first / ("curves.png" if len(args.run_dir) == 1 else "compare.png"))
    from minigrpo.tools.plot import plot_run  # here: matplotlib takes a second to load (RUN_DIR is checked first)

    print(plot_run(args.run_dir if len(args.run_dir) > 1 else first, args.out))
    return 0


def cmd_demo(argv: list[str]) -> int:
    """The R1 recipe in miniature: cold-start SFT -> GRPO -> rejection sampling -> SFT, with a table."""
    p = argparse.ArgumentParser(prog="minigrpo demo", description="The DeepSeek-R1 recipe in miniature on the "
                                "built-in arith task (cold-start SFT, GRPO, rejection sampling, SFT), offline on a "
                                "CPU, ending with the held-out accuracy after each stage.")
    p.add_argument("--out", default=None, help="folder for the stages' runs (default runs/demo-<time>)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every stage's length (e.g. 0.1 for a smoke run)")
    p.add_argument("--full", action="store_true", help="R1's four stages with a generative judge: cold-start SFT, "
                   "GRPO with the rule reward, rejection sampling with a judge (fine-tuned on the rule's verdicts) "
                   "and SFT, GRPO on a mixed set scored by the rule and the judge")
    args = p.parse_args(argv)
    check_flags(args, {"scale": (0, None, True)})  # > 0: a stage's length is scaled by it
    if args.out is not None:
        check_out_path("--out", args.out, folder=True)
    from minigrpo.tools.demo import run_demo  # here: heavy (the loops)

    run_demo(args.out, args.scale, full=args.full)
    return 0


def cmd_bench(argv: list[str]) -> int:
    """`minigrpo bench rollout` (engine vs HF generate), `bench trl` / `bench memory` (minigrpo vs TRL GRPOTrainer),
    `bench step` (a whole step with each rollout backend), `bench overlap` (overlapped rollouts vs synchronous) or
    `bench algo` (every surrogate and advantage estimator)."""
    if argv and argv[0] == "trl":
        return cmd_bench_trl(argv[1:])
    if argv and argv[0] == "memory":
        return cmd_bench_trl(argv[1:], memory=True)
    if argv and argv[0] == "step":
        return cmd_bench_step(argv[1:])
    if argv and argv[0] == "overlap":
        return cmd_bench_overlap(argv[1:])
    if argv and argv[0] == "algo":
        return cmd_bench_algo(argv[1:])
    p = inference_parser("minigrpo bench rollout", "Rollout engine vs transformers generate (and vLLM with --vllm): "
                         "same model, prompts and sampling, interleaved repetitions in one process; median "
                         "tokens/s and the ratios. "
                         "`minigrpo bench trl --help`: minigrpo vs TRL's GRPOTrainer; `minigrpo bench step --help`: "
                         "a whole step with each rollout backend.", backend=False)
    p.add_argument("what", choices=["rollout"], help="what to benchmark (trl, memory and step: see above)")
    p.add_argument("--n", type=int, default=8, help="completions per prompt")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions of each backend (after one warm-up)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 gives steadier numbers)")
    p.add_argument("--vllm", action="store_true", help="vLLM too (colocated; its CUDA or CPU build installed)")
    p.add_argument("--rollout_dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="the weights' precision while generating, for every backend (the config key of that name); "
                   "auto: the model's")
    args = p.parse_args(argv)
    if args.limit is None:
        args.limit = 16
    check_inference(args, {"n": (1,), "reps": (1,), "threads": (1,)})
    check_samples(args, "n", "the benchmark would time copies of one greedy completion")
    import torch  # here: heavy, loaded once the flags are good

    torch.set_num_threads(args.threads)
    cfg, model, tok, examples, prompts = load_for_inference(args)
    cfg = dataclasses.replace(cfg, rollout_dtype=args.rollout_dtype)  # the precision every backend samples in
    from minigrpo.tools.bench import bench_rollout  # here: heavy

    if args.vllm:
        from minigrpo import rollout

        rollout.backend("vllm").start(dataclasses.replace(cfg, rollout_backend="vllm"), model, tok)
    from minigrpo.agent.turns import multi_turn  # here: heavy (transformers), as above

    turns = multi_turn(cfg)  # an environment is reset with each problem's row
    turns = turns.bound([ex.columns for ex in examples], args.n) if turns else None
    report = bench_rollout(model, tok, prompts, args.n, cfg.max_completion_length, args.reps, args.temperature,
                           vllm=args.vllm, turns=turns, weights_dtype=cfg.rollout_cast)
    report["settings"] = {"model": cfg.model, "gguf_file": cfg.gguf_file, "prompts": len(prompts), "n": args.n,
                          "max_new_tokens": cfg.max_completion_length, "threads": args.threads, "reps": args.reps,
                          "vllm": args.vllm, "tools": [str(t) for t in cfg.tools], "max_turns": cfg.max_turns,
                          "rollout_dtype": args.rollout_dtype}
    print(json.dumps(report, indent=2))
    return 0


def step_parser(prog: str, description: str, memory: bool = False, beta: str | None = None) -> argparse.ArgumentParser:
    """The flags `bench trl`, `bench memory` and `bench step` share: the model, data and shape of a GRPO step."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--model", default="tiny-arith", help="hub id, local dir or 'tiny-arith' (default)")
    p.add_argument("--gguf_file", default=None, help="GGUF file name inside --model")
    p.add_argument("--steps", type=int, default=3 if memory else 10, help="training steps per run (the first is "
                   "warm-up)")
    p.add_argument("--reps", type=int, default=1 if memory else 2, help="runs of each variant (framework or "
                   "backend) per beta")
    p.add_argument("--beta", default=beta or ("0" if memory else "0.04,0"), help="KL coefficients, "
                   "comma-separated, each benchmarked (bench step: one)")
    p.add_argument("--num_generations", type=int, default=8, help="G: completions per prompt")
    p.add_argument("--prompts_per_step", type=int, default=4, help="prompts per step (completions = G x this)")
    p.add_argument("--max_completion_length", type=int, default=64, help="max new tokens per completion")
    p.add_argument("--learning_rate", type=float, default=1e-4, help="AdamW learning rate (constant)")
    p.add_argument("--seed", type=int, default=42, help="seed of every run")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads in each run")
    p.add_argument("--data", default="arith", help="dataset of every run (arith, gsm8k, a dir or JSONL); default "
                   "arith")
    p.add_argument("--device", default="cpu", help="cpu or cuda (every run)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and compute dtype")
    p.add_argument("--train_size", type=int, default=2000, help="arith train problems (the prompt pool)")
    p.add_argument("--out", default=None, help="also write the JSON report here")
    return p


def check_step_flags(args: argparse.Namespace) -> tuple[float, ...]:
    """The shared flags checked (ConfigError naming the flag); the betas."""
    # --steps >= 2: each run's first step is warm-up and left out of the medians; flags that mirror a Config key
    # name it (its RANGES entry), --num_generations >= 2 as GRPO needs (Config.validate_grpo)
    check_flags(args, {"steps": (2,), "reps": (1,), "num_generations": (2,), "prompts_per_step": (1,),
                       "max_completion_length": "max_completion_length", "learning_rate": "learning_rate",
                       "seed": "seed", "threads": (1,), "train_size": "arith_train_size"})
    try:
        betas = tuple(float(b) for b in args.beta.split(","))
    except ValueError:
        raise ConfigError(f"--beta: expected comma-separated numbers, got {args.beta!r}") from None
    for beta in betas:
        check_number("--beta", beta, *RANGES["beta"])
    check_device("--device", args.device)
    if args.out is not None:
        check_out_path("--out", args.out)
    return betas


def print_report(report: dict[str, Any], out: str | None) -> None:
    text = json.dumps(report, indent=2)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    print(text)


STEP_BACKENDS = (*BACKENDS, "vllm-adapter")  # what `bench step` times: each rollout backend, and vLLM's adapter push


def cmd_bench_step(argv: list[str]) -> int:
    """`minigrpo bench step`: a whole minigrpo step with each rollout backend, same settings."""
    p = step_parser("minigrpo bench step", "minigrpo's whole GRPO step (generate, score, train) with each rollout "
                    "backend: the same model, data, G, lengths, LoRA r16 on q/k/v/o, lr, steps, seed. Runs "
                    "alternate (engine, hf, ...), each in a fresh process; the first step of each run is dropped. "
                    "Prints JSON: median step and generation time per backend and the step time over the first "
                    "backend's. vllm: LoRA merged into every pushed weight; vllm-adapter: the adapter pushed alone.",
                    beta="0.04")
    p.add_argument("--backends", default="engine,hf", help=f"comma-separated, timed in this order: "
                   f"{', '.join(STEP_BACKENDS)} (vllm-adapter: vllm with vllm_lora_sync adapter; the vllm ones "
                   f"need vLLM installed)")
    args = p.parse_args(argv)
    betas = check_step_flags(args)
    if len(betas) != 1:
        raise ConfigError(f"--beta: bench step takes one KL coefficient, got {args.beta!r}")
    backends = tuple(b.strip() for b in args.backends.split(","))
    unknown = [b for b in backends if b not in STEP_BACKENDS]
    if unknown or len(set(backends)) != len(backends) or not backends:
        raise ConfigError(f"--backends: got {args.backends!r}; expected distinct names among {list(STEP_BACKENDS)}")
    if any(b.startswith("vllm") for b in backends):
        import importlib.util  # here: only --backends with vllm asks

        if importlib.util.find_spec("vllm") is None:
            raise ConfigError("--backends: vllm needs the vllm package (bash scripts/setup_vllm.sh, then run "
                              ".venv-vllm/bin/minigrpo bench step), or leave the vllm backends out")
        from minigrpo.rollout.vllm import check  # here: vLLM is installed, and asked for

        check(Config(rollout_backend="vllm", device=args.device, use_peft=True, lora_r=16))  # before any run
    from minigrpo.tools.bench import bench_step  # here: heavy

    report = bench_step(args.model, args.gguf_file, backends, args.steps, args.num_generations, args.prompts_per_step,
                        args.max_completion_length, betas[0], args.learning_rate, args.seed, args.reps, args.threads,
                        args.train_size, data=args.data, device=args.device, dtype=args.dtype,
                        log=lambda line: print(line, file=sys.stderr))
    print_report(report, args.out)
    return 0


def bench_seeds(text: str, rest: list[str], what: str) -> tuple[int, ...]:
    """The seeds of a `bench` that trains once per seed (--seeds 1,2,3); the keys it sets for each run refused."""
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise ConfigError(f"--seeds: got {text!r}, expected comma-separated integers such as 1,2,3") from None
    for key in ("seed", "output_dir", "resume"):
        if any(a == f"--{key}" or a.startswith(f"--{key}=") for a in rest):
            raise ConfigError(f"--{key}: bench {what} sets it for each run; leave it out")
    return seeds


def cmd_bench_overlap(argv: list[str]) -> int:
    """`minigrpo bench overlap`: overlapped rollouts against the synchronous loop on one config."""
    p = argparse.ArgumentParser(prog="minigrpo bench overlap", allow_abbrev=False, description="Overlapped rollouts "
                                "(max_staleness k) "
                                "against the synchronous loop: `minigrpo train` with the given keys (default: the "
                                "embedded default), once per seed and mode, interleaved, each in a fresh process. "
                                "Prints JSON: median step time, wall time to a held-out figure (evaluations and "
                                "set-up included), the final held-out figure, and overlapped / synchronous ratios. "
                                "Other --key=value flags are `minigrpo train` keys.")
    p.add_argument("--max_staleness", type=int, default=1, help="k of the overlapped runs")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds; each runs both modes")
    p.add_argument("--target", type=float, default=None, help="held-out figure to reach (default: the lowest "
                   "final one of the synchronous runs)")
    p.add_argument("--out", default=None, help="also write the JSON report here")
    args, rest = p.parse_known_args(argv)
    check_flags(args, {"max_staleness": (1,)})
    seeds = bench_seeds(args.seeds, rest, "overlap")
    cfg = config_from_argv(rest)
    cfg.validate_grpo()
    config = {k: v for k, v in cfg.to_dict().items() if k not in ("seed", "output_dir", "max_staleness")}
    from minigrpo.tools.bench import bench_overlap  # here: heavy

    report = bench_overlap(config, args.max_staleness, seeds, args.target,
                           log=lambda line: print(line, file=sys.stderr))
    print_report(report, args.out)
    return 0


def cmd_bench_algo(argv: list[str]) -> int:
    """`minigrpo bench algo`: every surrogate, option and advantage estimator of algo.py on one config."""
    from minigrpo.tools.bench import ALGO_VARIANTS  # here: heavy

    p = argparse.ArgumentParser(prog="minigrpo bench algo", allow_abbrev=False, description="Each loss_mode, "
                                "option and adv_estimator (minigrpo/tools/bench.py ALGO_VARIANTS) over one base "
                                "config (default: the embedded default with num_iterations 2, so the ratio leaves "
                                "1), once per seed, each run in a fresh process, interleaved. Prints JSON: held-out "
                                "figure after the run per seed, wall time (and its ratio to the first variant), "
                                "median step time. Other --key=value flags are `minigrpo train` keys of the base.")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds; each runs every variant")
    p.add_argument("--only", default=None, help="comma-separated variant names (default: all): "
                   + "; ".join(ALGO_VARIANTS))
    p.add_argument("--out", default=None, help="also write the JSON report here")
    args, rest = p.parse_known_args(argv)
    seeds = bench_seeds(args.seeds, rest, "algo")
    variants = ALGO_VARIANTS
    if args.only:
        names = [n.strip() for n in args.only.split(",")]
        unknown = [n for n in names if n not in ALGO_VARIANTS]
        if unknown:
            raise ConfigError(f"--only: unknown variants {unknown}; choose from {list(ALGO_VARIANTS)}")
        variants = {n: ALGO_VARIANTS[n] for n in names}
    if not any(a == "--num_iterations" or a.startswith("--num_iterations=") for a in rest):
        rest = [*rest, "--num_iterations=2"]
    cfg = config_from_argv(rest)
    base = {k: v for k, v in cfg.to_dict().items() if k not in ("seed", "output_dir")}
    for keys in variants.values():  # every variant valid before the first run
        Config(**(base | keys)).validate_grpo()
    from minigrpo.tools.bench import bench_algo  # here: heavy

    report = bench_algo(base, variants, seeds, log=lambda line: print(line, file=sys.stderr))
    print_report(report, args.out)
    return 0


def cmd_bench_trl(argv: list[str], memory: bool = False) -> int:
    """`minigrpo bench trl` (step time) or `bench memory` (peak memory): minigrpo vs TRL, same settings."""
    what = ("Peak memory (RSS on CPU, allocated on GPU) of " if memory else "") + "minigrpo vs TRL's GRPOTrainer"
    p = step_parser(f"minigrpo bench {'memory' if memory else 'trl'}", f"{what} with the same "
                    "model, data, G, completions per step, lengths, LoRA r16 on q/k/v/o, lr, steps, seed, "
                    "fp32, no gradient checkpointing. Runs alternate (trl, minigrpo, ...), each in a fresh "
                    "process (its own peak RSS); the first step of each run is dropped. Prints JSON: "
                    "median step time, tokens/s, peak RSS and the ratios minigrpo/TRL per beta. "
                    "Needs the `bench` extra (pip install -e '.[bench]').", memory)
    p.add_argument("--vllm", default="off", choices=["off", "on", "both"],
                   help="generation: each framework's own (off), each one's colocated vLLM (on, CUDA), or both")
    p.add_argument("--workload", default="default", help="comma-separated shapes of a step, each run for every beta: "
                   "default (the flags as given), small (G 4 x 2 prompts), random-qwen2 (a random tiny Qwen2, G 4 x "
                   "2 prompts: every completion runs to the length limit); default: default")
    args = p.parse_args(argv)
    betas = check_step_flags(args)
    from minigrpo.tools.bench import WORKLOADS  # here: heavy (torch)

    workloads = tuple(w for w in args.workload.split(",") if w)
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown or not workloads:
        raise ConfigError(f"--workload: unknown {unknown or args.workload!r}; choose among {', '.join(WORKLOADS)}")
    try:
        import trl  # noqa: F401
    except ImportError:
        print("minigrpo bench trl: TRL is not installed; pip install -e '.[bench]'", file=sys.stderr)
        return 2
    from minigrpo.tools.bench import bench_trl  # here: heavy

    report = bench_trl(args.model, args.gguf_file, args.steps, args.num_generations, args.prompts_per_step,
                       args.max_completion_length, betas,
                       args.learning_rate, args.seed, args.reps, args.threads, args.train_size,
                       data=args.data, device=args.device, dtype=args.dtype,
                       vllm={"off": (False,), "on": (True,), "both": (False, True)}[args.vllm],
                       log=lambda line: print(line, file=sys.stderr), workloads=workloads)
    if memory:  # the memory figures first, then the whole report
        report = {"memory": {name: {"trl_peak_rss_mb": r["trl"]["peak_rss_mb"],
                                    "minigrpo_peak_rss_mb": r["minigrpo"]["peak_rss_mb"],
                                    "ratio_rss": r["ratio_minigrpo_over_trl"]["peak_rss"],
                                    "trl_peak_gpu_gb": r["trl"]["peak_gpu_gb"],
                                    "minigrpo_peak_gpu_gb": r["minigrpo"]["peak_gpu_gb"]}
                             for name, r in report["results"].items()}} | report
    print_report(report, args.out)
    return 0


def cmd_export(argv: list[str]) -> int:
    """`minigrpo export RUN_DIR --out DIR [--merge] [--checkpoint N] [--base NAME] [--push_to_hub REPO_ID]`."""
    p = argparse.ArgumentParser(prog="minigrpo export", description="Export a run's trained policy: the LoRA adapter "
                                "(for peft.AutoPeftModelForCausalLM.from_pretrained(DIR)) or, with --merge, one "
                                "standalone model (safetensors, config, generation config, tokenizer and chat "
                                "template) for transformers and vLLM, with a README.md model card; optionally upload "
                                "it to the Hugging Face Hub. Full fine-tunes are always standalone.")
    p.add_argument("run_dir", help="a minigrpo run folder (holds config.yaml and adapter/ or model/)")
    p.add_argument("--out", required=True, help="new folder to write")
    p.add_argument("--merge", action="store_true", help="merge the LoRA adapter into the base weights")
    p.add_argument("--checkpoint", type=int, default=None, help="export checkpoint-N instead of the final policy")
    p.add_argument("--base", default=None, help="the base the adapter names (adapter_config.json, model card): a hub "
                   "id or a model folder; default the run's own (a hub id as is, a folder by absolute path; a GGUF "
                   "or seeded base is written to --base_out). A GGUF run was trained on the dequantized weights: "
                   "the model the GGUF was made from gives slightly different outputs")
    p.add_argument("--base_out", default=None, help="where a base no name loads (GGUF, seeded) is written as a plain "
                   "model (default OUT/base)")
    p.add_argument("--push_to_hub", default=None, metavar="REPO_ID", help="upload OUT to this Hub model repo (made "
                   "if missing; token from HF_TOKEN or `hf auth login`); an adapter needs a hub base (--base)")
    p.add_argument("--private", action="store_true", help="with --push_to_hub: make the repo private")
    p.add_argument("--commit_message", default=None, help="with --push_to_hub: the commit message")
    args = p.parse_args(argv)
    if (args.private or args.commit_message) and not args.push_to_hub:
        raise ConfigError("--private / --commit_message: only with --push_to_hub REPO_ID")
    from minigrpo.tools.export import export  # here: heavy

    out = export(args.run_dir, args.out, args.merge, args.checkpoint, base=args.base, push_to_hub=args.push_to_hub,
                 private=args.private, base_out=args.base_out, commit_message=args.commit_message)
    print(f"exported to {out}")
    if (out / "adapter_config.json").is_file():
        print(f"base model: {json.loads((out / 'adapter_config.json').read_text())['base_model_name_or_path']}")
    if args.push_to_hub:
        print(f"pushed to the Hub: {args.push_to_hub}")
    return 0


def cmd_plan(argv: list[str]) -> int:
    """`minigrpo plan [--config FILE] [--key=value ...] [--gpu_gb N]`: estimated peak memory by part."""
    if "-h" in argv or "--help" in argv:
        print("usage: minigrpo plan [--config FILE.yaml] [--key=value ...] [--gpu_gb N | --cpu_gb N]\n\n"
              "Estimate the peak memory of `minigrpo train` with the same config, by part (weights, adapters, "
              "gradients,\noptimizer states, reference, generation KV cache, evaluation, activations, logits "
              "chunk, runtime),\nwithout loading the weights, in GiB. With --gpu_gb (a CUDA GPU of that size) or "
              "--cpu_gb (RAM), say whether\nthe run fits and which options would make it fit. Exit status 0 if it fits "
              "(or no size is given), 1 if not.")
        return 0
    limit, device, rest, given = None, "cpu", [], None
    it = iter(argv)
    for arg in it:
        key, _, value = arg.partition("=")
        if key in ("--gpu_gb", "--cpu_gb"):
            value = value or next(it, "")
            try:
                limit = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number of GB, got {value!r}") from None
            check_number(key, limit, 0, None, True)
            if given not in (None, key):
                raise ConfigError(f"{key}: with {given}; give one memory size, --gpu_gb or --cpu_gb")
            device, given = "cuda" if key == "--gpu_gb" else "cpu", key
        else:
            rest.append(arg)
    cfg = config_from_argv(rest)
    if limit is None and cfg.device.startswith("cuda"):
        device = "cuda"
    from minigrpo.tools.plan import plan, report  # here: heavy (transformers)

    result = plan(cfg, device, limit)
    print(report(cfg, result, device))
    return 0 if result.fits in (None, True) else 1


COMMANDS = {"train": cmd_train, "sft": cmd_sft, "eval": cmd_eval, "sample": cmd_sample, "plot": cmd_plot,
            "demo": cmd_demo, "bench": cmd_bench,
            "plan": cmd_plan, "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `minigrpo` command."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: minigrpo {train,sft,eval,sample,plot,demo,bench,plan,export} [options]   (COMMAND --help for "
              "each)\n"
              "  train   GRPO training from a YAML config and --key=value overrides\n"
              "  sft     supervised fine-tuning on worked solutions (same config keys)\n"
              "  eval    accuracy (greedy), pass@k and maj@k of a model or adapter\n"
              "  sample  rejection sampling into an SFT JSONL\n"
              "  plot    a run's training curves as a PNG\n"
              "  demo    the R1 recipe in miniature (SFT, GRPO, rejection sampling, SFT) with a table\n"
              "  bench   rollout: the rollout engine vs transformers generate; trl: a step vs TRL; step: each\n"
              "          backend; overlap: overlapped rollouts (max_staleness) vs the synchronous loop;\n"
              "          algo: every surrogate and advantage estimator on one task\n"
              "  plan    estimated peak memory by part, and what would make a run fit\n"
              "  export  a run's adapter, or the merged model, for peft / transformers / vLLM")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    quiet_libraries()
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (ConfigError, DataError) as e:  # DataNotFound (a FileNotFoundError) is a DataError
        kind = "config" if isinstance(e, ConfigError) else "data"
        print(f"minigrpo {argv[0]}: {kind} error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"minigrpo {argv[0]}: stopped: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:  # a second Ctrl-C (or SIGTERM): stopped at once, outside a step's end
        print(f"minigrpo {argv[0]}: stopped at once; a run folder keeps its last complete checkpoint (resume it "
              f"with --resume RUN_DIR)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
