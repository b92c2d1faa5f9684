"""Environments: multi-turn tasks that answer the model themselves, one instance per trajectory.

The protocol (gym's, in text), what `environment: package.module:Class` names:

    class MyEnv:
        def reset(self, row: dict) -> None:       # the dataset row of this trajectory (its prompt is the row's)
            ...
        def step(self, text: str) -> Step:        # the assistant turn's text
            return Step(messages="Too low.", reward=0.0, done=False)
        def close(self) -> None:                  # optional: called once the batch is over, however it ended
            ...

`Step.messages` is what the environment says next (a string is one `user` message; a list of messages is taken as
it is, rendered by the chat template); `reward` (optional) adds to the trajectory's reward; `done` ends the
trajectory. A tuple `(messages, reward, done)` is accepted for `Step`. The trajectory also ends at `max_turns`,
at the token budget, and when the environment has nothing to say. Its last turn is stepped too (its reward
counts) even when no turn may follow it; a turn the token budget cuts is not (the trajectory is a truncated
completion: `mask_truncated_completions` leaves it out of the loss). The sum of a trajectory's rewards is the
column `environment_reward`, which the built-in reward `environment` returns (`reward_funcs: [environment]`;
other rewards read the column too). An environment that raises (in its factory, reset or step) or answers with
something that is not a Step ends its trajectory, which the reward `environment` then does not score (None, as a
reward that raised); the errors are counted (`env/errors`, the first one's traceback printed) and never stop
the run. Steps run one after another, without a time limit (`env/env_s` logs their seconds).

The field's own environment libraries come through adapters (agent/adapters.py, each library optional), named
by a prefix that says whose id follows and then the library's own way of naming an environment:
`openenv:package.module:Class` (an OpenEnv Environment class, run in-process; OpenEnv names environments by
import path) and `verifiers:TASKSET` / `verifiers:ENV+TASKSET` (verifiers' ids, loaded by its own
`load_environment`). A prefix, not a guess from the name: `package.module:Class` stays minigrpo's own protocol.
From Python, `openenv_environment(...)` and `verifiers_environment(...)` take the mappings and objects a string
cannot. `Retry` below is a small built-in example: a second chance after "not right".
"""

from __future__ import annotations

import math
import numbers
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from minigrpo.config import import_named
from minigrpo.errors import ConfigError
from minigrpo.tasks.answers import extract_answer, is_correct


@dataclass
class Step:
    """What an environment answers to one assistant turn."""
    messages: str | list[dict[str, str]] | None = None  # None / "" / []: nothing to say: the trajectory ends
    reward: float | None = None
    done: bool = False


class Retry:
    """The model may try again: a wrong answer gets "N is not right. Try again." (no answer: "Give the answer as
    #### N.") and another turn; a right one ends the trajectory with reward 1 on the first try, `reward_after_miss`
    after a miss, none if never. Reads the row's `answer` column (the gold final answer)."""

    reward_after_miss = 0.5

    def reset(self, row: dict[str, Any]) -> None:
        self.gold, self.misses = row["answer"], 0

    def step(self, text: str) -> Step:
        if is_correct(text, self.gold):
            return Step(reward=1.0 if self.misses == 0 else self.reward_after_miss, done=True)
        self.misses += 1
        said = extract_answer(text)
        return Step(messages=f"{said} is not right. Try again." if said is not None else "Give the answer as #### N.",
                    reward=0.0)


ENVIRONMENTS: dict[str, Callable[[], Any]] = {"retry": Retry}


