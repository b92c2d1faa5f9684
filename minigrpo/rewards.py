"""Answer extraction and reward functions.

Every reward follows TRL's convention, so users can bring their own:
``fn(prompts, completions, **columns) -> list[float | None]``, where ``columns`` are the dataset's
columns as keyword lists aligned with ``completions``; ``None`` means "no opinion on this sample".
Evaluation calls the same ``extract_answer`` / ``is_correct``, so the training reward and the reported
accuracy cannot drift apart.

Extraction protocol (GSM8K, see GRPO_NOTES.md): the last ``#### N`` wins; if there is none, the last
``\\boxed{...}``. Numbers compare exactly as ``Decimal``; anything else (LaTeX such as ``\\frac{1}{2}``)
falls back to math-verify, gold first.
"""

import importlib
import math
import numbers
import re
import sys
import threading
import traceback
from collections.abc import Callable
from decimal import Decimal

from minigrpo.config import ConfigError

# [0-9] rather than \d: \d also matches non-ASCII digits, which Decimal would silently accept.
# The shape `d[d,]*(.d+)?` is unambiguous, so a failed match backtracks linearly, never quadratically.
_NUM = r"-?(?:[0-9][0-9,]*(?:\.[0-9]+)?|\.[0-9]+)"
# Each whitespace run follows its own literal (`####`, `**`, `$`): two adjacent optional runs would split
# 1 MB of spaces in n^2 ways on a failed match. (Possessive `*+` would need Python 3.11.)
_HASH_RE = re.compile(r"####\s*(?:\*\*\s*)?(?:\$\s*)?(" + _NUM + ")")
_FINAL_RE = re.compile(r"[ \t]*(?:\$[ \t]*)?" + _NUM + r"\s*")  # the tail of a strict `#### N` line
_PLAIN_NUMBER_RE = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
_BOXED_TOKEN_RE = re.compile(r"\\boxed\{|[{}]")
# Longer "answers" are never a GSM8K number; keep sympy away from pathological inputs.
_MAX_VERIFY_CHARS = 1000
_VERIFY_TIMEOUT_S = 5


