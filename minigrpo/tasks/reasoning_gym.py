"""Procedural tasks from reasoning-gym (`dataset: reasoning_gym:TASK`), and their scorer (the reward
`reasoning_gym`).

reasoning-gym (PyPI `reasoning-gym`, offline) generates problems of 100+ tasks (arithmetic, algebra, logic,
puzzles, graphs, ciphers ...) with a verifier for each. The dataset string names them:

    dataset: reasoning_gym:leg_counting                     # one task, its default difficulty
    dataset: reasoning_gym:leg_counting,basic_arithmetic    # several, mixed with equal weights
    dataset: reasoning_gym:tasks.yaml                       # reasoning-gym's own composite config: each task's
                                                            # weight and options (e.g. its difficulty)

Rows are `question`, `answer` (the task's oracle answer, a text) and `metadata` (what its verifier reads), as
reasoning-gym gives them. The train split has `reasoning_gym_size` rows, the test split the first rows of
another stream (its seeds 10^9 away, so the two never share a generator seed: reasoning-gym seeds row i with
seed + i); train rows whose question is one of the first `HELD_OUT` test questions are skipped, so a
small task's held-out accuracy is not measured on problems it trained on.

The reward `reasoning_gym` scores a completion with the row's task verifier (`score_answer`: 1.0 right, 0.0
wrong; some tasks give partial credit) on its answer: the last `<answer>...</answer>` (reasoning-gym's format),
else the rest of the last `#### ` line (minigrpo's), else the last `\\boxed{}`. `eval_metric: auto` on such a
dataset is this reward.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import os
import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

from minigrpo.errors import ConfigError, DataError
from minigrpo.tasks.answers import _last_boxed, normalize_number

PREFIX = "reasoning_gym:"
SEEDS = {"train": 0, "test": 10**9}  # far apart: row i of a split uses seed + i
HELD_OUT = 1000  # test rows a train split never repeats (and the most a test split gives)
_ANSWER_TAG = re.compile(r"<answer>\s?(.*?)\s?</answer>", re.DOTALL)
_HASH_LINE = re.compile(r"(?<!#)####(?!#)[ \t]*([^\n]*)")


def _library() -> Any:
    try:
        with warnings.catch_warnings():  # cellpylib (a task's dependency) has `is "recursive"`: noise, not ours
            warnings.simplefilter("ignore", SyntaxWarning)
            import reasoning_gym  # optional: ~3 s to import, needed by this dataset source only
    except ImportError as e:
        if e.name != "reasoning_gym":  # reasoning-gym is there, one of its own imports failed: say that
            raise
        raise ConfigError("dataset: reasoning_gym:... needs the reasoning-gym package: pip install reasoning-gym "
                          "(minigrpo's lock has it: bash scripts/setup.sh)") from None
    return reasoning_gym


def _specs(spec: str) -> tuple[list[dict[str, Any]], str]:
    """The tasks of a `reasoning_gym:...` string as reasoning-gym's dataset specs (name, weight, config), and
    where they came from (for messages)."""
    body = spec[len(PREFIX):]
    _library()  # a ConfigError saying what to install, before the import below
    from reasoning_gym.factory import DATASETS  # the task table: what a name may be

    if body.endswith((".yaml", ".yml")):
        path = Path(body).expanduser()
        if not path.is_file():
            raise ConfigError(f"dataset: {spec!r}: no such file {path}")
        import yaml  # pyyaml is a dependency; read here only

        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict) or not isinstance(data.get("datasets"), list) or not data["datasets"]:
            raise ConfigError(f"{path}: a reasoning-gym composite config needs a non-empty 'datasets' list of "
                              f"{{name, weight, config}} entries")
        for key in ("seed", "size"):
            if key in data:
                raise ConfigError(f"{path}: '{key}' is set by minigrpo (each split's seeds; the train split's size: "
                                  f"reasoning_gym_size): remove it")
        if not all(isinstance(d, dict) and isinstance(d.get("config") or {}, dict) for d in data["datasets"]):
            raise ConfigError(f"{path}: each entry of 'datasets' is a mapping {{name, weight, config}} (config a "
                              f"mapping of the task's options)")
        specs = [{"name": d.get("name"), "weight": d.get("weight", 1.0), "config": d.get("config") or {}}
                 for d in data["datasets"]]
        where = str(path)
    else:
        specs = [{"name": n.strip(), "weight": 1.0, "config": {}} for n in body.split(",")]
        where = spec
    for s in specs:
        if s["name"] not in DATASETS:
            close = [n for n in sorted(DATASETS) if s["name"] and (s["name"] in n or n in s["name"])]
            raise ConfigError(f"{where}: {s['name']!r} is not a reasoning-gym task (reasoning-gym "
                              f"{importlib.metadata.version('reasoning-gym')} has {len(DATASETS)}"
                              f"{': did you mean ' + ', '.join(close[:5]) + '?' if close else ''}); the names: "
                              f"python -c 'from reasoning_gym.factory import DATASETS; print(sorted(DATASETS))'")
        for key in ("seed", "size"):
            if key in s["config"]:
                raise ConfigError(f"{where}: task {s['name']!r}: '{key}' in its config is set by minigrpo: remove it")
    if len({s["name"] for s in specs}) != len(specs):
        raise ConfigError(f"{where}: a task is named twice")
    return specs, where


def _generator(spec: str, split: str, size: int) -> Any:
    """reasoning-gym's dataset for a split: one task, or its composite of several."""
    specs, where = _specs(spec)
    rg = _library()
    try:
        if len(specs) == 1:
            return rg.create_dataset(specs[0]["name"], seed=SEEDS[split], size=size, **specs[0]["config"])
        from reasoning_gym.composite import CompositeConfig, CompositeDataset, DatasetSpec  # optional, as above

        return CompositeDataset(CompositeConfig(size=size, seed=SEEDS[split],
                                                datasets=[DatasetSpec(**s) for s in specs]))
    except (TypeError, ValueError, AssertionError) as e:  # an option the task does not have, a bad value
        raise ConfigError(f"{where}: reasoning-gym refused the task config: {e!r}") from None