def load_environment(name: str | Callable[[], Any]) -> Callable[[], Any]:
    """A factory of environments: a built-in by name, `package.module:Class` (or a function returning an
    instance), `openenv:package.module:Class`, `verifiers:TASKSET` / `verifiers:ENV+TASKSET` (adapters.py), or a
    factory handed over from Python. A ConfigError names what is missing."""
    from minigrpo.agent import adapters  # imports Step from here; its libraries only when a prefix asks for them

    if callable(name):
        factory = name
    elif name in ENVIRONMENTS:
        factory = ENVIRONMENTS[name]
    elif name.startswith("openenv:"):
        path = name.removeprefix("openenv:")
        if ":" not in path:
            raise ConfigError(f"environment {name!r}: name the OpenEnv Environment class, "
                              f"'openenv:package.module:Class'")
        factory = adapters.openenv_environment(import_named("environment", path, "OpenEnv environment", []))
    elif name.startswith("verifiers:"):
        factory = adapters.verifiers_environment(name.removeprefix("verifiers:"))
    elif name.startswith("python:"):  # config.function_name: a class only Python can pass again
        raise ConfigError(f"environment {name!r} was a class handed over from Python (defined in a script); pass it "
                          f"again from Python (GRPOConfig(environment=...)), or make it importable and name it "
                          f"'package.module:Class'")
    else:  # a class with reset(row) and step(text) -> Step
        factory = import_named("environment", name, "environment", list(ENVIRONMENTS))
    kind = factory if isinstance(factory, type) else None
    if kind is not None and not all(callable(getattr(kind, m, None)) for m in ("reset", "step")):
        raise ConfigError(f"environment: {kind.__name__} needs reset(row) and step(text) methods")
    return factory


def as_step(result: Any) -> Step:
    """An environment's answer as a checked Step (from a Step, or a (messages, reward, done) tuple): its messages
    a list of {"role", "content"} dicts (a string: one user message) or None, its reward a float or None. A
    TypeError says what is wrong."""
    if isinstance(result, tuple) and len(result) == 3:
        result = Step(*result)
    if not isinstance(result, Step):
        raise TypeError(f"step() must return a Step or a (messages, reward, done) tuple, got {type(result).__name__}")
    messages = result.messages or None
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    elif messages is not None and not (isinstance(messages, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)):
        raise TypeError(f"Step.messages must be a string or a list of {{'role', 'content'}} dicts, got {messages!r}")
    reward = result.reward
    if reward is not None and (isinstance(reward, bool) or not isinstance(reward, numbers.Real)):
        raise TypeError(f"Step.reward must be a number or None, got {reward!r}")
    return Step(messages, None if reward is None else float(reward), bool(result.done))


class EnvironmentSet:
    """The environments of one batch: one per trajectory, reset with its row; `step` answers the rows whose turn
    ended, and keeps per row the reward so far, whether it is over, and its errors and seconds."""

    def __init__(self, factory: Callable[[], Any], rows: list[dict[str, Any]]) -> None:
        self.envs: list[Any] = [None] * len(rows)
        self.reward = [0.0] * len(rows)  # NaN once the environment failed: no score (the reward gives None)
        self.over = [False] * len(rows)
        self.errors = [0.0] * len(rows)
        self.seconds = [0.0] * len(rows)
        self.shown = False  # one traceback per batch; the rest are counted
        for r, row in enumerate(rows):
            self._guarded(r, lambda r=r, row=row: self._reset(r, row, factory))

    def _reset(self, r: int, row: dict[str, Any], factory: Callable[[], Any]) -> None:
        self.envs[r] = factory()
        self.envs[r].reset(row)

    def _guarded(self, r: int, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return fn()
        except Exception:  # a user's environment: its error ends this trajectory, never the run
            self.errors[r] += 1
            self.over[r] = True
            self.reward[r] = math.nan
            if not self.shown:
                self.shown = True
                print(f"environment error (trajectory {r} ends unscored; env/errors counts the others):\n"
                      f"{traceback.format_exc(limit=-3)}")
            return None
        finally:
            self.seconds[r] += time.perf_counter() - t0

    def close(self) -> None:
        """Close every environment that has a `close()` (an OpenEnv client, a container); an error there is printed
        (the first one of the batch), never the run's end."""
        for r, env in enumerate(self.envs):
            if env is not None and callable(getattr(env, "close", None)):
                try:
                    env.close()
                except Exception:  # a user's environment: its close failing leaves its trajectory scored
                    if not self.shown:
                        self.shown = True
                        print(f"environment error while closing (trajectory {r}; its reward stands):\n"
                              f"{traceback.format_exc(limit=-3)}")
            self.envs[r] = None

    def step(self, r: int, text: str) -> list[dict[str, str]] | None:
        """Row r's turn `text`: the messages that answer it, or None: the trajectory is over."""
        if self.over[r]:
            return None
        result = self._guarded(r, lambda: as_step(self.envs[r].step(text)))
        if result is None:
            return None
        if result.reward is not None:
            self.reward[r] += result.reward
        messages = None if result.done else result.messages
        self.over[r] = messages is None
        return messages
