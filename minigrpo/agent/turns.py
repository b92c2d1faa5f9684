"""Multi-turn rollouts: what happens when an assistant turn ends, shared by every backend that runs them.

A rollout backend generates every row of a batch at once; when a row's assistant turn ends (EOS, or a stop
string), it hands the turn's tokens to `Episodes.end_turn`, which answers with the tokens to append (tool
messages rendered by the chat template, then the next assistant header) or None: the trajectory is over.
The backend appends those tokens to the row (the engine extends the row's KV cache with them, one decode step
each, while other rows go on generating), marks them in `Rollout.tool_mask` (they are in the context, never in
the loss), and generation continues, up to `max_turns` assistant turns and `max_completion_length` tokens in
all (the whole trajectory). The completion a reward sees is the whole trajectory's text.

`MultiTurn` is the configuration (tools or an environment, max_turns, tool_timeout); `begin` makes the state of
one batch. With an environment (agent/env.py) the environment answers each turn instead of the tools; it needs
the batch's dataset rows (`bound`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from minigrpo.agent.env import EnvironmentSet, load_environment
from minigrpo.agent.tools import load_tool, parse_tool_calls, run_calls, tool_name

MARK = "\x00MINIGRPO-TURN\x00"  # stands for an assistant turn's content while rendering what follows it


@dataclass
class MultiTurn:
    """Tools the model may call, and the limits of a trajectory."""
    tools: list[Callable] = field(default_factory=list)
    max_turns: int = 4  # assistant turns per trajectory
    tool_timeout: float = 10.0  # seconds per tool call, then the model is told it timed out
    environment: Callable[[], Any] | None = None  # makes one environment per trajectory (agent/env.py)
    rows: list[dict[str, Any]] | None = None  # with an environment: each trajectory's dataset row (`bound`)

    def bound(self, rows: list[dict[str, Any]], n: int) -> MultiTurn:
        """These settings for a batch of `rows` (dataset rows, `n` trajectories each, in the backends' order: each
        prompt's n samples together): what an environment is reset with. Without one, unchanged."""
        return self if self.environment is None else replace(self, rows=[row for row in rows for _ in range(n)])

    def begin(self, tokenizer: Any, eos: list[int], rows: int) -> Episodes:
        return Episodes(self, tokenizer, eos, rows)


def multi_turn(cfg: Any) -> MultiTurn | None:
    """The run's multi-turn settings (its tools or environment loaded: a ConfigError names a bad one), or None:
    single-turn."""
    if not cfg.tools and not cfg.environment:
        return None
    return MultiTurn(tools=[load_tool(t) for t in cfg.tools], max_turns=cfg.max_turns, tool_timeout=cfg.tool_timeout,
                     environment=load_environment(cfg.environment) if cfg.environment else None)


class Episodes:
    """The multi-turn state of one batch of `rows` trajectories: per row its turns (the one being generated
    included), tool calls and their errors and seconds (`stats`, what `Rollout.stats` carries), and whether the
    token budget cut it (`cut`: an answer that did not fit)."""

    def __init__(self, spec: MultiTurn, tokenizer: Any, eos: list[int], rows: int) -> None:
        self.spec, self.tokenizer, self.eos = spec, tokenizer, set(eos)
        self.tools = {tool_name(fn): fn for fn in spec.tools}
        self.stats: dict[str, list[float]] = {"turns": [1.0] * rows, "tool_calls": [0.0] * rows,
                                              "tool_errors": [0.0] * rows, "tool_s": [0.0] * rows}
        self.cut = [False] * rows
        self.pending: dict[int, dict[str, float]] = {}  # this end_turn's tool use per row, until delivered
        self.envs: EnvironmentSet | None = None
        if spec.environment is not None:
            if spec.rows is None or len(spec.rows) != rows:
                raise ValueError(f"an environment needs each trajectory's row: MultiTurn.bound(rows, n) for {rows} "
                                 f"trajectories (got {None if spec.rows is None else len(spec.rows)})")
            self.envs = EnvironmentSet(spec.environment, spec.rows)
            self.stats |= {"env_reward": list(self.envs.reward), "env_errors": list(self.envs.errors),
                           "env_s": list(self.envs.seconds)}

    def finish(self) -> dict[str, list[float]]:
        """The batch is over: every environment that has a `close()` is closed (those minigrpo ended too: max_turns,
        the budget, an error), and the per-row stats are returned."""
        if self.envs is not None:
            self.envs.close()
        return self.stats

    def end_turn(self, rows: list[int], turns: list[list[int]], room: list[int]) -> list[list[int] | None]:
        """Rows whose assistant turn just ended, that turn's tokens, and how many tokens each row may still take:
        per row the tokens to append (the answer's messages rendered, then the next assistant header), or None
        when its trajectory is over: the turn asked for nothing, max_turns is reached, or the answer and one more
        token would not fit (then `cut`: the budget ended it, a truncated completion)."""
        texts = self.tokenizer.batch_decode(turns, skip_special_tokens=True)
        # a row with no turn left, or no room for even a one-token answer and a token after it, asks nothing
        going = [i for i, r in enumerate(rows) if self.stats["turns"][r] < self.spec.max_turns and room[i] > 2]
        if self.envs is not None:  # a last turn is still stepped: the environment scores it
            for i in sorted(set(range(len(rows))) - set(going)):
                self.envs.step(rows[i], texts[i])
                self.envs.over[rows[i]] = True
        self.pending = {}
        replies = self.respond([rows[i] for i in going], [texts[i] for i in going])
        if self.envs is not None:
            for key, values in (("env_reward", self.envs.reward), ("env_errors", self.envs.errors),
                                ("env_s", self.envs.seconds)):
                for r in rows:
                    self.stats[key][r] = values[r]
        out: list[list[int] | None] = [None] * len(rows)
        for i, messages in zip(going, replies):
            if not messages:
                continue
            r, ids = rows[i], turns[i]
            eos_text = self.tokenizer.decode(ids[-1:]) if ids and ids[-1] in self.eos else ""
            answer = render_after_turn(self.tokenizer, messages, eos_text)
            if len(answer) < room[i]:
                out[i] = answer
                self.stats["turns"][r] += 1
                for key, value in self.pending.get(r, {}).items():  # counted once the model gets the answers
                    self.stats[key][r] += value
            else:
                self.cut[r] = True
        return out

    def respond(self, rows: list[int], texts: list[str]) -> list[list[dict[str, str]] | None]:
        """The messages that answer each row's turn (`texts`), or None: nothing to answer, the trajectory is over.
        Here: the environment's answer, one row after another; else the turn's tool calls, run concurrently for all
        rows, one `tool` message each."""
        if self.envs is not None:
            return [self.envs.step(r, text) for r, text in zip(rows, texts)]
        plans = [parse_tool_calls(text, self.tools) if self.tools else [] for text in texts]
        flat = [c for calls in plans for c in calls]
        answers = iter(run_calls(flat, self.tools, self.spec.tool_timeout) if flat else [])
        out: list[list[dict[str, str]] | None] = []
        for r, calls in zip(rows, plans):
            messages, used = [], {"tool_calls": 0.0, "tool_errors": 0.0, "tool_s": 0.0}
            for call in calls:
                text, failed, seconds = next(answers)
                used["tool_calls"] += 1
                used["tool_errors"] += failed
                used["tool_s"] += seconds
                messages.append({"role": "tool", "name": call.name, "content": text})
            self.pending[r] = used  # what end_turn adds to `stats` when the answer is delivered
            out.append(messages or None)
        return out


def render_after_turn(tokenizer: Any, messages: list[dict[str, str]], eos_text: str = "") -> list[int]:
    """What the chat template writes after an assistant turn's content when `messages` follow it, through the
    next assistant header (`add_generation_prompt`), as token ids. The turn ends as the template ends it (e.g.
    `<|im_end|>\\n`); when the model ended its turn with an EOS (`eos_text`, its text) that starts that ending,
    it is not repeated."""
    base = [{"role": "user", "content": "?"}, {"role": "assistant", "content": MARK}]
    full = tokenizer.apply_chat_template(base + messages, tokenize=False, add_generation_prompt=True)
    after = full[full.index(MARK) + len(MARK):]
    if eos_text and after.startswith(eos_text):
        after = after[len(eos_text):]
    return tokenizer(after, add_special_tokens=False).input_ids


def turn_end_id(tokenizer: Any) -> int:
    """The token the chat template ends an assistant turn with (`<|im_end|>`, `<end_of_turn>`, `<|eot_id|>`; the
    EOS when the template writes none): what SFT ends each assistant turn of a conversation with, so that the
    tokens it trains on are the ones a rollout produces and feeds."""
    base = [{"role": "user", "content": "?"}, {"role": "assistant", "content": MARK}]
    full = tokenizer.apply_chat_template(base, tokenize=False)
    after = tokenizer(full[full.index(MARK) + len(MARK):], add_special_tokens=False).input_ids
    return after[0] if after else tokenizer.eos_token_id