def normalize_number(s: str) -> str | None:
    """Canonical decimal string for a number written as text, or None if ``s`` is not a number.

    ``"1,234"`` -> ``"1234"``, ``"$5"`` -> ``"5"``, ``"2.50"`` -> ``"2.5"``, ``".5"`` -> ``"0.5"``.
    """
    s = s.strip().strip("*").strip()  # markdown bold: `**18**`
    # LaTeX thousands separators (`1{,}234`, `1\,234`) before plain commas; `\$` before `$`.
    for junk in ("{,}", "\\,", ",", "\\$", "$"):
        s = s.replace(junk, "")
    s = s.strip().removesuffix(".")  # sentence-final period: `#### 18.`
    # Validate first: Decimal alone would also accept "NaN", "Infinity", "1e5" and "1_000".
    if not _PLAIN_NUMBER_RE.fullmatch(s):
        return None
    # format "f" is exact (no context rounding) and never uses exponent notation.
    text = format(Decimal(s), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def extract_hash_answer(text: str) -> str | None:
    """The number after the last ``#### `` in ``text``, normalised, or None if there is none."""
    found = _HASH_RE.findall(text)
    return normalize_number(found[-1]) if found else None


def extract_gold(answer: str) -> str | None:
    """The gold number of a GSM8K ``answer`` field (its ``#### N`` line), or of a bare number like "72"."""
    found = extract_hash_answer(answer)
    return found if found is not None else normalize_number(answer)


def _last_boxed(text: str) -> str | None:
    """Content of the last closed ``\\boxed{...}``, matched by brace counting in one linear pass."""
    if "\\boxed{" not in text:
        return None
    stack: list[int] = []  # per open brace: where its boxed content starts, or -1 for a plain brace
    best: tuple[int, int] | None = None
    for m in _BOXED_TOKEN_RE.finditer(text):
        if m.group() != "}":
            stack.append(m.end() if m.group() != "{" else -1)
        elif stack:  # an unmatched `}` is ignored
            start = stack.pop()
            # Latest start wins, so an unclosed (truncated) last box falls back to an earlier one.
            if start >= 0 and (best is None or start > best[0]):
                best = (start, m.start())
    return text[best[0] : best[1]] if best else None


def extract_answer(text: str) -> str | None:
    """The model's answer: the last ``#### N``, else the last ``\\boxed{}`` content, else None.

    A boxed number is normalised; other boxed content (LaTeX) is returned stripped, for math-verify.
    """
    found = extract_hash_answer(text)
    if found is not None:
        return found
    boxed = _last_boxed(text)
    if boxed is None or not boxed.strip():
        return None
    number = normalize_number(boxed)
    return number if number is not None else boxed.strip()


def _math_verify_equal(gold: str, answer: str) -> bool:
    """math-verify equivalence (gold first: the order matters); False on any failure."""
    if len(answer) > _MAX_VERIFY_CHARS or len(gold) > _MAX_VERIFY_CHARS:
        return False
    # math-verify times out with signal.alarm, which raises off the main thread; there we pass None.
    timeout = _VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    try:
        from math_verify import parse, verify  # lazy: sympy costs ~1 s to import, only LaTeX needs it

        gold_parsed = parse(gold, parsing_timeout=timeout)
        answer_parsed = parse("$" + answer + "$", parsing_timeout=timeout)
        return bool(verify(gold_parsed, answer_parsed, timeout_seconds=timeout))
    except Exception:  # noqa: BLE001  (a reward must never crash training over one odd completion)
        return False


def is_correct(completion: str, gold: str) -> bool:
    """Whether the completion's extracted answer equals ``gold`` (a number, or a GSM8K answer field)."""
    answer = extract_answer(completion)
    gold = str(gold)  # JSONL datasets often store the answer as a JSON number
    if answer is None:
        return False
    gold_number = extract_gold(gold)
    answer_number = normalize_number(answer)
    if gold_number is not None and answer_number is not None:
        return Decimal(gold_number) == Decimal(answer_number)
    return _math_verify_equal(gold_number if gold_number is not None else gold.strip(), answer)


def correctness_reward(
    prompts: list[str], completions: list[str], answer: list[str], **kwargs
) -> list[float | None]:
    """1.0 where the completion's answer equals the ``answer`` column, else 0.0.

    >>> correctness_reward(["Q1", "Q2"], ["6 * 12 = 72\\n#### 72", "\\\\boxed{70}"], answer=["72", "72"])
    [1.0, 0.0]
    """
    return [1.0 if is_correct(c, a) else 0.0 for c, a in zip(completions, answer, strict=True)]


def _think_parts(prompt: str, completion: str) -> tuple[str, str] | None:
    """(reasoning, rest) if the completion has exactly one well-formed think block, else None.

    Chat templates (Qwen3, R1 distills) may prefill ``<think>`` in the prompt, so the completion then
    only closes the block.
    """
    if completion.count("</think>") != 1 or completion.count("<think>") > 1:
        return None
    reasoning, rest = completion.split("</think>")
    if reasoning.lstrip().startswith("<think>"):
        reasoning = reasoning.lstrip().removeprefix("<think>")
    elif not prompt.rstrip().endswith("<think>"):
        return None
    return None if "<think>" in reasoning else (reasoning, rest)


def _ends_with_hash(text: str) -> bool:
    """Whether ``text`` ends with ``#### N`` (N a number), up to trailing whitespace."""
    _, sep, tail = text.rpartition("####")
    return bool(sep) and _FINAL_RE.fullmatch(tail) is not None


def _is_strict(prompt: str, completion: str) -> bool:
    """Reasoning lines, then a last line ``#### N``; think tags, if any, must form one valid block."""
    if ("<think>" in completion or "</think>" in completion) and _think_parts(prompt, completion) is None:
        return False
    head, sep, tail = completion.rpartition("####")
    on_own_line = head.rstrip(" \t").endswith("\n")
    return bool(sep) and on_own_line and bool(head.strip()) and _FINAL_RE.fullmatch(tail) is not None


def format_reward_strict(prompts: list[str], completions: list[str], **kwargs) -> list[float | None]:
    """1.0 for reasoning followed by a final line ``#### N`` and nothing after it, else 0.0.

    An optional ``<think>...</think>`` block may come first.
    """
    return [1.0 if _is_strict(p, c) else 0.0 for p, c in zip(prompts, completions, strict=True)]


def format_reward_soft(prompts: list[str], completions: list[str], **kwargs) -> list[float | None]:
    """1.0 where a ``#### N`` appears anywhere in the completion, else 0.0."""
    return [0.0 if extract_hash_answer(c) is None else 1.0 for c in completions]


def _is_think_format(prompt: str, completion: str) -> bool:
    """R1 style: ``<think>`` non-empty reasoning ``</think>`` then an answer ending in ``#### N``."""
    parts = _think_parts(prompt, completion)
    # Empty reasoning is the degenerate `<think></think>` of non-thinking templates: not rewarded.
    return parts is not None and bool(parts[0].strip()) and _ends_with_hash(parts[1])


def think_format_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float | None]:
    """1.0 for ``<think>...</think>`` then an answer ending in ``#### N``, else 0.0.

    The opening ``<think>`` may sit at the end of the prompt (a prefilling chat template).
    """
    return [1.0 if _is_think_format(p, c) else 0.0 for p, c in zip(prompts, completions, strict=True)]


REWARD_FUNCS: dict[str, Callable] = {
    "correctness": correctness_reward,
    "format_strict": format_reward_strict,
    "format_soft": format_reward_soft,
    "think_format": think_format_reward,
}


