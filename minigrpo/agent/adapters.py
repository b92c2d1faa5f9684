"""Adapters: the field's own environment libraries as minigrpo environments (agent/env.py's protocol).

Both libraries are optional (heavy: fastapi, gradio, mcp, anthropic ...): `pip install openenv-core` /
`pip install verifiers`; they are imported when an adapter is made, and a missing one is a ConfigError saying
what to install. Written against openenv-core 0.3.0 and verifiers 0.4.0 (tests/unit/test_env_adapters.py).

OpenEnv (`openenv-core`, `environment: openenv:package.module:Class`). Its environments are gym's, typed:
`reset() -> Observation`, `step(Action) -> Observation`, pydantic models whose `reward` and `done` fields are what
minigrpo reads; the rest of an observation is the environment's own (echo's `echoed_message`). The class is
run in-process (an `openenv.core.Environment`, what OpenEnv's servers wrap), or `make` returns a client of one
served elsewhere (an `EnvClient`, async, driven through its own `.sync()`; its StepResult carries the same
three). Three mappings, each a parameter of `openenv_environment` (from Python):
- `action(text) -> Action`: by default the environment's action type (step()'s annotation, or the client's
  `EnvClient[Action, ...]`) built from its one required `str` field (echo's `message`); other actions (tool
  calls, moves parsed from the text) need their own function;
- `observe(observation) -> str | messages`: what the model is told; by default the observation's one text
  field, else its own fields as JSON;
- `reset(row) -> dict`: reset()'s keyword arguments for the trajectory's dataset row (e.g. its seed); none by
  default. The observation reset() returns is not shown: the model's prompt is the row's, as for every
  minigrpo environment (a dataset made of the environment's first observations shows them).

verifiers (PrimeIntellect's, 0.4: its `verifiers.v1` stack; `environment: verifiers:TASKSET` or
`verifiers:ENV+TASKSET`, its own ids and spelling, loaded by `vf.load_environment`). There an environment is a
program, `Env.run(task, agents)`, that talks to its agents' seats: `agent.interaction(task)` then
`turn(message) -> Segment` (the env plays the user, the model behind the seat answers; a game engine or a
checker decides what comes next) or `agent.run(task)` (one reply); `Task.score(trace)` runs the task's
`@vf.reward` methods over the conversation. The adapter puts minigrpo's policy in the env's one seat: reset(row)
builds the task from the row (its prompt from `prompt` / `question`, TaskData's other fields by name: `answer`,
`info` ...) and starts run() on a private event loop until it asks the seat for its opening reply (what minigrpo
generates on the row's prompt); each step(text) is the seat's reply, and run() goes on until it asks again (its
message is Step.messages) or returns (done). The reward is the task's score (its rewards that need no sandbox,
plus what run() recorded itself: verifiers' weighted `trace.reward`), given at each step as the change since the
last one, so a trajectory's sum is its score where it ended, whether run() ended it or minigrpo's `max_turns`
did. The seat's own `max_turns` (verifiers' AgentConfig) is honoured as verifiers does: a further turn is
refused (`terminated`). What does not fit: envs with more than one seat (user-sim: the user is a second model),
tasks an env opens itself (prompt None: verifiers' openenv and user-sim envs; minigrpo's prompt is the row's),
tools the harness would run in a sandbox, judges that call a model, and the taskset's system prompt (minigrpo
renders its own prompts).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import inspect
import json
import threading
import typing
import weakref
from collections.abc import Callable
from typing import Any

from minigrpo.compat import verifiers_message, verifiers_seats, verifiers_state, verifiers_text
from minigrpo.errors import ConfigError

PACKAGES = {"openenv": "openenv-core", "verifiers": "verifiers"}  # import name -> what pip installs
OBSERVATION_BASE = ("done", "reward", "metadata")  # openenv's Observation fields, read as Step's, never shown


def _require(module: str) -> Any:
    """The optional library's module, or a ConfigError saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        raise ConfigError(f"environment: the {top} adapter needs {PACKAGES[top]}, which is not installed: "
                          f"pip install {PACKAGES[top]} ({e})") from e


# ---- OpenEnv -----------------------------------------------------------------------------------------------

