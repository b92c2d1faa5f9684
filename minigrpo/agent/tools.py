"""Tools a model may call during a rollout: how they are named, described, called and answered.

A tool is a Python function with type hints and a docstring (TRL's convention): its JSON schema comes from the
signature (`transformers.utils.get_json_schema`), the chat template receives the functions as `tools=`. Sync or
async. A call that raises, times out, names an unknown tool or passes bad arguments answers the model with an
error message; it never stops the run.

Calls, in the text of an assistant turn (`parse_tool_calls`):
- the chat-template format of Qwen2.5, SmolLM2, Hermes and ChatML models:
  `<tool_call>{"name": "calculator", "arguments": {"expression": "12 * 7"}}</tool_call>`
  (`arguments` may also be a JSON string of the object);
- the simple format, for models without one: `<tool_call>calculator 12 * 7</tool_call>`: the first word names
  the tool, the rest of the text (stripped) is its first parameter (a number when its type hint says so), so
  `<tool_call>python\nprint(2**10)</tool_call>` runs that code.
Several calls in one turn run concurrently, each answered by its own `tool` message, in order.

Built-in tools (`TOOLS`): `calculator` (exact arithmetic, parsed, never evaluated as code) and `python` (the code
runs in the sandbox, agent/sandbox.py). Others are named `package.module:function`, or handed over from Python.
"""

from __future__ import annotations

import ast
import inspect
import json
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers.utils import get_json_schema

from minigrpo.agent import sandbox
from minigrpo.config import import_named
from minigrpo.errors import ConfigError
from minigrpo.tasks.rewards import TIMED_OUT, finish_call, run_async, start_call

CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
MAX_RESULT_CHARS = 2000  # a tool's answer is cut here (the model's context is the budget)


# ---- built-in tools ----------------------------------------------------------------------------------------------

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly.

    Args:
        expression: numbers with + - * / // % ** and parentheses, e.g. "48213 * 7391 - 12".
    """
    def value(node: ast.AST) -> int | float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 10**6):
                raise ValueError("exponent too large")
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](value(node.operand))
        raise ValueError(f"not arithmetic: {ast.unparse(node)!r}")

    text = expression.replace("×", "*").replace("÷", "/").replace("^", "**").replace(",", "").strip()
    if len(text) > 200:
        raise ValueError("expression too long (200 characters at most)")
    result = value(ast.parse(text, mode="eval").body)
    if isinstance(result, float) and result.is_integer():
        result = int(result)
    return str(result)


def python(code: str) -> str:
    """Run Python code in a sandbox (standard library only, no network, no files kept) and return what it prints.

    Args:
        code: a Python program; print the values you need.
    """
    result = sandbox.run_python(code)
    out = result.stdout
    if result.stopped == "timeout":
        out += f"\n[stopped: over the {sandbox.Limits().wall_s:g} s time limit]"
    elif result.stopped == "output":
        out += "\n[stopped: too much output]"
    elif result.returncode != 0:
        err = result.stderr.strip().splitlines()
        out += "\n" + (err[-1] if err else f"[exit code {result.returncode}]")
    return out.strip()


TOOLS: dict[str, Callable[..., Any]] = {"calculator": calculator, "python": python}


def load_tool(name: str | Callable) -> Callable:
    """A built-in tool by name, `package.module:function`, or a function handed over from Python; a function
    the chat template cannot describe (no docstring, or a parameter without a type hint or a description) is a
    ConfigError naming it."""
    if callable(name):
        fn = name
    elif name in TOOLS:
        fn = TOOLS[name]
        if fn is python and (missing := sandbox.check()):
            raise ConfigError(f"tools: python runs code in a sandbox, and {missing}")
    else:
        fn = import_named("tools", name, "tool", list(TOOLS))
    try:
        get_json_schema(fn)
    except Exception as e:  # transformers' TypeHintParsingException / DocstringParsingException
        raise ConfigError(f"tools: {getattr(fn, '__name__', fn)!r} cannot be described to the model: {e}. A tool "
                          f"needs a docstring with an Args: section and a type hint on every parameter") from e
    return fn


def tool_name(fn: Callable) -> str:
    return get_json_schema(fn)["function"]["name"]


# ---- calls ---------------------------------------------------------------------------------------------------------

@dataclass
class Call:
    """One parsed call: the tool's name and its arguments, or the error that the model's text made (then
    `error` is the message the model gets back, and nothing runs)."""
    name: str
    arguments: dict[str, Any]
    error: str = ""


def parse_tool_calls(text: str, tools: dict[str, Callable]) -> list[Call]:
    """The calls in one assistant turn's text (module docstring), in order; malformed ones as Calls with an error."""
    calls = []
    for body in CALL_RE.findall(text):
        body = body.strip()
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and "name" in obj:  # the JSON format
            name, args = str(obj["name"]), obj.get("arguments", obj.get("parameters", {}))
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    calls.append(Call(name, {}, f"error: the arguments of {name} are not JSON"))
                    continue
            if not isinstance(args, dict):
                calls.append(Call(name, {}, f"error: the arguments of {name} must be an object"))
                continue
        else:  # the simple format: name, then the first parameter's text
            name, _, rest = body.partition(" ") if " " in body.split("\n", 1)[0] else body.partition("\n")
            name, rest = name.strip(), rest.strip()
            args = {}
            if name in tools and (params := get_json_schema(tools[name])["function"]["parameters"]["properties"]):
                param, spec = next(iter(params.items()))
                kind = {"integer": int, "number": float}.get(spec.get("type"), str)
                try:
                    args = {param: kind(rest)}
                except ValueError:
                    calls.append(Call(name, {}, f"error: {name} takes a {spec['type']} {param}, got {rest!r}"))
                    continue
        if name not in tools:
            calls.append(Call(name, {}, f"error: unknown tool {name!r}; tools: {', '.join(tools)}"))
            continue
        calls.append(Call(name, args))
    return calls


