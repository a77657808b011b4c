"""Answer grading: is a model's final `\\boxed{}` answer mathematically equal to the ground truth?

Which answer counts: the LAST `\\boxed{...}` in the response's final part, i.e. after the last
`</think>` when the response has one. Long-thought models re-check and restate; intermediate
boxes inside the reasoning are tentative, and the last box of the conclusion is what the model
commits to; an empty last box (`\\boxed{}`) is no answer, not a pointer to an earlier box. A
response that closes no box is wrong (no guessing from bare numbers in the text),
which is also what makes a truncated response wrong by construction.

Equality is decided by math-verify (LaTeX/sympy equivalence: `\\frac{1}{2}` = `0.5`, intervals,
tuples, `90^\\circ` = `90`). Grading never raises: unparsable input, parser timeouts and any
exception inside math-verify mean "wrong".

Hard bounds, in any thread or process: answer extraction is one linear pass over the response; a
boxed answer longer than MAX_ANSWER_CHARS is wrong without parsing; math-verify runs in worker
processes (its own signal timeouts only work on a main thread) and a comparison taking longer than
GRADE_TIMEOUT_S is wrong. `pruner/grade_pool.py` keeps one worker per concurrent caller, so a
slow answer costs only its own verdict; the workers are `subprocess` children (the caller's
`__main__` is never re-imported, a daemonic pool worker may start them) and a forked child gets
workers of its own. A worker starts on the first non-numeric comparison of a thread (seconds,
once per worker); plain decimals never need one. Where no process can start at all, the main
thread grades in-process under the same alarm, and other threads count non-numeric answers wrong.
"""
from __future__ import annotations

import logging
import re
import threading

from pruner import grade_pool
from pruner.grade_worker import strip_math_delimiters

log = logging.getLogger(__name__)

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*")
_BARE_TOKEN = re.compile(r"[^\s$\\{}]+")
_THINK_END = "</think>"
MAX_ANSWER_CHARS = 1000   # MATH/AIME/GSM8K answers are < 200 characters; longer "answers" are runaway output
GRADE_TIMEOUT_S = 4.0     # wall-clock bound of one math-verify comparison, any thread or process


def final_part(response: str) -> str:
    """The text after the last `</think>` (the whole response when there is none)."""
    cut = response.rfind(_THINK_END)
    return response if cut < 0 else response[cut + len(_THINK_END):]


def _closing_braces(text: str) -> dict[int, int]:
    """Position of each `{` -> position of its matching `}` (one pass; `\\x` escapes skipped)."""
    closes: dict[int, int] = {}
    stack: list[int] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":  # `\\{` / `\\}` are literal braces (sets), not groups
            i += 2
            continue
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            closes[stack.pop()] = i
        i += 1
    return closes


def extract_answer(response: str | None) -> str | None:
    """The content of the last complete `\\boxed{}` of the final part, or None (linear time). An empty
    last box is the model's conclusion too: None, never an earlier box."""
    if not response:
        return None
    text = final_part(response)
    boxes = [m.end() for m in _BOX_RE.finditer(text)]
    closes = _closing_braces(text) if boxes else {}
    for start in reversed(boxes):
        if start >= len(text):
            continue
        if text[start] == "{":
            end = closes.get(start)
            content = text[start + 1:end] if end is not None else None  # None: the box never closes
        else:  # `\\boxed 5`: TeX takes the single next token
            match = _BARE_TOKEN.match(text, start)
            content = match.group(0) if match else None
        if content is not None:
            return content.strip() or None
    return None


def _in_process_equal(predicted: str, ground_truth: str) -> bool:
    """Fallback where no worker can start: the alarm-bounded comparison, possible on the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        return False
    from pruner.grade_worker import compare

    return compare(predicted, ground_truth, grade_pool.alarm_budget(GRADE_TIMEOUT_S))


_PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def answers_equal(predicted: str, ground_truth: str) -> bool:
    """math-verify equivalence of two answer strings (LaTeX or plain); False on any failure, on an
    answer over MAX_ANSWER_CHARS, or after GRADE_TIMEOUT_S."""
    pred, gold = predicted.strip(), strip_math_delimiters(str(ground_truth))
    if _PLAIN_NUMBER.fullmatch(pred) and _PLAIN_NUMBER.fullmatch(gold):
        # plain decimals (most GSM8K / AIME / embedded answers): exact, and ~1000x cheaper than sympy
        from decimal import Decimal

        return Decimal(pred) == Decimal(gold)
    if len(pred) > MAX_ANSWER_CHARS or len(str(ground_truth)) > MAX_ANSWER_CHARS:
        return False
    try:
        return grade_pool.compare(predicted, str(ground_truth), GRADE_TIMEOUT_S)
    except grade_pool.WorkerError as exc:  # e.g. no process may start here: grade in this one
        log.warning("no grading worker (%s): grading in this process", exc)
        return _in_process_equal(predicted, str(ground_truth))


def grade(response: str | None, ground_truth: str | float | int, *, truncated: bool = False) -> bool:
    """True when the response's final boxed answer equals `ground_truth`.

    `truncated=True` (vLLM's finish_reason "length") is always wrong: the model did not finish,
    so a box it happened to write earlier is not its conclusion.
    """
    return grade_answer(None if truncated else extract_answer(response), ground_truth, truncated=truncated)


def grade_answer(answer: str | None, ground_truth: str | float | int, *, truncated: bool = False) -> bool:
    """`grade` of an answer already extracted from its response (`extract_answer`), so a caller that keeps the
    answer does not extract it twice."""
    if truncated or answer is None:
        return False
    return answers_equal(answer, str(ground_truth))