def rows(spec: str, split: str, size: int) -> list[dict[str, Any]]:
    """`size` rows of a split: {"question", "answer", "metadata", "reasoning_gym_task"} (the last: `spec`, which
    the reward scores with). Generated in a child interpreter with PYTHONHASHSEED=0: some tasks iterate over sets
    (isomorphic_strings, word_ladder ...), so their problems would otherwise differ from one process to the next
    (training processes, a later `minigrpo eval`); remembered for the process."""
    if split not in SEEDS:
        raise ConfigError(f"split: {split!r} is not a split of {spec}; its splits are 'train', 'test'")
    if split == "test" and size > HELD_OUT:
        raise ConfigError(f"{spec}: at most {HELD_OUT} held-out rows (the train split avoids that many); asked for "
                          f"{size} (eval_limit, or --limit)")
    return copy.deepcopy(_rows_elsewhere(spec, split, size))


@functools.cache
def _rows_elsewhere(spec: str, split: str, size: int) -> list[dict[str, Any]]:
    code = ("import pickle, sys\nfrom minigrpo.tasks import reasoning_gym as rg\n"
            "try:\n    out = rg.rows_here(sys.argv[1], sys.argv[2], int(sys.argv[3]))\n"
            "except (rg.ConfigError, rg.DataError) as e:\n    out = e\n"
            "sys.stdout.buffer.write(pickle.dumps(out))\n")
    child = subprocess.run([sys.executable, "-c", code, spec, split, str(size)], capture_output=True,
                           env=os.environ | {"PYTHONHASHSEED": "0"}, check=False)
    if child.returncode != 0:
        raise DataError(f"{spec}: generating the {split} split failed: {child.stderr.decode(errors='replace')[-2000:]}")
    out = pickle.loads(child.stdout)  # our own child's output
    if isinstance(out, Exception):
        raise out
    return out


