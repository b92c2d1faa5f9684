"""Reward functions: built-ins by name, custom ones by import path, and the weighted sum over a batch.

Every reward follows TRL's convention, so users can bring their own: called with keyword arguments
``fn(prompts=..., completions=..., completion_ids=..., **columns) -> list[float | None]``, where ``columns``
are the dataset's columns as keyword lists aligned with ``completions`` (``answer`` is the normalised gold
answer, ``answers.gold_answer`` of the data's answer field); ``None`` means "no opinion on this sample".
With a conversational dataset, as in TRL, ``prompts`` are the message lists and each completion is
``[{"role": "assistant", "content": text}]``; the built-ins take either form. A reward may be ``async def``:
the async rewards of a batch run concurrently. Answers are extracted by `minigrpo.tasks.answers`, the
extractor evaluation uses too.
"""

import asyncio
import concurrent.futures
import importlib
import inspect
import math
import numbers
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from minigrpo.errors import ConfigError
from minigrpo.tasks import code, model_rewards
from minigrpo.tasks import reasoning_gym as rg
from minigrpo.tasks.answers import FINAL_NUMBER_RE, extract_hash_answer, is_correct, text_of


def correctness_reward(
    prompts: list[str], completions: list[str], answer: list[str], **kwargs
) -> list[float | None]:
    """1.0 where the completion's answer equals the ``answer`` column, else 0.0.

    >>> correctness_reward(["Q1", "Q2"], ["6 * 12 = 72\\n#### 72", "\\\\boxed{70}"], answer=["72", "72"])
    [1.0, 0.0]
    """
    return [1.0 if is_correct(text_of(c), a) else 0.0 for c, a in zip(completions, answer, strict=True)]


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
    return [1.0 if _is_strict(text_of(p), text_of(c)) else 0.0 for p, c in zip(prompts, completions, strict=True)]


def format_reward_soft(prompts: list[str], completions: list[str], **kwargs) -> list[float | None]:
    """1.0 where a ``#### N`` appears anywhere in the completion, else 0.0."""
    return [0.0 if extract_hash_answer(text_of(c)) is None else 1.0 for c in completions]


def _is_think_format(prompt: str, completion: str) -> bool:
    """R1 style: ``<think>`` non-empty reasoning ``</think>`` then an answer ending in ``#### N``."""
    parts = _think_parts(prompt, completion)
    # Empty reasoning is the degenerate `<think></think>` of non-thinking templates: not rewarded.
    return parts is not None and bool(parts[0].strip()) and _ends_with_hash(parts[1])


def think_format_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float | None]:
    """1.0 for ``<think>...</think>`` then an answer ending in ``#### N``, else 0.0.

    The opening ``<think>`` may sit at the end of the prompt (a prefilling chat template).
    """
    return [1.0 if _is_think_format(text_of(p), text_of(c)) else 0.0 for p, c in zip(prompts, completions, strict=True)]


def environment_reward(prompts: list[str], completions: list[str], environment_reward: list[float] | None = None,
                       **kwargs) -> list[float | None]:
    """The multi-turn environment's rewards, summed over the trajectory (the column `environment_reward` that
    rollouts with an `environment` add; agent/env.py); no opinion (None) where the environment failed (NaN), or
    without one (a run with this reward and no `environment` is refused at start).

    >>> environment_reward(["Q", "Q"], ["#### 3", "#### 4"], environment_reward=[0.5, float("nan")])
    [0.5, None]
    """
    if environment_reward is None:
        return [None] * len(completions)
    return [None if math.isnan(r) else float(r) for r in environment_reward]


def reasoning_gym_reward(prompts: list[str], completions: list[str], question: list[str] | None = None,
                         solution: list[str] | None = None, metadata: list[dict] | None = None,
                         reasoning_gym_task: list[str | None] | None = None, **kwargs) -> list[float | None]:
    """reasoning-gym's verifier of each row's task (`dataset: reasoning_gym:TASK`, tasks/reasoning_gym.py) on the
    completion's answer (`<answer>...</answer>`, `#### ...` or `\\boxed{}`): 1.0 right, 0.0 wrong, partial credit
    where the task gives it; None for a row that is not from reasoning-gym (no task in its `metadata`)."""
    if metadata is None or question is None or solution is None:
        return [None] * len(completions)
    specs = reasoning_gym_task or [None] * len(completions)  # the task config the rows were made with
    return [rg.score(text_of(c), q, a, md, spec) if isinstance(md, dict) and "source_dataset" in md else None
            for c, q, a, md, spec in zip(completions, question, solution, metadata, specs, strict=True)]


