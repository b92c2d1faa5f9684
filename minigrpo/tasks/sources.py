"""Where examples come from: the built-in arith task, JSONL files and folders, the Hugging Face hub.

A dataset is a list of `Example`s. Each carries the question, the gold answer as written in the data,
and every column of the row; the columns are passed to reward functions as keyword arguments (TRL's
convention), with `columns["answer"]` holding the normalised gold final answer that rewards compare to.

Three sources, picked from the `dataset` string by `load_examples`:
- a `.jsonl` file (the split is ignored);
- a directory holding `{split}.jsonl` (e.g. a local GSM8K copy with train.jsonl and test.jsonl);
- anything else is a Hugging Face hub id (`gsm8k` is an alias of `openai/gsm8k`, config "main").

Plus the built-in synthetic task (`dataset: arith`, `minigrpo.tasks.arith`). Every source goes through
`_to_example`, so `columns["answer"]` is always `answers.gold_answer` of the row's answer field.
"""

import itertools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minigrpo.errors import DataError, DataNotFound
from minigrpo.tasks.answers import gold_answer
from minigrpo.tasks.arith import arith_rows

# Short names for hub datasets, and the config each needs (GSM8K has "main" and "socratic").
HUB_ALIASES = {"gsm8k": "openai/gsm8k"}
HUB_CONFIGS = {"openai/gsm8k": "main"}

_CALCULATOR_RE = re.compile(r"<<.*?>>")


@dataclass
class Example:
    """One problem: the question, the gold answer as written, and all columns of its row."""

    question: str  # the problem text
    answer: str  # the gold answer as written in the data (GSM8K: the full solution ending in "#### N")
    columns: dict[str, Any]  # every field of the row, passed to rewards; "answer" is the gold final answer


def strip_calculator(text: str) -> str:
    """Remove GSM8K calculator annotations: "48/2 = <<48/2=24>>24" becomes "48/2 = 24"."""
    return _CALCULATOR_RE.sub("", text)


def _to_example(row: dict[str, Any], where: str, prompt_field: str, answer_field: str) -> Example:
    """Turn one data row into an Example; `where` names the row's origin for error messages."""
    missing = [key for key in (prompt_field, answer_field) if key not in row]
    if missing:
        raise DataError(
            f"{where}: missing key {', '.join(map(repr, missing))}; the row has keys {sorted(row)}. "
            "Pass prompt_field= / answer_field= to name the question and answer columns."
        )
    question, answer = str(row[prompt_field]), str(row[answer_field])
    # Rewards receive the columns as keyword arguments; "answer" must be the comparable final answer,
    # so the full worked solution moves to "solution".
    columns = dict(row)
    columns["question"] = question
    columns["solution"] = answer
    columns["answer"] = gold_answer(answer)
    return Example(question=question, answer=answer, columns=columns)


def _read_jsonl(path: Path, prompt_field: str, answer_field: str, limit: int | None,
                skip_bad: bool = False) -> list[Example]:
    """Read a JSONL file by hand so a bad line is reported with its file and line number (or, with
    `skip_bad`, skipped and counted)."""
    examples: list[Example] = []
    skipped: list[str] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():
                continue  # blank lines (often a trailing newline) are not rows
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                problem = DataError(
                    f"{path}, line {lineno}: not valid JSON ({e.msg}). "
                    "Each line must be one JSON object; fix or delete that line (or set skip_bad_rows: true)."
                )
                if not skip_bad:
                    raise problem from None
                skipped.append(str(problem))
                continue
            if not isinstance(row, dict):
                # ValueError, not TypeError: like the other messages here, it reports bad data.
                problem = DataError(
                    f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}. "
                    'Each line must look like {"question": ..., "answer": ...}.'
                )
                if not skip_bad:
                    raise problem
                skipped.append(str(problem))
                continue
            try:
                examples.append(_to_example(row, f"{path}, line {lineno}", prompt_field, answer_field))
            except DataError as problem:
                if not skip_bad:
                    raise
                skipped.append(str(problem))
    if skipped:
        print(f"{path}: skipped {len(skipped)} bad row(s) (skip_bad_rows); the first: {skipped[0]}", flush=True)
    if not examples:
        raise DataError(f"{path}: the dataset is empty (no usable JSON rows found).")
    return examples