def run_calls(calls: list[Call], tools: dict[str, Callable], timeout: float) -> list[tuple[str, bool, float]]:
    """Run the calls concurrently (sync tools each in a thread, async ones on one event loop: the rewards' way,
    tasks/rewards.py); per call its answer text, whether it failed (raised, timed out, bad call), and its seconds.
    A call still running after `timeout` seconds is answered with an error and left behind (a daemon thread;
    async ones are cancelled)."""
    results: list[Any] = [None] * len(calls)
    seconds = [0.0] * len(calls)
    started, coroutines, co_index = [], [], []
    for i, call in enumerate(calls):
        if call.error:
            results[i] = ValueError(call.error)
        elif inspect.iscoroutinefunction(tools[call.name]):
            coroutines.append(_awaited(tools[call.name], call.arguments))
            co_index.append(i)
        else:
            started.append((i, start_call(tools[call.name], call.arguments)))
    for i, (value, secs) in zip(co_index, run_async(coroutines, timeout) if coroutines else []):
        results[i], seconds[i] = value, timeout if value is TIMED_OUT else secs
    for i, running in started:
        value, secs = finish_call(running, timeout)
        results[i], seconds[i] = value, timeout if value is TIMED_OUT else secs
    out = []
    for call, value, secs in zip(calls, results, seconds):
        if value is TIMED_OUT:
            out.append((f"error: {call.name} timed out after {timeout:g} s", True, secs))
        elif isinstance(value, BaseException):
            text = call.error or f"error: {type(value).__name__}: {value}"
            out.append((text[:MAX_RESULT_CHARS], True, secs))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out.append((text[:MAX_RESULT_CHARS], False, secs))
    return out


async def _awaited(fn: Callable, args: dict[str, Any]) -> Any:
    """An async tool's call as a coroutine: wrong arguments raise inside it (the model is told), not here."""
    return await fn(**args)
