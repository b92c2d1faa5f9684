"""Where examples come from: the built-in arith task, JSONL files and folders, the Hugging Face hub.

A dataset is a list of `Example`s. Each carries the prompt (a text, or TRL's conversational form: a list of
`{"role", "content"}` messages), the gold answer as written in the data when there is one, and every column of
the row; the columns are passed to reward functions as keyword arguments (TRL's convention), with
`columns["answer"]` holding the normalised gold final answer that rewards compare to.

The prompt column is TRL's `prompt` (standard text or conversational), else `question` (GSM8K's), unless
`prompt_field` names another. The answer column (`answer_field`) is optional: rows without one train with
rewards that need no gold answer; a task that needs one says so at start (`require_columns`, which also refuses
gold answers no model answer can match: null, booleans, lists, empty or unreadable text).

Sources, picked from the `dataset` string by `load_examples`, or rows handed over from Python (`rows_to_examples`:
a `datasets.Dataset`, an `IterableDataset` or a list of dicts):
- a `.jsonl` file (the split is ignored; UTF-8, a leading byte-order mark allowed);
- a directory holding `{split}.jsonl` (e.g. a local GSM8K copy with train.jsonl and test.jsonl);
- anything else is a Hugging Face hub id (`gsm8k` is an alias of `openai/gsm8k`, config "main").

Plus the built-in synthetic task (`dataset: arith`, `minigrpo.tasks.arith`) and reasoning-gym's procedural tasks
(`dataset: reasoning_gym:TASK`, `minigrpo.tasks.reasoning_gym`). Every source goes through
`_to_example`, so `columns["answer"]` is always `answers.gold_answer` of the row's answer field.
"""

import itertools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minigrpo.errors import ConfigError, DataError, DataNotFound
from minigrpo.tasks import code, reasoning_gym
from minigrpo.tasks.answers import gold_answer, gold_problem, normalize_number, readable_gold
from minigrpo.tasks.arith import arith_rows

# Short names for hub datasets, and the config each needs (GSM8K has "main" and "socratic").
HUB_ALIASES = {"gsm8k": "openai/gsm8k"}
HUB_CONFIGS = {"openai/gsm8k": "main"}
SPLITS = {"arith": ("train", "test"), "openai/gsm8k": ("train", "test")}  # known without the hub
READ_CHECKS = 256  # distinct non-numeric gold answers math-verify reads at start (~15 ms each)

_CALCULATOR_RE = re.compile(r"<<.*?>>")


@dataclass
class Example:
    """One problem: the question, the gold answer as written, and all columns of its row."""

    question: str  # the problem text (conversational prompts: the last user message's)
    answer: str | None  # the gold answer as written in the data (GSM8K: the full solution ending in "#### N")
    columns: dict[str, Any]  # every field of the row, passed to rewards; "answer" is the gold final answer
    messages: list[dict[str, str]] | None = None  # a conversational prompt, rendered by the chat template
    where: str = ""  # where the row came from ("FILE, line N"), for messages about it
    field: str = "question"  # the column the prompt came from ('prompt': TRL's formats, template auto -> raw)
    gold_problem: str | None = None  # why the gold answer cannot be compared, checked when needed (check_answers)

    @property
    def prompt(self) -> str | list[dict[str, str]]:
        """The prompt as the data gave it: TRL passes this to rewards as `prompts`."""
        return self.messages if self.messages is not None else self.question


def strip_calculator(text: str) -> str:
    """Remove GSM8K calculator annotations: "48/2 = <<48/2=24>>24" becomes "48/2 = 24"."""
    return _CALCULATOR_RE.sub("", text)