def _load_hub(
    name: str, split: str, prompt_field: str, answer_field: str, limit: int | None
) -> list[Example]:
    """Load a split from the Hugging Face hub (or its local cache) with `datasets.load_dataset`."""
    import datasets  # imported here: it is slow to import and only the hub path needs it

    hub_id = HUB_ALIASES.get(name, name)
    config = HUB_CONFIGS.get(hub_id)
    rows: Iterable[dict[str, Any]] = datasets.load_dataset(hub_id, config, split=split)
    examples = [
        _to_example(dict(row), f"{hub_id} [{split}], row {i}", prompt_field, answer_field)
        for i, row in enumerate(itertools.islice(rows, limit))
    ]
    if not examples:
        raise DataError(f"{hub_id} [{split}]: the dataset is empty.")
    return examples


def load_examples(
    dataset: str,
    split: str,
    prompt_field: str = "question",
    answer_field: str = "answer",
    limit: int | None = None,
    skip_bad_rows: bool = False,
) -> list[Example]:
    """Load a dataset as a list of Examples, keeping the first `limit` rows if given.

    `dataset` is a `.jsonl` file (split ignored), a directory containing `{split}.jsonl`, or a hub id
    (`gsm8k` means `openai/gsm8k` with config "main"). `prompt_field` and `answer_field` name the
    question and answer columns.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of rows or None, got {limit}.")
    path = Path(dataset).expanduser()
    if path.is_dir():
        file = path / f"{split}.jsonl"
        if not file.is_file():
            found = sorted(p.name for p in path.glob("*.jsonl"))
            raise DataNotFound(f"{file} does not exist; {path} holds {found or 'no .jsonl files'}.")
        return _read_jsonl(file, prompt_field, answer_field, limit, skip_bad_rows)
    # A name that looks like a path must not fall through to the hub, where it would fail with a
    # confusing network or "dataset not found" error.
    if dataset.endswith(".jsonl") or dataset.startswith((".", "/", "~")):
        if not path.is_file():
            raise DataNotFound(f"{dataset}: no such .jsonl file or directory.")
        return _read_jsonl(path, prompt_field, answer_field, limit, skip_bad_rows)
    return _load_hub(dataset, split, prompt_field, answer_field, limit)


def sft_target(example: Example) -> str:
    """Return the gold solution as a completion: no calculator annotations, ending with `#### N`.

    The final line is rewritten to the normalised gold answer, so the SFT target has exactly the format
    the reward's extractor expects. A bare answer with no worked solution becomes just `#### N`.
    """
    gold = gold_answer(example.answer)
    lines = strip_calculator(example.answer).strip().splitlines()
    body = "\n".join(line for line in lines if not line.lstrip().startswith("####")).strip()
    if not body or body == gold:
        return f"#### {gold}"
    return f"{body}\n#### {gold}"


def load_split(cfg: Any, split: str, limit: int | None = None, dataset: str | None = None) -> list[Example]:
    """The examples of one split for a run config (`dataset` overrides cfg.dataset): arith, or `load_examples`."""
    dataset = dataset or cfg.dataset
    if dataset == "arith":
        size = cfg.arith_train_size if split == "train" else (limit or 1000)
        rows = arith_rows(split, min(size, limit or size), cfg.arith_steps, cfg.arith_max_number,
                          direct_fraction=cfg.arith_direct_fraction)
        return [_to_example(row, f"arith [{split}], row {i}", "question", "answer") for i, row in enumerate(rows)]
    return load_examples(dataset, split, cfg.prompt_field, cfg.answer_field, limit,
                         getattr(cfg, "skip_bad_rows", False))