REWARD_FUNCS: dict[str, Callable] = {
    "correctness": correctness_reward,
    "environment": environment_reward,
    "format_strict": format_reward_strict,
    "reasoning_gym": reasoning_gym_reward,
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
    # programs run against the row's tests in the sandbox (tasks/code.py)
    "code_tests": lambda options: code.code_tests_reward(options.get("code_timeout", 10.0)),
    "code_tests_all": lambda options: code.code_tests_reward(options.get("code_timeout", 10.0), all_or_nothing=True),
    "judge": lambda options: model_rewards.load_judge(options),  # an LLM judge (tasks/model_rewards.py)
}


def load_reward(name: str | Callable, options: dict | None = None) -> Callable:
    """A built-in reward by name (see ``REWARD_FUNCS``), a custom one as ``package.module:function``, or a
    function handed over from Python (returned as it is).

    `options` carries run settings for the built-ins that need them (``overlong``: max_completion_length
    and overlong_buffer).
    """
    if callable(name):
        return name
    if name.startswith("python:"):  # config.function_name: a function only Python can pass again
        raise ConfigError(f"reward {name!r} was a function handed over from Python (a lambda, or defined in a "
                          f"script); pass it again from Python (GRPOTrainer(reward_funcs=...)), or make it "
                          f"importable and name it 'package.module:function'")
    if name in REWARD_FUNCS:
        return REWARD_FUNCS[name]
    if name in REWARD_FACTORIES:
        return REWARD_FACTORIES[name](options or {})
    if model_rewards.is_model_name(name):  # a reward model: a hub id or folder (TRL's reward_funcs="owner/name")
        return model_rewards.load_reward_model(name, (options or {}).get("device", "cpu"),
                                               (options or {}).get("dtype", "float32"))
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(
            f"unknown reward {name!r}: built-in rewards are {', '.join([*REWARD_FUNCS, *REWARD_FACTORIES])}; "
            "a custom reward is accepted as 'package.module:function', a reward model as its hub id or folder"
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


def reward_options(cfg: Any) -> dict[str, Any]:
    """The run settings the built-ins of REWARD_FACTORIES are made with."""
    return {"max_completion_length": cfg.max_completion_length, "overlong_buffer": cfg.overlong_buffer,
            "code_timeout": cfg.code_timeout, "device": cfg.device, "dtype": cfg.dtype,
            **{k: getattr(cfg, k) for k in ("judge_model", "judge_base_url", "judge_rubric", "judge_pattern",
                                            "judge_max_tokens", "judge_concurrency", "judge_timeout",
                                            "judge_retries")}}


def load_rewards(cfg: Any) -> list[tuple[str, Callable, float]]:
    """The run's rewards as (name, function, weight): each name unique (a second function with the same name is
    logged as name_2), the names train/rewards/<name> uses."""
    weights = cfg.reward_weights or [1.0] * len(cfg.reward_funcs)
    options = reward_options(cfg)
    table: list[tuple[str, Callable, float]] = []
    for fn, weight in zip(cfg.reward_funcs, weights):
        name, k = reward_name(fn), 2
        while any(name == n for n, _, _ in table):
            name, k = f"{reward_name(fn)}_{k}", k + 1
        table.append((name, load_reward(fn, options), weight))
    return table


def _as_reward(value: object) -> float | None:
    """A finite float, or None for anything else (None, NaN, inf, strings): the sample is skipped. A numpy or
    torch scalar counts as its number."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # np.float32(1), torch.tensor(1.0)
        value = value.item()
    if isinstance(value, numbers.Real) and math.isfinite(value):
        return float(value)
    return None


def reward_inputs(examples: list[Any], prompts: list[str], completions: list[str], n: int,
                  stats: dict[str, list[float]] | None = None) -> tuple[list[Any], list[Any], dict[str, list[Any]]]:
    """What rewards receive for `n` completions per example (rows example-major, as a rollout's), in TRL's forms:
    a conversational example's prompt as its messages and each completion as [{"role": "assistant", ...}];
    otherwise the prompt as rendered (what the model saw) and the completion text. Plus the dataset columns, and
    with a multi-turn environment (`stats`: the rollout's) the column `environment_reward`."""
    rows = [ex for ex in examples for _ in range(n)]
    prompts = [ex.messages if ex.messages is not None else p for ex, p in zip(rows, prompts, strict=True)]
    completions = [[{"role": "assistant", "content": c}] if ex.messages is not None else c
                   for ex, c in zip(rows, completions, strict=True)]
    keys = dict.fromkeys(k for ex in examples for k in ex.columns)  # every row's columns (None where absent)
    columns = {k: [ex.columns.get(k) for ex in rows] for k in keys}
    if stats is not None and "env_reward" in stats:  # what the reward `environment` returns
        columns["environment_reward"] = list(stats["env_reward"])
    return prompts, completions, columns


def reward_name(fn: str | Callable) -> str:
    """The name a reward is logged under (train/rewards/<name>): its config name (a reward model's: the last part of
    its id or folder), or a function's __name__."""
    if isinstance(fn, str):
        return fn.rstrip("/").rsplit("/", 1)[-1] if model_rewards.is_model_name(fn) else fn
    return getattr(fn, "__name__", type(fn).__name__)


TIMED_OUT = object()  # what a call that ran past the time limit gives instead of values


@dataclass
class RewardGuard:
    """What keeps a reward function from stopping or silently starving a run: a time limit per call (a call past
    it costs the batch's samples for that function; `limit` such calls in a row disable the function for the rest
    of the run, with a message), and a count of the values that were not finite numbers (NaN, inf, strings,
    None), with one example each, for the "no learning signal" warning (train.py)."""
    timeout: float = 0.0  # seconds per call; 0: none (the call runs in this thread, unless marked slow)
    limit: int = 3  # timeouts in a row that disable a function
    streak: dict[str, int] = field(default_factory=dict)  # timeouts in a row, per function
    disabled: set[str] = field(default_factory=set)
    timeouts: int = 0  # calls that ran past the limit, so far
    invalid: dict[str, tuple[int, str]] = field(default_factory=dict)  # name -> (values not numbers, an example)
    seconds: dict[str, float] = field(default_factory=dict)  # name -> seconds its calls took, so far

    def timed_out(self, name: str, samples: int) -> None:
        self.timeouts += 1
        self.streak[name] = self.streak.get(name, 0) + 1
        if self.streak[name] >= self.limit:
            self.disabled.add(name)
            print(f"reward {name!r} ran past reward_timeout={self.timeout:g}s {self.limit} times in a row: disabled "
                  f"for the rest of the run (its samples are skipped for it). If it is only slow, raise "
                  f"reward_timeout.", file=sys.stderr, flush=True)
        else:
            print(f"reward {name!r} ran past reward_timeout={self.timeout:g}s on a batch of {samples}: those samples "
                  f"are skipped for it ({self.streak[name]}/{self.limit} in a row disable it)",
                  file=sys.stderr, flush=True)

    def not_numbers(self, name: str, raw: list[Any], values: list[float | None]) -> None:
        bad = [r for r, v in zip(raw, values) if v is None and r is not None]
        if bad:
            count, _ = self.invalid.get(name, (0, ""))
            self.invalid[name] = (count + len(bad), repr(bad[0])[:60])


def score(
    funcs: list[tuple[str, Callable, float]],
    prompts: list[Any],
    completions: list[Any],
    columns: dict[str, list],
    errors: dict[str, int] | None = None,
    guard: RewardGuard | None = None,
) -> tuple[list[float | None], dict[str, list[float | None]]]:
    """Weighted total reward per sample, and each function's values by name.

    The total sums ``weight * value`` over the functions that scored the sample (TRL's nansum); a sample
    that no function scored gets ``None``. A reward function that raises (SystemExit included: a reward's
    sys.exit() is its error, not the run's end) is called again one sample at a time: the samples it still fails
    on get ``None`` (counted in `errors[name]`; its first traceback is printed once) and the run goes on. With
    `guard`, each call has a time limit (RewardGuard), and the seconds each function took add up in
    `guard.seconds`. Returning the wrong number of values is a bug and an error.
    The async functions run concurrently, on an event loop of their own (also inside a notebook's), and so do the
    sync ones marked slow (`fn.slow = True`: a sandbox, a model, a server), each in a thread, beside them; the
    others then run one after another.
    """
    guard = guard or RewardGuard()
    n = len(completions)
    totals: list[float | None] = [None] * n
    per_func: dict[str, list[float | None]] = {}
    kwargs = {"prompts": prompts, "completions": completions, **columns}
    live = [(name, fn) for name, fn, _ in funcs if name not in guard.disabled]
    slow = {name: start_call(fn, kwargs) for name, fn in live if getattr(fn, "slow", False)
            and not inspect.iscoroutinefunction(fn)}  # running while the rest are called
    waiting = [(name, fn) for name, fn in live if inspect.iscoroutinefunction(fn)]
    awaited = dict(zip([n for n, _ in waiting], run_async([fn(**kwargs) for _, fn in waiting], guard.timeout))) \
        if waiting else {}
    for name, fn, weight in funcs:
        if name in guard.disabled:
            per_func[name] = [None] * n
            continue
        if name in awaited:
            raw, seconds = awaited[name]
        elif name in slow:
            raw, seconds = finish_call(slow[name], guard.timeout)
        else:
            raw, seconds = finish_call(start_call(fn, kwargs, thread=bool(guard.timeout)), guard.timeout)
        guard.seconds[name] = guard.seconds.get(name, 0.0) + seconds
        if raw is TIMED_OUT:
            guard.timed_out(name, n)
            per_func[name] = [None] * n
            continue
        guard.streak[name] = 0
        if isinstance(raw, BaseException):
            raw = _score_one_by_one(name, fn, prompts, completions, columns, errors, guard)
        if hasattr(raw, "tolist") and getattr(raw, "ndim", None) == 1:  # a numpy array or torch tensor of values
            raw = raw.tolist()
        if not isinstance(raw, (list, tuple)) or len(raw) != n:  # a broken contract, not one odd sample
            got = f"{len(raw)} values" if isinstance(raw, (list, tuple)) else f"a {type(raw).__name__}"
            raise ConfigError(f"reward {name!r} returned {got} for {n} completions: a reward returns a list with one "
                              f"value per completion (None to skip one); fix it and resume the run")
        values = [_as_reward(v) for v in raw]
        guard.not_numbers(name, list(raw), values)
        per_func[name] = values
        for i, v in enumerate(values):
            if v is not None:
                totals[i] = (totals[i] or 0.0) + weight * v
    overflow = [t for t in totals if t is not None and not math.isfinite(t)]
    if overflow:  # finite values whose weighted sum is not (1e308 x 10): skipped, and said like other non-numbers
        guard.not_numbers("the weighted total", overflow, [None] * len(overflow))
        totals = [t if t is None or math.isfinite(t) else None for t in totals]
    return totals, per_func


@dataclass
class RunningCall:
    """A reward call under way (in a thread of its own) or done: its result box and when it started."""
    box: list[Any]
    t0: float
    thread: threading.Thread | None = None


def start_call(fn: Callable, kwargs: dict[str, Any], thread: bool = True) -> RunningCall:
    """Start fn(**kwargs): in a daemon thread of its own (given up on, left running, once past the time limit), or
    with thread False here and now. Its box gets the values or the exception it raised (SystemExit included: the
    caller retries one sample at a time)."""
    running = RunningCall([], time.perf_counter())

    def target() -> None:
        try:
            running.box.append(fn(**kwargs))
        except BaseException as e:  # noqa: BLE001  (a reward's bug costs its samples, not the run; even Ctrl-C in
            running.box.append(e)  # a thread of its own is the reward's error)
        running.box.append(time.perf_counter() - running.t0)

    if not thread:
        try:
            running.box.append(fn(**kwargs))
        except (Exception, SystemExit) as e:  # noqa: BLE001  (here a Ctrl-C stops the run, as it should)
            running.box.append(e)
        running.box.append(time.perf_counter() - running.t0)
        return running
    running.thread = threading.Thread(target=target, name="minigrpo-reward", daemon=True)
    running.thread.start()
    return running


def finish_call(running: RunningCall, timeout: float = 0.0) -> tuple[Any, float]:
    """A started call's (result, seconds): its values or exception, or TIMED_OUT once `timeout` seconds from its
    start have passed (0: wait for it)."""
    if running.thread is not None:
        left = max(0.0, running.t0 + timeout - time.perf_counter()) if timeout else None
        running.thread.join(left)  # a signal (Ctrl-C) still reaches the main thread while it waits
    if len(running.box) < 2:
        return TIMED_OUT, time.perf_counter() - running.t0
    return running.box[0], running.box[1]


_LOOP: asyncio.AbstractEventLoop | None = None  # the async rewards' event loop, in a thread of its own


def run_async(coroutines: list[Any], timeout: float = 0.0) -> list[tuple[Any, float]]:
    """Await the coroutines together on the rewards' event loop: one loop, kept in a daemon thread for the whole
    process (a reward may keep a loop-bound client, an HTTP session, from one batch to the next; and it works where
    a loop already runs, e.g. Jupyter); each result, the exception it raised, or TIMED_OUT (cancelled after
    `timeout` seconds; a loop blocked by a reward that never awaits is given up for a new one)."""
    global _LOOP
    if _LOOP is None or _LOOP.is_closed():
        _LOOP = asyncio.new_event_loop()
        threading.Thread(target=_LOOP.run_forever, name="minigrpo-rewards", daemon=True).start()

    async def caught(coroutine: Any) -> tuple[Any, float]:
        t0 = time.perf_counter()
        try:
            return await coroutine, time.perf_counter() - t0
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001  (SystemExit would stop the loop's thread)
            return e, time.perf_counter() - t0

    async def gather() -> list[tuple[Any, float]]:
        t0 = time.perf_counter()
        tasks = [asyncio.ensure_future(caught(c)) for c in coroutines]
        _, pending = await asyncio.wait(tasks, timeout=timeout or None)
        for task in pending:
            task.cancel()
        return [(TIMED_OUT, time.perf_counter() - t0) if task in pending else task.result() for task in tasks]

    t0 = time.perf_counter()
    future = asyncio.run_coroutine_threadsafe(gather(), _LOOP)
    try:
        return future.result(timeout + 1 if timeout else None)
    except concurrent.futures.TimeoutError:  # the loop itself is stuck (a blocking call in an async reward)
        _LOOP = None
        return [(TIMED_OUT, time.perf_counter() - t0)] * len(coroutines)


_REPORTED: set[str] = set()  # reward functions whose first traceback has been printed


def _score_one_by_one(name: str, fn: Callable, prompts: list[Any], completions: list[Any], columns: dict[str, list],
                      errors: dict[str, int] | None, guard: RewardGuard) -> list[object]:
    """After a batch call raised: each sample alone, so a sample that breaks the function costs only itself (a
    sample past the time limit ends the retries: the rest are skipped for this function)."""
    out: list[object] = []
    for i in range(len(completions)):
        kwargs = {"prompts": prompts[i:i + 1], "completions": completions[i:i + 1],
                  **{k: v[i:i + 1] for k, v in columns.items()}}
        value, _ = run_async([fn(**kwargs)], guard.timeout)[0] if inspect.iscoroutinefunction(fn) \
            else finish_call(start_call(fn, kwargs, thread=bool(guard.timeout)), guard.timeout)
        if value is TIMED_OUT:
            guard.timed_out(name, len(completions) - i)
            return out + [None] * (len(completions) - i)
        if hasattr(value, "tolist") and getattr(value, "ndim", None) == 1:
            value = value.tolist()
        if isinstance(value, BaseException):
            if errors is not None:
                errors[name] = errors.get(name, 0) + 1
            if name not in _REPORTED:
                _REPORTED.add(name)
                trace = "".join(traceback.format_exception(value))
                print(f"reward {name!r} raised on a sample (scored None, run goes on; later errors only "
                      f"counted in train/reward_errors):\n{trace}", file=sys.stderr, flush=True)
            out.append(None)
        else:
            out.append(value[0] if isinstance(value, (list, tuple)) and len(value) == 1 else None)
    return out