PROMPT_FIELDS = ("prompt", "question")  # looked for in this order when prompt_field is not set


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    """A conversational prompt checked: a non-empty list of {"role": str, "content": str}."""
    ok = bool(value) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                             and isinstance(m.get("content"), str) for m in value)
    if not ok:
        raise DataError(f"{where}: a conversational prompt must be a non-empty list of "
                        f'{{"role": ..., "content": ...}} messages with string values, got {str(value)[:200]}')
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _to_example(row: dict[str, Any], where: str, prompt_field: str | None, answer_field: str) -> Example:
    """Turn one data row into an Example; `where` names the row's origin for error messages."""
    field = prompt_field or next((f for f in PROMPT_FIELDS if f in row), None)
    if field is None or field not in row:
        wanted = repr(prompt_field) if prompt_field else " or ".join(map(repr, PROMPT_FIELDS))
        raise DataError(
            f"{where}: missing key {wanted}; the row has keys {sorted(row)}. "
            "Pass prompt_field= / answer_field= to name the question and answer columns."
        )
    value, messages = row[field], None
    if isinstance(value, (list, tuple)):  # TRL's conversational format
        messages = _messages(value, where)
        asked = next((m for m in reversed(messages) if m["role"] == "user"), messages[-1])
        question = asked["content"]
        if not question.strip():
            raise DataError(f"{where}: {field!r} asks nothing: its last {asked['role']} message is empty; remove the "
                            f"row or fill it in")
    elif isinstance(value, str):
        question = value
    else:
        raise DataError(f"{where}: {field!r} must be a text or a list of messages, got {type(value).__name__}")
    if not question.strip():
        raise DataError(f"{where}: {field!r} is empty; remove the row or fill it in")
    # Rewards receive the columns as keyword arguments; "answer" must be the comparable final answer,
    # so the full worked solution moves to "solution".
    columns = {k: v for k, v in row.items() if not (k == answer_field and v is None)}  # None: no gold answer
    columns["question"] = question
    answer = None
    problem = gold_problem(row[answer_field]) if answer_field in row else None
    if answer_field in row and row[answer_field] is not None:
        answer = str(row[answer_field])
        columns["solution"] = answer
        columns["answer"] = gold_answer(answer)
    return Example(question=question, answer=answer, columns=columns, messages=messages, where=where, field=field,
                   gold_problem=problem and f"its gold answer {answer_field!r} {problem}")


def rows_to_examples(rows: Iterable[dict[str, Any]], where: str, prompt_field: str | None = None,
                     answer_field: str = "answer", limit: int | None = None) -> list[Example]:
    """Examples from rows handed over in Python: a `datasets.Dataset`, an `IterableDataset` (the first `limit`
    rows: a stream may not end) or a list of dicts."""
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Iterable):
        raise DataError(f"{where}: expected a datasets.Dataset, an IterableDataset or a list of dicts, got "
                        f"{type(rows).__name__}")
    examples = []
    for i, row in enumerate(itertools.islice(rows, limit)):
        if not isinstance(row, dict):
            raise DataError(f"{where}, row {i}: expected a dict of columns, got {type(row).__name__}")
        examples.append(_to_example(dict(row), f"{where}, row {i}", prompt_field, answer_field))
    if not examples:
        raise DataError(f"{where}: the dataset is empty.")
    return examples


def require_columns(examples: list[Example], columns: list[str], where: str, why: str) -> None:
    """Every example has each of `columns`: else a DataError naming the first row without one, and `why`. A
    required gold `answer` must also be comparable (`check_answers`)."""
    for i, ex in enumerate(examples):
        missing = [c for c in columns if c not in ex.columns]
        if "answer" in missing and ex.gold_problem:  # the column is there, but null
            raise DataError(_gold_message(ex.where or f"{where}, row {i}", ex.gold_problem, why))
        if missing:
            raise DataError(f"{ex.where or f'{where}, row {i}'}: no {missing[0]!r} column ({why}); the row has "
                            f"keys {sorted(k for k in ex.columns if k != 'question')}. Pass prompt_field= / "
                            f"answer_field= to name the question and answer columns, or choose rewards and "
                            f"an eval_metric that need no gold answer")
    if "answer" in columns:
        check_answers(examples, where, why)


def _gold_message(where: str, problem: str, why: str) -> str:
    return (f"{where}: {problem}, so no model answer can match it; this run needs one ({why}). Give a number, a "
            f"'#### N' solution or math such as \\frac{{1}}{{2}}: fix or remove the row, or choose rewards and an "
            f"eval_metric that need no gold answer")


def check_answers(examples: list[Example], where: str, why: str) -> None:
    """Every example's gold answer can be compared to a model's: else a DataError naming the first row whose gold is
    null, a boolean, a list or object, empty, or text in which math-verify reads nothing (the first READ_CHECKS
    distinct non-numeric golds are read: math-verify is slow). `why` says what needs the answers."""
    unread: dict[str, str] = {}  # distinct non-numeric gold -> where it first occurs
    for i, ex in enumerate(examples):
        here = ex.where or f"{where}, row {i}"
        gold = ex.columns.get("answer")
        problem = ex.gold_problem or gold_problem(gold)
        if problem:
            problem = problem if ex.gold_problem else f"its gold answer 'answer' {problem}"
            raise DataError(_gold_message(here, problem, why))
        text = gold_answer(gold)
        if normalize_number(text) is None and len(unread) < READ_CHECKS:
            unread.setdefault(text, here)
    for text, here in unread.items():
        if not readable_gold(text):
            shown = text if len(text) <= 60 else text[:57] + "..."
            raise DataError(_gold_message(here, f"its gold answer {shown!r} holds no number or math that math-verify "
                                                f"reads", why))