def soft_overlong_punishment(max_completion_length: int, overlong_buffer: int) -> Callable:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13) as a reward on completion lengths L:
    0 while L <= L_max - L_buffer, then linear down to -1 at L = L_max (a truncated completion).

    >>> fn = soft_overlong_punishment(10, 4)
    >>> fn([], ["", "", ""], completion_ids=[[1] * 6, [1] * 8, [1] * 10])
    [0.0, -0.5, -1.0]
    """
    if not 0 < overlong_buffer <= max_completion_length:
        raise ValueError(f"overlong_buffer must be in [1, max_completion_length={max_completion_length}], "
                         f"got {overlong_buffer}")
    start = max_completion_length - overlong_buffer

    def overlong(prompts: list[str], completions: list[str], completion_ids: list[list[int]],
                 **kwargs) -> list[float | None]:
        return [max(-1.0, min(0.0, (start - len(ids)) / overlong_buffer)) for ids in completion_ids]

    return overlong


# Built-ins that take run settings: built by load_reward from its `options`.
REWARD_FACTORIES: dict[str, Callable[..., Callable]] = {
    "overlong": lambda options: soft_overlong_punishment(options["max_completion_length"],
                                                         options["overlong_buffer"]),
}


def load_reward(name: str, options: dict | None = None) -> Callable:
    """A built-in reward by name (see ``REWARD_FUNCS``), or a custom one as ``package.module:function``.

    `options` carries run settings for the built-ins that need them (``overlong``: max_completion_length
    and overlong_buffer).
    """
    if name in REWARD_FUNCS:
        return REWARD_FUNCS[name]
    if name in REWARD_FACTORIES:
        return REWARD_FACTORIES[name](options or {})
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"unknown reward {name!r}: built-in rewards are {', '.join([*REWARD_FUNCS, *REWARD_FACTORIES])}; "
            "a custom reward is accepted as 'package.module:function'"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or any error raised while the module runs
        raise ConfigError(f"cannot import module {module_name!r} for reward {name!r}: {e!r}") from e
    try:
        fn = getattr(module, attr)
    except AttributeError as e:
        raise ConfigError(f"module {module_name!r} has no function {attr!r} (reward {name!r}): {e}") from e
    if not callable(fn):
        raise ConfigError(f"reward {name!r} is a {type(fn).__name__}, not a function")
    return fn


def _as_reward(value: object) -> float | None:
    """A finite float, or None for anything else (None, NaN, inf, strings): the sample is skipped."""
    if isinstance(value, numbers.Real) and math.isfinite(value):
        return float(value)
    return None


def score(
    funcs: list[tuple[str, Callable, float]],
    prompts: list[str],
    completions: list[str],
    columns: dict[str, list],
    errors: dict[str, int] | None = None,
) -> tuple[list[float | None], dict[str, list[float | None]]]:
    """Weighted total reward per sample, and each function's values by name.

    The total sums ``weight * value`` over the functions that scored the sample (TRL's nansum); a sample
    that no function scored gets ``None``. A reward function that raises is called again one sample at a
    time: the samples it still fails on get ``None`` (counted in `errors[name]`; its first traceback is
    printed once) and the run goes on. Returning the wrong number of values is a bug and an error.
    """
    totals: list[float | None] = [None] * len(completions)
    per_func: dict[str, list[float | None]] = {}
    for name, fn, weight in funcs:
        try:
            raw = fn(prompts, completions, **columns)
        except Exception:
            raw = _score_one_by_one(name, fn, prompts, completions, columns, errors)
        if not isinstance(raw, (list, tuple)) or len(raw) != len(completions):
            got = len(raw) if isinstance(raw, (list, tuple)) else type(raw).__name__
            raise ValueError(f"reward {name!r} returned {got} values for {len(completions)} completions")
        values = [_as_reward(v) for v in raw]
        per_func[name] = values
        for i, v in enumerate(values):
            if v is not None:
                totals[i] = (totals[i] or 0.0) + weight * v
    return totals, per_func


_REPORTED: set[str] = set()  # reward functions whose first traceback has been printed


def _score_one_by_one(name: str, fn: Callable, prompts: list[str], completions: list[str], columns: dict[str, list],
                      errors: dict[str, int] | None) -> list[object]:
    """After a batch call raised: each sample alone, so a sample that breaks the function costs only itself."""
    out: list[object] = []
    for i in range(len(completions)):
        try:
            value = fn(prompts[i:i + 1], completions[i:i + 1], **{k: v[i:i + 1] for k, v in columns.items()})
            out.append(value[0] if isinstance(value, (list, tuple)) and len(value) == 1 else None)
        except Exception:
            if errors is not None:
                errors[name] = errors.get(name, 0) + 1
            if name not in _REPORTED:
                _REPORTED.add(name)
                print(f"reward {name!r} raised on a sample (scored None, run goes on; later errors only "
                      f"counted in train/reward_errors):\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            out.append(None)
    return out
