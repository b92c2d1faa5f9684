"""The built-in synthetic task: multi-step arithmetic word problems with worked solutions.

    Problem:  Ann has 7 pens. She buys 5 more pens. She gives 3 pens to Tom. How many pens does Ann have now?
    Solution: 7 + 5 = 12.
              12 - 3 = 9.
              #### 9

Problems are generated from a seed, so the data needs no download; train and test come from different
seeds and every test problem that also occurs in train is dropped (disjoint sets). The answer format is
GSM8K's, so the same extractor and rewards score both. The rows become `Example`s in `sources.load_split`,
like any dataset's. Knobs: `steps` (operations per problem) and
`max_number` (operand range). Also here: the word-level tokenizer of the embedded tiny model, whose
vocabulary is exactly the task's words, digits (one token each) and punctuation.
"""

from __future__ import annotations

import random
from typing import Any

NAMES = [("Ann", "She"), ("Ben", "He"), ("Cara", "She"), ("Dan", "He"), ("Eva", "She"), ("Finn", "He"),
         ("Gus", "He"), ("Hana", "She"), ("Ivy", "She"), ("Jon", "He")]
ITEMS = ["apples", "pens", "cards", "coins", "books", "stamps", "shells", "marbles", "cookies", "stickers"]
ADD = ["buys {n} more {item}", "finds {n} more {item}", "gets {n} more {item}"]
SUB = ["gives {n} {item} to {other}", "loses {n} {item}", "sells {n} {item}"]
SPLIT_PATTERN = r" ?####| ?[A-Za-z]+| ?\d| ?[^\w\s]|\s"


def make_problem(rng: random.Random, steps: int, max_number: int) -> tuple[str, str, int]:
    """One problem: (question, worked solution ending in '#### N', answer). Amounts never go negative."""
    (name, pronoun), item = rng.choice(NAMES), rng.choice(ITEMS)
    other = rng.choice([n for n, _ in NAMES if n != name])
    value = rng.randint(1, max_number)
    sentences, lines = [f"{name} has {value} {item}."], []
    for _ in range(steps):
        if value > 0 and rng.random() < 0.5:
            n = rng.randint(1, min(value, max_number))
            sentences.append(f"{pronoun} " + rng.choice(SUB).format(n=n, item=item, other=other) + ".")
            lines.append(f"{value} - {n} = {value - n}.")
            value -= n
        else:
            n = rng.randint(1, max_number)
            sentences.append(f"{pronoun} " + rng.choice(ADD).format(n=n, item=item) + ".")
            lines.append(f"{value} + {n} = {value + n}.")
            value += n
    sentences.append(f"How many {item} does {name} have now?")
    return " ".join(sentences), "\n".join(lines) + f"\n#### {value}", value


def arith_rows(split: str, size: int, steps: int = 3, max_number: int = 20, seed: int = 0,
               direct_fraction: float = 0.0, tool_fraction: float = 0.0) -> list[dict[str, Any]]:
    """`size` problems of the train or test split as plain rows ({"question", "answer": the worked solution});
    test never repeats a train question of the same seed.

    `direct_fraction` of the train problems show a bare `#### N` as their solution instead of the worked
    steps (the same problems either way): cold-start data that mixes worked solutions with bare answers.
    `tool_fraction` of the train problems (drawn first) are solved with the calculator instead: their row gets a
    `completion` of three messages (`tool_solution`), what SFT trains on; the others keep their solution.
    """
    if split not in ("train", "test"):
        raise ValueError(f"arith: split must be 'train' or 'test', got {split!r}")
    if size < 1:
        raise ValueError(f"arith: size must be >= 1, got {size}")
    rng = random.Random(f"arith-{split}-{seed}-{steps}-{max_number}")
    banned: set[str] = set()
    if split == "test":  # regenerate train's problems only to exclude them; cheap (pure Python)
        train_rng = random.Random(f"arith-train-{seed}-{steps}-{max_number}")
        banned = {make_problem(train_rng, steps, max_number)[0] for _ in range(_TRAIN_SIZE)}
    style = random.Random(f"arith-style-{seed}")  # its own stream: the problems do not depend on the mix
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    for _ in range(100 * size):
        q, solution, answer = make_problem(rng, steps, max_number)
        if q in banned or q in seen:
            continue
        seen.add(q)
        row: dict[str, Any] = {"question": q, "answer": solution}
        if split == "train" and tool_fraction and style.random() < tool_fraction:
            row["completion"] = tool_solution(solution)
        elif split == "train" and style.random() < direct_fraction:
            row["answer"] = f"#### {answer}"
        rows.append(row)
        if len(rows) == size:
            return rows
    raise ValueError(f"arith: could only make {len(rows)} distinct problems; raise max_number or steps")


def expression(solution: str) -> str:
    """A worked solution's steps as one expression: "7 + 5 = 12.\n12 - 3 = 9.\n#### 9" -> "7 + 5 - 3"."""
    lines = [line for line in solution.splitlines() if " = " in line]
    return lines[0].split(" = ")[0] + "".join(" " + line.split(" = ")[0].split(" ", 1)[1] for line in lines[1:])


def tool_solution(solution: str) -> list[dict[str, str]]:
    """A worked solution ("7 + 5 = 12.\\n12 - 3 = 9.\\n#### 9") as a calculator conversation: the assistant calls
    the calculator on the whole expression (`<tool_call>calculator 7 + 5 - 3</tool_call>`, the simple call format
    of agent/tools.py), the tool answers, the assistant gives `#### N`."""
    value = solution.rsplit("#### ", 1)[1]
    return [{"role": "assistant", "content": f"<tool_call>calculator {expression(solution)}</tool_call>"},
            {"role": "tool", "name": "calculator", "content": value},
            {"role": "assistant", "content": f"#### {value}"}]


# The tools model's added words (tiny.arith_tools_tokenizer): the call tags (not special: they stay in the text
# the tools and rewards read) and the tool's name.
TOOL_WORDS = ["<tool_call>", "</tool_call>", "calculator", " calculator"]


_TRAIN_SIZE = 20000  # train split size used to keep test disjoint (the train split is at most this big)


def arith_vocab() -> list[str]:
    """Every token the task can produce: words, digits and punctuation, each also with a leading space."""
    words = {w for n, p in NAMES for w in (n, p)} | set(ITEMS) | {"has", "How", "many", "does", "have", "now"}
    for template in ADD + SUB:
        words |= {w for w in template.split() if w.isalpha()}
    pieces = sorted(words) + list("0123456789") + [".", "?", "+", "-", "=", "####", ",", "!", "'"]
    return ["\n", " "] + [v for p in pieces for v in (p, " " + p)]