def _read_jsonl(path: Path, prompt_field: str | None, answer_field: str, limit: int | None,
                skip_bad: bool = False) -> list[Example]:
    """Read a JSONL file by hand so a bad line is reported with its file and line number (or, with
    `skip_bad`, skipped and counted)."""
    examples: list[Example] = []
    skipped: list[str] = []
    # utf-8-sig drops a byte-order mark at the start of the file only; surrogateescape keeps invalid bytes as
    # U+DC80..U+DCFF, found per line below, so the message can name the line.
    with path.open(encoding="utf-8-sig", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():
                continue  # blank lines (often a trailing newline) are not rows
            bad = next((i for i, c in enumerate(line) if "\udc80" <= c <= "\udcff"), None)
            if bad is not None:
                problem = DataError(
                    f"{path}, line {lineno}: not valid UTF-8 (byte 0x{ord(line[bad]) - 0xDC00:02x} at character "
                    f"{bad + 1}). Save the file as UTF-8, or fix or delete that line (or set skip_bad_rows: true)."
                )
                if not skip_bad:
                    raise problem
                skipped.append(str(problem))
                continue
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


def _unknown_split(key: str, split: str, dataset: str, splits: Iterable[str]) -> ConfigError:
    return ConfigError(f"{key}: {split!r} is not a split of {dataset}; its splits are "
                       f"{', '.join(map(repr, splits))}")


def _load_hub(
    name: str, split: str, prompt_field: str | None, answer_field: str, limit: int | None, key: str = "split"
) -> list[Example]:
    """Load a split from the Hugging Face hub (or its local cache) with `datasets.load_dataset`; `key` names the
    config key that chose the split, for the message when it does not exist."""
    hub_id = HUB_ALIASES.get(name, name)
    if hub_id in SPLITS and split not in SPLITS[hub_id]:
        raise _unknown_split(key, split, hub_id, SPLITS[hub_id])
    import datasets  # imported here: it is slow to import and only the hub path needs it

    config = HUB_CONFIGS.get(hub_id)
    local = "give a local .jsonl file or a folder of {split}.jsonl files as the dataset"
    try:
        rows: Iterable[dict[str, Any]] = datasets.load_dataset(hub_id, config, split=split)
    except ConnectionError as e:  # datasets' error for an unreachable hub (offline mode included)
        raise DataError(f"the dataset {name!r} could not be loaded: the Hugging Face hub could not be reached and "
                        f"it is not in the local cache ({e}). Without the network, {local}; or, on a machine that "
                        f"has it in its Hugging Face cache, set HF_DATASETS_OFFLINE=1") from None
    except FileNotFoundError as e:  # datasets.exceptions.DatasetNotFoundError, missing data files
        raise DataError(f"the dataset {name!r} is not a local path and could not be loaded from the Hugging Face "
                        f"hub ({e}); check the name, or {local}") from None
    except ValueError as e:
        if not str(e).startswith("Unknown split"):
            raise
        raise ConfigError(f"{key}: {split!r} is not a split of {hub_id}: {e}") from None
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
    prompt_field: str | None = None,
    answer_field: str = "answer",
    limit: int | None = None,
    skip_bad_rows: bool = False,
    key: str = "split",
) -> list[Example]:
    """Load a dataset as a list of Examples, keeping the first `limit` rows if given.

    `dataset` is a `.jsonl` file (split ignored), a directory containing `{split}.jsonl`, or a hub id
    (`gsm8k` means `openai/gsm8k` with config "main"). `prompt_field` and `answer_field` name the
    question and answer columns (prompt_field None: `prompt`, else `question`). `key` names the config key that
    chose the split (`train_split`, `eval_split`), for the message when that split does not exist.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of rows or None, got {limit}.")
    path = Path(dataset).expanduser()
    if path.is_dir():
        file = path / f"{split}.jsonl"
        if not file.is_file():
            found = sorted(p.name for p in path.glob("*.jsonl"))
            splits = f"; set {key} to one of {', '.join(repr(f[:-6]) for f in found)}" if found else ""
            raise DataNotFound(f"{key}: {split!r} is not a split of {path}: {file} does not exist; the folder holds "
                               f"{found or 'no .jsonl files'}{splits}.")
        return _read_jsonl(file, prompt_field, answer_field, limit, skip_bad_rows)
    # A name that looks like a path must not fall through to the hub, where it would fail with a
    # confusing network or "dataset not found" error.
    if dataset.endswith(".jsonl") or dataset.startswith((".", "/", "~")):
        if not path.is_file():
            raise DataNotFound(f"{dataset}: no such .jsonl file or directory.")
        return _read_jsonl(path, prompt_field, answer_field, limit, skip_bad_rows)
    return _load_hub(dataset, split, prompt_field, answer_field, limit, key)


def sft_conversation(example: Example) -> list[dict[str, str]] | None:
    """A `completion` column that is a conversation with more than assistant turns (tool calls and their answers,
    e.g. the arith task's calculator solutions): its messages, for SFT to train the assistant turns only; else
    None (the target is `sft_target`'s text)."""
    completion = example.columns.get("completion")
    if not isinstance(completion, list) or all(m.get("role") == "assistant" for m in completion):
        return None
    roles = [m.get("role") for m in completion]
    if roles[0] != "assistant" or roles[-1] != "assistant" or not all(
            isinstance(m.get("content"), str) for m in completion):
        raise DataError(f"a completion conversation ({roles}) must start and end with an assistant turn, every "
                        f"message with text content: SFT trains the assistant turns, the messages between them "
                        f"are their context (question: {example.question[:60]!r})")
    return completion


def sft_target(example: Example) -> str:
    """Return the gold solution as a completion: no calculator annotations, ending with `#### N`.

    The final line is rewritten to the normalised gold answer, so the SFT target has exactly the format
    the reward's extractor expects. A bare answer with no worked solution becomes just `#### N`. A row with a
    `completion` column (TRL's prompt-completion format, text or assistant messages) trains on it as written.
    """
    completion = example.columns.get("completion")
    if completion is not None:
        return completion if isinstance(completion, str) else "".join(m["content"] for m in completion)
    if example.answer is None:
        raise DataError("an SFT row needs a target: an answer or a completion column")
    gold = gold_answer(example.answer)
    lines = strip_calculator(example.answer).strip().splitlines()
    body = "\n".join(line for line in lines if not line.lstrip().startswith("####")).strip()
    if not body or body == gold:
        return f"#### {gold}"
    return f"{body}\n#### {gold}"


IN_MEMORY = "<python>"  # `dataset` of a run whose rows were handed over from Python (GRPOTrainer(train_dataset=))


def single_file(dataset: str) -> bool:
    """A dataset that is one .jsonl file: one set of rows, no splits."""
    return dataset.endswith(".jsonl") or Path(dataset).expanduser().is_file()


def has_held_out(cfg: Any) -> bool:
    """Whether the run's data has rows apart from the training rows: an eval_dataset, or a dataset with splits
    (arith, a folder of {split}.jsonl, a hub id). One file, or rows from Python, evaluate only when told where."""
    return cfg.eval_dataset is not None or not (cfg.dataset == IN_MEMORY or single_file(cfg.dataset))


def load_split(cfg: Any, split: str, limit: int | None = None, dataset: str | None = None) -> list[Example]:
    """The examples of one split for a run config (`dataset` overrides cfg.dataset): arith, or `load_examples`.

    A single .jsonl file has one split, its training rows: asking cfg.dataset for another split (held-out rows,
    `minigrpo sample --split test`) is an error, never the training rows again. A file named in `dataset`
    (eval_dataset, `--data FILE`) is taken whole."""
    named = dataset is not None
    dataset = dataset or cfg.dataset
    if dataset == IN_MEMORY:
        raise ConfigError("dataset: this run's rows were handed over from Python (train_dataset=); pass them "
                          "again from Python, or give a dataset name, folder or .jsonl file")
    if not named and split != cfg.train_split and single_file(dataset):
        raise DataError(f"{dataset}: one .jsonl file, whose rows are the training data: it has no {split!r} "
                        f"split. Give those rows as their own file (eval_dataset: FILE, or --data FILE)")
    key = "train_split" if split == cfg.train_split else "eval_split" if split == cfg.eval_split else "split"
    if dataset.startswith(reasoning_gym.PREFIX):
        size = cfg.reasoning_gym_size if split == "train" else (limit or reasoning_gym.HELD_OUT)
        rows = reasoning_gym.rows(dataset, split, min(size, limit or size))
        return [_to_example(row, f"{dataset} [{split}], row {i}", "question", "answer") for i, row in enumerate(rows)]
    if dataset == code.HUMANEVAL:
        rows = code.humaneval_rows(split)[:limit]
        return [_to_example(row, f"humaneval [{split}], row {i}", "question", "answer") for i, row in enumerate(rows)]
    if dataset == "arith":
        if split not in SPLITS["arith"]:
            raise _unknown_split(key, split, "the arith task", SPLITS["arith"])
        size = cfg.arith_train_size if split == "train" else (limit or 1000)
        rows = arith_rows(split, min(size, limit or size), cfg.arith_steps, cfg.arith_max_number,
                          direct_fraction=cfg.arith_direct_fraction, tool_fraction=cfg.arith_tool_fraction)
        return [_to_example(row, f"arith [{split}], row {i}", "question", "answer") for i, row in enumerate(rows)]
    return load_examples(dataset, split, cfg.prompt_field, cfg.answer_field, limit,
                         getattr(cfg, "skip_bad_rows", False), key)
