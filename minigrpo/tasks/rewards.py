"""Reward functions: built-ins by name, custom ones by import path, and the weighted sum over a batch.

Every reward follows TRL's convention, so users can bring their own:
``fn(prompts, completions, **columns) -> list[float | None]``, where ``columns`` are the dataset's
columns as keyword lists aligned with ``completions`` (``answer`` is the normalised gold answer,
``answers.gold_answer`` of the data's answer field); ``None`` means "no opinion on this sample".
Answers are extracted by `minigrpo.tasks.answers`, the extractor evaluation uses too.
"""

import importlib
import math
import numbers
import sys
import traceback
from collections.abc import Callable

from minigrpo.errors import ConfigError
from minigrpo.tasks.answers import FINAL_NUMBER_RE, extract_hash_answer, is_correct


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
    return bool(sep) and FINAL_NUMBER_RE.fullmatch(tail) is not None


def _is_strict(prompt: str, completion: str) -> bool:
    """Reasoning lines, then a last line ``#### N``; think tags, if any, must form one valid block."""
    if ("<think>" in completion or "</think>" in completion) and _think_parts(prompt, completion) is None:
        return False
    head, sep, tail = completion.rpartition("####")
    on_own_line = head.rstrip(" \t").endswith("\n")
    return bool(sep) and on_own_line and bool(head.strip()) and FINAL_NUMBER_RE.fullmatch(tail) is not None


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