def openenv_environment(make: Callable[[], Any], *, action: Callable[[str], Any] | None = None,
                        observe: Callable[[Any], Any] | None = None,
                        reset: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                        ) -> Callable[[], OpenEnvAdapter]:
    """A factory of minigrpo environments over an OpenEnv environment: `make` is its class (an in-process
    `openenv.core.Environment`) or a function returning one, or a client (`EnvClient`) of one served elsewhere;
    `action`, `observe` and `reset` map text to actions, observations to messages and the row to reset()'s
    arguments (module docstring). An action type that cannot be built from text is a ConfigError here when `make`
    is a class."""
    _require("openenv.core")
    if action is None and isinstance(make, type):
        action = text_action(make)  # checked once, now: a ConfigError before any rollout
    return functools.partial(OpenEnvAdapter, make, action=action, observe=observe, reset=reset)


class OpenEnvAdapter:
    """One trajectory against an OpenEnv environment (or a client of one): reset(row), then step(text) ->
    Step(observation, its reward, its done); the environment is closed when it says done, or at `close()` (the
    batch is over, however minigrpo ended the trajectory)."""

    def __init__(self, make: Callable[[], Any], *, action: Callable[[str], Any] | None = None,
                 observe: Callable[[Any], Any] | None = None,
                 reset: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        env = make()
        if inspect.iscoroutinefunction(getattr(env, "step", None)) and callable(getattr(env, "sync", None)):
            env = env.sync()  # an async EnvClient: OpenEnv's own synchronous wrapper (a private loop thread)
        self.env = env
        self.action = action or text_action(env)
        self.observe = observe or observation_text
        self.reset_kwargs = reset or (lambda row: {})
        self.closed = False

    def reset(self, row: dict[str, Any]) -> None:
        self.env.reset(**self.reset_kwargs(row))

    def step(self, text: str) -> tuple[Any, float | None, bool]:
        result = self.env.step(self.action(text))
        # a client's StepResult(observation, reward, done), or an in-process Observation carrying both
        observation = getattr(result, "observation", result)
        reward, done = result.reward, bool(result.done)
        if done:
            self.close()
        # (messages, reward, done): env.as_step's tuple form (a Step would import env.py, which imports this)
        return None if done else self.observe(observation), None if reward is None else float(reward), done


    def close(self) -> None:
        """Close the environment once (a client's connection, the container it started)."""
        if not self.closed and callable(getattr(self.env, "close", None)):
            self.closed = True
            self.env.close()


def action_type(env: Any) -> type | None:
    """The Action subclass an OpenEnv environment (class or instance) or client steps with: step()'s annotation,
    else the `EnvClient[Action, Observation, State]` it subclasses; None if it names none (a dict client)."""
    base = _require("openenv.core").Action
    kind = env if isinstance(env, type) else type(getattr(env, "async_client", env))  # SyncEnvClient: its client
    try:
        hint = typing.get_type_hints(kind.step).get("action")
    except Exception:  # an annotation that does not resolve: look at the generic parameters instead
        hint = None
    candidates = [hint] + [a for base in getattr(kind, "__orig_bases__", ()) for a in typing.get_args(base)]
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, base) and c is not base), None)


def text_action(env: Any) -> Callable[[str], Any]:
    """text -> the environment's action, built from its action type's one required `str` field; a ConfigError
    when there is no such type or field (pass `action=` then)."""
    kind = action_type(env)
    name = getattr(env, "__name__", type(env).__name__)
    if kind is None:
        raise ConfigError(f"environment: OpenEnv {name} names no Action type to build from the model's text; pass "
                          f"openenv_environment(..., action=lambda text: YourAction(...))")
    fields = [n for n, f in kind.model_fields.items() if f.is_required() and f.annotation is str]
    if len(fields) != 1:
        raise ConfigError(f"environment: OpenEnv {name}'s action {kind.__name__} has required text fields {fields}, "
                          f"not one to put the model's text in; pass openenv_environment(..., action=...)")
    return lambda text: kind(**{fields[0]: text})


def observation_text(observation: Any) -> str:
    """What the model is told of an OpenEnv observation (a pydantic model, or a dict from a generic client): its
    one text field, else its own fields (all but done, reward, metadata) as JSON."""
    fields = observation.model_dump() if hasattr(observation, "model_dump") else dict(observation)
    own = {k: v for k, v in fields.items() if k not in OBSERVATION_BASE}
    texts = [v for v in own.values() if isinstance(v, str)]
    return texts[0] if len(texts) == 1 else json.dumps(own, default=str)


# ---- verifiers ---------------------------------------------------------------------------------------------

