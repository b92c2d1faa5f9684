"""THE answer extractor: gold answers (data, SFT targets) and model answers (rewards, evaluation), one place.

Protocol (GSM8K, see GRPO_NOTES.md): the last ``#### N`` wins; if there is none, the last ``\\boxed{...}``.
Numbers compare exactly as ``Decimal`` after normalisation (``1,234.50`` -> ``1234.5``, ``**18**`` -> ``18``);
anything else (LaTeX such as ``\\frac{1}{2}``) falls back to math-verify, gold first. The data's ``answer``
column, the correctness reward, the accuracy of `evaluate` and rejection sampling all call these functions,
so the training reward and the reported accuracy cannot drift apart. `gold_problem` and `readable_gold` say
when a gold answer cannot be compared at all (null, a boolean, a list, empty text ...), so data checks refuse it.
"""


import math
import re
import threading
from decimal import Decimal
from typing import Any

# [0-9] rather than \d: \d also matches non-ASCII digits, which Decimal would silently accept.
# The shape `d[d,]*(.d+)?` is unambiguous, so a failed match backtracks linearly, never quadratically.
_NUM = r"-?(?:[0-9][0-9,]*(?:\.[0-9]+)?|\.[0-9]+)"
# Each whitespace run follows its own literal (`####`, `**`, `$`): two adjacent optional runs would split
# 1 MB of spaces in n^2 ways on a failed match. (Possessive `*+` would need Python 3.11.)
_HASH_RE = re.compile(r"####\s*(?:\*\*\s*)?(?:\$\s*)?(" + _NUM + ")")
FINAL_NUMBER_RE = re.compile(r"[ \t]*(?:\$[ \t]*)?" + _NUM + r"\s*")  # the tail of a strict `#### N` line
_PLAIN_NUMBER_RE = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
_BOXED_TOKEN_RE = re.compile(r"\\boxed\{|[{}]")
# Longer "answers" are never a GSM8K number; keep sympy away from pathological inputs.
_MAX_VERIFY_CHARS = 1000
_VERIFY_TIMEOUT_S = 5


def text_of(message: Any) -> str:
    """The text of a completion or prompt in either form: a string, or a list of messages (their contents joined)."""
    if isinstance(message, str):
        return message
    return "".join(m["content"] for m in message)


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


def _verify_text(gold: str) -> str:
    """The gold as math-verify reads it: as written when it has its own delimiters (``$``, ``\\boxed{}``,
    ``\\(``, ``\\[``), else in ``$...$`` like the model's answer (bare, ``5\\sqrt{3}`` would read as 5 and
    ``\\pi`` as nothing)."""
    return gold if any(d in gold for d in ("$", "\\boxed", "\\(", "\\[")) else f"${gold}$"


def _verify_timeout() -> int | None:
    """math-verify times out with signal.alarm, which raises off the main thread; there we pass None."""
    return _VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _math_verify_equal(gold: str, answer: str) -> bool:
    """math-verify equivalence (gold first: the order matters); False on any failure."""
    if len(answer) > _MAX_VERIFY_CHARS or len(gold) > _MAX_VERIFY_CHARS:
        return False
    timeout = _verify_timeout()
    try:
        from math_verify import parse, verify  # lazy: sympy costs ~1 s to import, only LaTeX needs it

        gold_parsed = parse(_verify_text(gold), parsing_timeout=timeout)
        answer_parsed = parse("$" + answer + "$", parsing_timeout=timeout)
        return bool(verify(gold_parsed, answer_parsed, timeout_seconds=timeout))
    except Exception:  # noqa: BLE001  (a reward must never crash training over one odd completion)
        return False


def is_correct(completion: str, gold: str) -> bool:
    """Whether the completion's extracted answer equals ``gold`` (a number, or a GSM8K answer field)."""
    answer = extract_answer(completion)
    if answer is None:
        return False
    gold = gold_answer(gold)  # a number, or text for math-verify; the raw answer field works too
    gold_number = normalize_number(gold)
    answer_number = normalize_number(answer)
    if gold_number is not None and answer_number is not None:
        return Decimal(gold_number) == Decimal(answer_number)
    return _math_verify_equal(gold, answer)


def gold_answer(answer: object) -> str:
    """The normalised gold answer rewards compare to: the number of the last ``#### N`` (or of a bare number),
    else the content of the last ``\\boxed{}`` (a MATH-style solution), else the stripped text (a LaTeX or word
    answer, left to math-verify)."""
    text = str(answer)  # JSONL datasets often store the answer as a JSON number
    found = extract_gold(text)
    if found is not None:
        return found
    boxed = _last_boxed(text)
    if boxed is not None and boxed.strip():
        return normalize_number(boxed) or boxed.strip()
    return text.strip()


def gold_problem(answer: object) -> str | None:
    """Why a data row's gold answer cannot be compared to a model's answer, in a few words ("is null"), or None.

    Cheap, for every row: null, a boolean, a list or object, a non-finite number, empty text, or text with no
    number that math-verify would not read (too long). `readable_gold` asks math-verify itself.
    """
    if answer is None:
        return "is null"
    if isinstance(answer, bool):  # before the numbers: True is an int
        return f"is a boolean ({str(answer).lower()})"
    if isinstance(answer, (list, tuple, set, dict)):
        return f"is {'an object' if isinstance(answer, dict) else 'a list'} ({str(answer)[:60]})"
    if isinstance(answer, float) and not math.isfinite(answer):
        return f"is not a finite number ({answer})"
    text = gold_answer(answer)
    if not text:
        return "is empty"
    if normalize_number(text) is None and len(text) > _MAX_VERIFY_CHARS:
        return (f"has no '#### N' line, number or \\boxed{{}} answer, and its {len(text)} characters are more than "
                f"math-verify compares ({_MAX_VERIFY_CHARS})")
    return None


def readable_gold(gold: str) -> bool:
    """Whether a gold answer (`gold_answer`'s text) holds a number or math that math-verify reads, so that a
    model's answer can equal it (a word is read as a product of symbols; ``\\text{}`` as nothing)."""
    if normalize_number(gold) is not None:
        return True
    try:
        from math_verify import parse  # lazy: see _math_verify_equal

        return bool(parse(_verify_text(gold), parsing_timeout=_verify_timeout()))
    except Exception:  # noqa: BLE001  (unreadable, whatever the reason)
        return False