def rows_here(spec: str, split: str, size: int) -> list[dict[str, Any]]:
    """`rows`, generated in this process (its hash seed matters: `rows`)."""
    if split == "test":  # always the same HELD_OUT problems, sliced (a task like acre draws its set by size)
        data = _generator(spec, "test", HELD_OUT)
        return [_row(data[i], spec) for i in range(size)]
    held_out = {row["question"] for row in rows_here(spec, "test", HELD_OUT)}
    data = _generator(spec, "train", 3 * size)
    out = []
    for i in range(3 * size):
        item = data[i]
        if item["question"] not in held_out:
            out.append(_row(item, spec))
            if len(out) == size:
                return out
    raise DataError(f"{spec}: only {len(out)} of the first {3 * size} train problems differ from the held-out "
                    f"ones: the task has too few distinct problems for reasoning_gym_size {size}; lower it, or "
                    f"raise the task's difficulty")


def _row(item: dict[str, Any], spec: str) -> dict[str, Any]:
    return {"question": item["question"], "answer": str(item["answer"]), "metadata": item["metadata"],
            "reasoning_gym_task": spec}


def check_correctness(examples: list[Any]) -> None:
    """`reward_funcs: correctness` compares numbers: on reasoning-gym rows whose answers are text (word_sorting,
    knights_knaves ...) it would score every completion 0, the oracle's own answer too. A ConfigError names the
    first such row."""
    for ex in examples:
        if ex.columns.get("reasoning_gym_task") and normalize_number(str(ex.answer)) is None:
            raise ConfigError(f"reward_funcs: correctness compares numbers, and {ex.where} of "
                              f"{ex.columns['metadata'].get('source_dataset')} has the answer {str(ex.answer)[:60]!r}: "
                              f"score reasoning-gym tasks with their verifiers, reward_funcs: [reasoning_gym]")


def answer_text(completion: str) -> str | None:
    """The answer a completion gives: of its last `<answer>...</answer>`, its last `#### ...` line (exactly four
    `#`, not a markdown heading's five or more) and its last `\\boxed{}`, the one that comes last in the text
    (empty ones skipped), stripped of `**` bold and a final period; None when it gives none.

    >>> answer_text("think... <answer> 7 </answer>"), answer_text("2 + 5 = 7\\n#### **7**."), answer_text("no")
    ('7', '7', None)
    >>> answer_text("#### Final answer\\nSo \\\\boxed{42}"), answer_text("<answer>7</answer> <answer></answer>")
    ('42', '7')
    """
    found: list[tuple[int, str]] = []  # (where it ends, the answer)
    for m in _ANSWER_TAG.finditer(completion):
        if m.group(1).strip():
            found.append((m.end(), m.group(1)))
    for m in _HASH_LINE.finditer(completion):
        if m.group(1).strip():
            found.append((m.end(), m.group(1)))
    boxed = _last_boxed(completion)
    if boxed is not None and boxed.strip():
        found.append((completion.rfind(boxed) + len(boxed), boxed))
    if not found:
        return None
    text = max(found, key=lambda f: f[0])[1].strip()
    if text.startswith("**") and text.endswith(("**", "**.")):
        text = text.removeprefix("**").removesuffix(".").removesuffix("**").strip()
    return text.removesuffix(".").strip() if text.endswith(".") and not text.endswith("..") else text


@functools.cache
def _scorer(task: str, spec: str | None) -> Any:
    """The verifier of `task` as `spec` configured it (its options can matter: a tolerance, a range), or with the
    task's defaults for rows that name no spec."""
    if spec is None or not spec.startswith(PREFIX):
        return _library().get_score_answer_fn(task)
    data = _generator(spec, "test", 1)
    return data.datasets[task].score_answer if hasattr(data, "datasets") else data.score_answer


def score(completion: str, question: str, answer: str, metadata: dict[str, Any], spec: str | None = None) -> float:
    """A completion's score by its task's verifier (the row's `metadata['source_dataset']`, configured by the
    row's `reasoning_gym_task` spec when it has one)."""
    entry = {"question": question, "answer": answer, "metadata": metadata}
    return float(_scorer(metadata["source_dataset"], spec)(answer_text(completion), entry))