def verifiers_environment(env: Any) -> Callable[[], VerifiersAdapter]:
    """A factory of minigrpo environments over a verifiers environment: `env` is an id as verifiers spells it
    (`TASKSET`, or `ENV+TASKSET` for an env paired with a taskset; the taskset's package must be installed), an
    `EnvConfig`, or a loaded `vf.Env`. Loaded once here (a ConfigError says why not); one event loop serves all
    its trajectories, which minigrpo steps one after another (in a thread of its own: it runs whether or not an
    event loop already runs in the caller's thread, as in a notebook)."""
    vf = _require("verifiers.v1")
    if not isinstance(env, vf.Env):
        config = env
        if isinstance(env, str):
            env_id, _, taskset = env.rpartition("+")
            config = {"id": env_id, "taskset": {"id": taskset}}
        try:
            env = vf.load_environment(vf.resolve_env_config(config))
        except Exception as e:  # a missing taskset package, a bad config: verifiers' own message says which
            raise ConfigError(f"environment: verifiers cannot load {config!r}: {e}") from e
    seats = verifiers_seats(env.config)
    if len(seats) != 1:
        raise ConfigError(f"environment: verifiers {type(env).__name__} has seats {seats}; minigrpo's policy takes "
                          f"one, and an env with several (a modelled user, a judge) needs models for the others")
    return functools.partial(VerifiersAdapter, env, _background_loop())


def _background_loop() -> asyncio.AbstractEventLoop:
    """A new event loop running in a daemon thread of its own."""
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="minigrpo-verifiers", daemon=True).start()
    return loop


