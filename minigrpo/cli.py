"""`minigrpo train|eval`: the command line. Config errors exit with code 2 and name the key."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from minigrpo.config import Config, ConfigError, help_text, load_config, parse_overrides

TRAIN_USAGE = """usage: minigrpo train [--config FILE.yaml] [--key=value ...]

Train with GRPO. Settings come from the defaults, then the YAML file, then --key=value overrides
(lists are comma-separated: --reward_funcs=correctness,format_strict). The resolved config is saved
in the run folder as config.yaml. Keys:
"""


def cmd_train(argv: list[str]) -> int:
    """Parse `train` options, build the config and run the loop."""
    if "-h" in argv or "--help" in argv:
        print(TRAIN_USAGE + help_text())
        return 0
    config_path = None
    rest = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            config_path, rest = argv[i + 1], argv[:i] + argv[i + 2:]
            break
        if arg.startswith("--config="):
            config_path, rest = arg.split("=", 1)[1], argv[:i] + argv[i + 1:]
            break
    cfg = load_config(config_path, parse_overrides(rest))
    from minigrpo.train import train  # heavy imports only once the config is known to be valid

    train(cfg)
    return 0


def eval_parser() -> argparse.ArgumentParser:
    """Options of `minigrpo eval`."""
    p = argparse.ArgumentParser(prog="minigrpo eval", description="Evaluate a model (and adapter) on a math "
                                "dataset: greedy accuracy, format compliance, mean length; pass@k and maj@k "
                                "with --k. Scores with the same answer extractor as the training reward.")
    p.add_argument("--model", help="hub id, local dir or 'tiny-random'; default: the model of the adapter's run")
    p.add_argument("--gguf_file", help="GGUF file name inside --model (a dir or hub id)")
    p.add_argument("--adapter", help="a LoRA adapter dir saved by `minigrpo train` (RUN_DIR/adapter)")
    p.add_argument("--data", default="gsm8k", help="'gsm8k' / hub id, a dir with {split}.jsonl, or a .jsonl file")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N problems (default: all)")
    p.add_argument("--prompt_field", default="question", help="JSONL field with the problem")
    p.add_argument("--answer_field", default="answer", help="JSONL field with the gold answer")
    p.add_argument("--template", choices=["chat", "r1", "fewshot"], default=None,
                   help="prompt template (default: the run's, else chat)")
    p.add_argument("--max_new_tokens", type=int, default=None, help="default: the run's max_completion_length")
    p.add_argument("--batch_size", type=int, default=32, help="prompts per generate call")
    p.add_argument("--k", type=int, default=0, help="also sample k completions per problem for pass@k and maj@k")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for --k")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--out", default=None, help="JSON report path (default: eval_<split>.json beside the "
                   "adapter, else in the current folder)")
    return p


def cmd_eval(argv: list[str]) -> int:
    """Load the model (+ adapter), evaluate, print a summary and write the JSON report."""
    args = eval_parser().parse_args(argv)
    # A run's config tells which base the adapter belongs to (and how its prompts looked).
    run_cfg = Path(args.adapter).parent / "config.yaml" if args.adapter else None
    base = yaml.safe_load(run_cfg.read_text()) if run_cfg and run_cfg.exists() else {}
    keys = {"model", "gguf_file", "seed", "template", "system_prompt", "num_fewshot", "max_completion_length",
            "dtype"}
    values = {k: v for k, v in base.items() if k in keys}
    for key in ("model", "gguf_file", "template"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if "model" not in values:
        raise ConfigError("--model: give a model (hub id, dir, tiny-random) or an --adapter from a minigrpo run")
    if args.max_new_tokens is not None:
        values["max_completion_length"] = args.max_new_tokens
    cfg = Config(**values, use_peft=False, device=args.device, dataset=args.data,
                 prompt_field=args.prompt_field, answer_field=args.answer_field)

    from minigrpo.data import build_prompt, load_examples
    from minigrpo.evaluate import evaluate
    from minigrpo.model import load_model
    from minigrpo.monitor import print0

    model, tok = load_model(cfg)
    if args.adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, args.adapter)
    examples = load_examples(args.data, args.split, args.prompt_field, args.answer_field, args.limit)
    fewshot = load_examples(args.data, "train", args.prompt_field, args.answer_field, cfg.num_fewshot) \
        if cfg.template == "fewshot" else None
    prompts = [build_prompt(tok, ex.question, cfg.template, cfg.system_prompt, fewshot) for ex in examples]
    report = evaluate(model, tok, prompts, [ex.columns["answer"] for ex in examples],
                      max_new_tokens=cfg.max_completion_length, batch_size=args.batch_size, k=args.k,
                      temperature=args.temperature, keep_records=True)
    report["settings"] = {"model": cfg.model, "gguf_file": cfg.gguf_file, "adapter": args.adapter,
                          "data": args.data, "split": args.split, "template": cfg.template,
                          "max_new_tokens": cfg.max_completion_length, "decoding": "greedy", "k": args.k,
                          "extraction": "last '#### N', then \\boxed{}; numeric equality, math-verify fallback"}
    out = Path(args.out) if args.out else (Path(args.adapter).parent if args.adapter else Path(".")) / \
        f"eval_{args.split}.json"
    out.write_text(json.dumps(report, indent=2))
    summary = {k: v for k, v in report.items() if k not in ("records", "settings")}
    print0("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    print0(f"report: {out}")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `minigrpo` command."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: minigrpo {train,eval} [options]   (minigrpo COMMAND --help for each)\n"
              "  train  GRPO training from a YAML config and --key=value overrides\n"
              "  eval   accuracy (greedy), pass@k and maj@k of a model or adapter")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except ConfigError as e:
        print(f"minigrpo {argv[0]}: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
