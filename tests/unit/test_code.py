"""Code tasks (minigrpo/tasks/code.py): programs run against tests in the sandbox, scored exactly; a program that
passes, fails, loops forever, tries to escape or forges its report, each within its time bound."""

import time
from pathlib import Path

import pytest

from minigrpo.agent import sandbox
from minigrpo.config import Config
from minigrpo.errors import DataError
from minigrpo.evaluate import resolve_metric
from minigrpo.run import required_columns
from minigrpo.tasks import code
from minigrpo.tasks.rewards import load_rewards, reward_inputs, score
from minigrpo.tasks.sources import load_split, require_columns

needs_sandbox = pytest.mark.skipif(sandbox.check() is not None, reason=f"no sandbox here: {sandbox.check()}")
ADD = "def add(a, b):\n    return a + b\n"
TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add('a', 'b') == 'ab'"]


@pytest.mark.parametrize("text, expected", [
    ("Sure:\n```python\ndef f():\n    return 1\n```\nThat's it.", "def f():\n    return 1\n"),
    ("```py\nx = 1\n```\nthen\n```python\nx = 2\n```", "x = 2\n"),  # the last block
    ("```python\ndef f():\n    return", "def f():\n    return"),  # cut off: the unclosed block to the end
    ("    return a + b\n", "    return a + b\n"),  # no fence: the text (a continuation of the stub)
    ("```python\ndef f():\n    return 1\n```\nExample:\n```python\nprint(f())\n```", "def f():\n    return 1\n"),
])
def test_extract_code(text, expected):
    assert code.extract_code(text) == expected


def test_program_continues_or_restates_the_stub():
    stub = 'def add(a, b):\n    """Add."""\n'
    assert code.program("    return a + b\n", stub) == stub + "    return a + b\n"
    assert code.program(f"```python\n{ADD}```", stub) == stub + ADD  # the later definition replaces the stub's
    assert code.program(ADD, None) == ADD


@needs_sandbox
@pytest.mark.parametrize("name, program, passed, bound", [
    ("passes", ADD, 3, 5),
    ("fails one", "def add(a, b):\n    return a + b if isinstance(a, int) else None\n", 2, 5),
    ("crashes on import", "raise SystemExit(0)\n" + ADD, 0, 5),  # exits before the tests: no report, 0
    ("syntax error", "def add(a, b:\n", 0, 5),
    ("loops forever", "while True:\n    pass\n", 0, 2 + 3),  # killed at its 2 s
    ("sleeps forever", "import time\ntime.sleep(100)\n", 0, 2 + 3),
    ("forges the report", "print('\\nMINIGRPO-TESTS x 3 3')\nimport os\nos._exit(0)\n", 0, 5),
    ("disables exec", "import builtins\nbuiltins.exec = lambda *a, **k: None\n", 0, 5),  # the tests would "pass"
    ("rewrites print", "import builtins\n_p = builtins.print\n"
                       "builtins.print = lambda *a, **k: _p('MINIGRPO-TESTS', a[1] if len(a) > 1 else '', 3, 3)\n"
                       "raise SystemExit\n" + ADD, 0, 5),
    ("fakes a sandbox failure", "import sys, os\nsys.stderr.write('bwrap: no')\nos._exit(1)\n", 0, 5),  # 0, not None
    ("demo block", ADD + "if __name__ == '__main__':\n    input()\n", 3, 5),  # not run as the main program
    ("escapes", "import os\nos.system('touch /tmp/minigrpo-escaped')\n"
                "open('/root/minigrpo-escaped', 'w').write('x')\n" + ADD, 0, 5),
    ("forks", "import os\nwhile True:\n    os.fork()\n", 0, 5),
    ("floods the output", "while True:\n    print('x' * 10000)\n", 0, 5),
    ("eats memory", "x = bytearray(4 * 2**30)\n" + ADD, 0, 5),
])
def test_programs_are_scored_within_their_bounds(name, program, passed, bound):
    t0 = time.perf_counter()
    got, total, result = code.run_tests(program, TESTS, timeout=2)
    assert (got, total) == (passed, 3), (name, result)
    assert time.perf_counter() - t0 < bound, name
    assert not Path("/root/minigrpo-escaped").exists() and not Path("/tmp/minigrpo-escaped").exists()


@needs_sandbox
def test_humaneval_functions_must_return_plain_values():
    """HumanEval's checks compare with ==: an object equal to everything would pass them; it fails here."""
    ex = code.humaneval_rows("test")[0]
    cheat = "    class Anything:\n        def __eq__(self, other):\n            return True\n    return Anything()\n"
    assert code.run_tests(code.program(cheat, ex["code_prompt"]), [ex["tests"]], 5)[0] == 0
    right = code.program(ex["canonical_solution"], ex["code_prompt"])
    assert code.run_tests(right, [ex["tests"]], 5)[0] == 1


@needs_sandbox
def test_the_rewards_fraction_and_all_or_nothing():
    cfg = Config(reward_funcs=["code_tests", "code_tests_all"], code_timeout=2)
    funcs = load_rewards(cfg)
    completions = [f"```python\n{ADD}```", "def add(a, b):\n    return a + b if isinstance(a, int) else None\n",
                   "while True: pass", "no code here"]
    columns = {"tests": [TESTS] * 3 + [None]}  # the last row has no tests: no opinion
    totals, by_name = score(funcs, ["p"] * 4, completions, columns)
    assert by_name["code_tests"] == [1.0, pytest.approx(2 / 3), 0.0, None]
    assert by_name["code_tests_all"] == [1.0, 0.0, 0.0, None]
    assert totals[:3] == [2.0, pytest.approx(2 / 3), 0.0] and totals[3] is None
    with pytest.raises(ValueError, match="tests of sample 0: must be a string of test code or a non-empty list"):
        funcs[0][1](["p"], ["x"], tests=[[1, 2]])


@needs_sandbox
def test_humaneval_splits_and_its_reference_solutions_pass():
    cfg = Config(dataset="humaneval", reward_funcs=["code_tests"])
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert len(train) == 132 and len(test) == 32 and test[0].columns["task_id"] == "HumanEval/132"
    ex = test[0]
    assert ex.question.startswith(code.INSTRUCTION) and ex.columns["code_prompt"] in ex.question
    assert resolve_metric(cfg, test)[0] == "code_tests"
    solutions = [f"```python\n{ex.columns['code_prompt']}{ex.columns['canonical_solution']}```" for ex in test[:6]]
    wrong = ["    return None\n"] * 6  # the stub continued with a body that returns nothing
    prompts, completions, columns = reward_inputs(test[:6], ["p"] * 12, [c for pair in zip(solutions, wrong)
                                                                          for c in pair], 2)
    _, by_name = score(load_rewards(cfg), prompts, completions, columns)
    assert by_name["code_tests"] == [1.0, 0.0] * 6


def test_code_rewards_need_a_tests_column(tiny_data):
    cfg = Config(dataset=str(tiny_data), reward_funcs=["code_tests"])
    assert required_columns(cfg, "GRPO") == {"tests": "the code_tests reward runs the completion against them"}
    with pytest.raises(DataError, match="no 'tests' column"):
        require_columns(load_split(cfg, "train"), ["tests"], "data", "the code_tests reward runs it")
    with pytest.raises(DataError, match="no 'tests' column"):
        resolve_metric(Config(dataset=str(tiny_data), eval_metric="code_tests"), load_split(cfg, "test"))
