"""Answer grading: is a model's final `\\boxed{}` answer mathematically equal to the ground truth?

Which answer counts: the LAST `\\boxed{...}` in the response's final part, i.e. after the last
`</think>` when the response has one. Long-thought models re-check and restate; intermediate
boxes inside the reasoning are tentative, and the last box of the conclusion is what the model
commits to. A response that closes no box is wrong (no guessing from bare numbers in the text),
which is also what makes a truncated response wrong by construction.

Equality is decided by math-verify (LaTeX/sympy equivalence: `\\frac{1}{2}` = `0.5`, intervals,
tuples, `90^\\circ` = `90`). Grading never raises: unparsable input, parser timeouts and any
exception inside math-verify mean "wrong".
"""
from __future__ import annotations

import logging
import re
import threading
from typing import Any

log = logging.getLogger(__name__)

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*")
_THINK_END = "</think>"
# math-verify uses SIGALRM timeouts, which Python only allows on the main thread.
_TIMEOUT_S = 5


def final_part(response: str) -> str:
    """The text after the last `</think>` (the whole response when there is none)."""
    cut = response.rfind(_THINK_END)
    return response if cut < 0 else response[cut + len(_THINK_END):]


def _box_content(text: str, start: int) -> str | None:
    """Content of the box whose argument begins at `start` (a `{...}` group or one bare token)."""
    if start >= len(text):
        return None
    if text[start] != "{":
        # `\boxed 5`: TeX takes the single next token.
        match = re.match(r"[^\s$\\{}]+", text[start:])
        return match.group(0) if match else None
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\":  # `\{` / `\}` are literal braces (sets), not groups
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None  # the box never closes: a truncated answer


def extract_answer(response: str | None) -> str | None:
    """The content of the last complete `\\boxed{}` of the final part, or None."""
    if not response:
        return None
    text = final_part(response)
    for match in reversed(list(_BOX_RE.finditer(text))):
        content = _box_content(text, match.end())
        if content is not None and content.strip():
            return content.strip()
    return None


def _strip_math_delimiters(answer: str) -> str:
    answer = answer.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if answer.startswith(left) and answer.endswith(right) and len(answer) > len(left) + len(right):
            return answer[len(left) : -len(right)].strip()
    return answer


def _parse(latex: str) -> list[Any]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    timeout = _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    wrapped = f"${_strip_math_delimiters(latex)}$"
    return parse(
        wrapped,
        extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
        parsing_timeout=timeout,
    )


_PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def answers_equal(predicted: str, ground_truth: str) -> bool:
    """math-verify equivalence of two answer strings (LaTeX or plain); False on any failure."""
    from math_verify import verify

    pred, gold = predicted.strip(), _strip_math_delimiters(str(ground_truth))
    if _PLAIN_NUMBER.fullmatch(pred) and _PLAIN_NUMBER.fullmatch(gold):
        # plain decimals (most GSM8K / AIME / embedded answers): exact, and ~1000x cheaper than sympy
        from decimal import Decimal

        return Decimal(pred) == Decimal(gold)
    try:
        gold = _parse(str(ground_truth))
        pred = _parse(predicted)
        if not gold or not pred:
            return False
        timeout = _TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
        return bool(verify(gold, pred, timeout_seconds=timeout))
    except Exception as exc:  # noqa: BLE001 - a grader must never take a sampling run down
        log.debug("grading failed for %r vs %r: %s", predicted, ground_truth, exc)
        return False


def grade(response: str | None, ground_truth: str | float | int, *, truncated: bool = False) -> bool:
    """True when the response's final boxed answer equals `ground_truth`.

    `truncated=True` (vLLM's finish_reason "length") is always wrong: the model did not finish,
    so a box it happened to write earlier is not its conclusion.
    """
    if truncated:
        return False
    answer = extract_answer(response)
    if answer is None:
        return False
    return answers_equal(answer, str(ground_truth))