class VerifiersAdapter:
    """One trajectory of a verifiers env: its run() goes on the adapter's event loop (in its own thread), paused
    whenever it waits for the seat's reply (module docstring)."""

    def __init__(self, env: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.env, self.loop = env, loop
        self.episode: _Episode | None = None
        self.main: asyncio.Future | None = None

    def _run(self, coroutine: Any) -> Any:
        """Await `coroutine` on the adapter's loop from this (synchronous) thread."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def reset(self, row: dict[str, Any]) -> None:
        self.episode = _Episode(self.env, task_from_row(self.env, row))

        async def start() -> tuple[asyncio.Future, Any]:
            main = asyncio.ensure_future(self.episode.play())
            return main, await self.episode.next_ask(main)

        self.main, asked = self._run(start())
        weakref.finalize(self, _abandon, self.loop, self.main)  # dropped without close(): cancel its run() anyway
        if asked is not None:
            raise RuntimeError(f"verifiers {type(self.env).__name__}.run() did not ask for the opening reply to the "
                               f"task's prompt (the dataset row's)")

    def step(self, text: str) -> tuple[Any, float, bool]:
        async def answer() -> tuple[Any, float]:
            self.episode.replies.put_nowait(text)
            asked = await self.episode.next_ask(self.main)
            return asked, await self.episode.score_change()

        asked, reward = self._run(answer())
        return (None, reward, True) if asked is _END else (asked, reward, False)  # as OpenEnvAdapter.step

    def close(self) -> None:
        """Cancel a run() still waiting for a reply (minigrpo ended the trajectory: max_turns, the budget) and let it
        unwind its `async with` blocks."""
        if self.main is not None and not self.main.done():
            async def cancel() -> None:
                self.main.cancel()
                await asyncio.gather(self.main, return_exceptions=True)

            self._run(cancel())


_END = object()  # run() returned: the trajectory is over


def _abandon(loop: asyncio.AbstractEventLoop, main: asyncio.Future) -> None:
    """A trajectory dropped without close(): cancel its run() on the adapter's loop (without waiting)."""
    if not loop.is_closed():
        loop.call_soon_threadsafe(main.cancel)


def task_from_row(env: Any, row: dict[str, Any]) -> Any:
    """The env's Task for a dataset row: its prompt from `prompt` (or `question`), TaskData's other fields by
    name (`answer`, `info` ...); pydantic's error names a missing one."""
    task_cls = type(env.taskset).task_type()
    data_cls = task_cls.data_type()
    fields = {k: v for k, v in row.items() if k in data_cls.model_fields and k not in ("prompt", "idx")}
    return task_cls(data_cls(**fields, prompt=row.get("prompt", row.get("question"))), env.taskset.config.task)


class _Episode:
    """One run() of a verifiers env with minigrpo's policy in its seat: the queues between them (what run() asks,
    what the policy replies), the seat's trace, and the score given so far."""

    def __init__(self, env: Any, task: Any) -> None:
        vf = _require("verifiers.v1")
        self.env, self.task = env, task
        self.asks: asyncio.Queue = asyncio.Queue()
        self.replies: asyncio.Queue = asyncio.Queue()
        self.seat: _Exchange | None = None
        self.scored = 0.0
        self.agents = vf.Agents(env.config, lambda name, config: _Seat(self, name, config))

    async def play(self) -> None:
        """The env's own episode: setup, run, finalize (verifiers' Env.run_episode, without its agents' sandboxes)."""
        vf = _require("verifiers.v1")
        await self.env.setup(self.agents)
        await self.env.run(self.task, self.agents)
        if self.seat is None:
            raise RuntimeError(f"verifiers {type(self.env).__name__}.run() never opened its seat")
        episode = vf.Episode(env=vf.EnvInfo(id=self.env.config.env_id), task=self.seat.trace.task,
                             traces=[self.seat.trace])
        await self.env.finalize(self.task, episode)

    async def next_ask(self, main: asyncio.Task) -> Any:
        ask = asyncio.ensure_future(self.asks.get())
        await asyncio.wait({ask, main}, return_when=asyncio.FIRST_COMPLETED)
        if ask.done():
            return ask.result()
        ask.cancel()
        main.result()  # run()'s error, if it raised
        return _END

    async def score_change(self) -> float:
        """The task's score of the conversation so far (its runtime-free rewards plus those run() recorded), less
        what earlier steps gave."""
        await self.seat.task.score(self.seat.trace)
        total = self.seat.trace.reward
        change, self.scored = total - self.scored, total
        return change


class _Seat:
    """minigrpo's policy where verifiers has an Agent: what an env's run() calls on it (interaction, run,
    trainable)."""

    trainable = True

    def __init__(self, episode: _Episode, name: str, config: Any) -> None:
        self.episode, self.name, self.config = episode, name, config

    @contextlib.asynccontextmanager
    async def interaction(self, task: Any, **_: Any):
        if self.episode.seat is not None:
            raise RuntimeError("the env opened its seat twice; minigrpo plays one conversation per trajectory")
        self.episode.seat = _Exchange(self.episode, task, self.name, self.config)
        yield self.episode.seat

    async def run(self, task: Any, **_: Any) -> Any:
        """One reply to the task's prompt (verifiers' single-turn run)."""
        async with self.interaction(task) as exchange:
            await exchange.turn()
        return exchange.trace


class _Exchange:
    """The seat's conversation, what verifiers' Interaction offers run(): turn(message) -> Segment, and the trace
    (a real vf.Trace: the prompt, the env's messages and the policy's replies) its rewards read."""

    def __init__(self, episode: _Episode, task: Any, name: str, config: Any) -> None:
        vf = _require("verifiers.v1")
        state = verifiers_state(task)  # the task's State, as verifiers' Rollout makes it
        self.episode, self.task, self.config = episode, task, config
        self.trace = vf.Trace(task=vf.TraceTask(type=type(task).__name__, data=task.data, key=task.key,
                                                hash=task.hash),
                              state=state, agent=vf.AgentInfo(config=config, name=name))
        data = task.data
        if data.system_prompt:
            self._add(vf.SystemMessage(content=data.system_prompt))
        for message in self._messages(data.prompt) if data.prompt is not None else []:
            self._add(message)

    async def turn(self, message: Any = None) -> Any:
        vf = _require("verifiers.v1")
        if self.config.max_turns is not None and self.trace.num_turns >= self.config.max_turns:
            self.trace.stop("max_turns")  # verifiers refuses the turn: the exchange is over
            return vf.Segment(messages=[], terminated=True)
        if (message is None) != (self.trace.num_turns == 0):
            raise RuntimeError("the env opened the exchange itself (a prompt-less task) or asked for a reply with "
                               "nothing to reply to; with minigrpo the dataset row's prompt opens it, then each "
                               "turn(message) answers the last reply")
        said = self._messages(message) if message is not None else []
        for m in said:
            self._add(m)
        await self.episode.asks.put([{"role": m.role, "content": verifiers_text(m.content)} for m in said] or None)
        reply = vf.AssistantMessage(content=await self.episode.replies.get())
        self._add(reply, sampled=True)
        return vf.Segment(messages=[reply])

    def _messages(self, value: Any) -> list[Any]:
        vf = _require("verifiers.v1")
        if isinstance(value, str):
            return [vf.UserMessage(content=value)]
        return [verifiers_message(m) if isinstance(m, dict) else m for m in value]  # wire dicts -> typed

    def _add(self, message: Any, sampled: bool = False) -> None:
        nodes = self.trace.nodes
        node = _require("verifiers.v1").MessageNode(parent=len(nodes) - 1 if nodes else None, message=message,
                                                    sampled=sampled)  # one path: each message follows the last
        nodes.append(node)
