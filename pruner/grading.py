"""Answer grading: is a model's final `\\boxed{}` answer mathematically equal to the ground truth?

Which answer counts: the LAST `\\boxed{...}` in the response's final part, i.e. after the last
`</think>` when the response has one. Long-thought models re-check and restate; intermediate
boxes inside the reasoning are tentative, and the last box of the conclusion is what the model
commits to. A response that closes no box is wrong (no guessing from bare numbers in the text),
which is also what makes a truncated response wrong by construction.

Equality is decided by math-verify (LaTeX/sympy equivalence: `\\frac{1}{2}` = `0.5`, intervals,
tuples, `90^\\circ` = `90`). Grading never raises: unparsable input, parser timeouts and any
exception inside math-verify mean "wrong".

Hard bounds, in any thread: answer extraction is one linear pass over the response; a boxed
answer longer than MAX_ANSWER_CHARS is wrong without parsing; math-verify runs in a worker
process (its own signal timeouts only work on a main thread, so a worker thread could hang on a
pathological answer) and a comparison taking longer than GRADE_TIMEOUT_S is wrong (the worker
interrupts itself; one stuck in C code is killed and restarted). The worker starts on the first
non-numeric comparison (a few seconds, once); plain decimals never need it. Where no worker can
start (inside a daemonic process) the main thread grades in-process under the same alarm, and
other threads count non-numeric answers wrong rather than risk an unbounded wait.
"""
from __future__ import annotations

import logging
import multiprocessing
import re
import signal
import threading
from typing import Any

log = logging.getLogger(__name__)

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*")
_BARE_TOKEN = re.compile(r"[^\s$\\{}]+")
_THINK_END = "</think>"
MAX_ANSWER_CHARS = 1000   # MATH/AIME/GSM8K answers are < 200 characters; longer "answers" are runaway output
GRADE_TIMEOUT_S = 4.0     # wall-clock bound of one math-verify comparison, any thread
_WORKER_BUDGET_S = GRADE_TIMEOUT_S - 0.5  # the worker's own alarm fires first; the kill is the backstop
_WORKER_START_S = 120.0   # the one-time worker start (imports sympy) is not part of the bound


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
    """The content of the last complete `\\boxed{}` of the final part, or None (linear time)."""
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

    wrapped = f"${_strip_math_delimiters(latex)}$"
    return parse(wrapped, extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
                 parsing_timeout=None)  # bounded as a whole by the worker's alarm


class _Budget(Exception):
    pass


def _on_alarm(signum: int, frame: Any) -> None:
    raise _Budget()


def _worker_init() -> None:
    import math_verify  # noqa: F401 - the slow import happens once, before any timed comparison

    signal.signal(signal.SIGALRM, _on_alarm)
    logging.getLogger("math_verify").setLevel(logging.ERROR)


def _sympy_equal(predicted: str, ground_truth: str) -> bool:
    """In the worker process (its main thread): math-verify under one alarm for the whole comparison."""
    from math_verify import verify

    signal.setitimer(signal.ITIMER_REAL, _WORKER_BUDGET_S)
    try:
        gold, pred = _parse(ground_truth), _parse(predicted)
        return bool(gold and pred and verify(gold, pred, timeout_seconds=None))
    except _Budget:
        return False
    except Exception as exc:  # noqa: BLE001 - a grader must never take a sampling run down
        log.debug("grading failed for %r vs %r: %s", predicted, ground_truth, exc)
        return False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _in_process_equal(predicted: str, ground_truth: str) -> bool:
    """Fallback without a worker: the same alarm-bounded comparison, possible on the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        return _sympy_equal(predicted, ground_truth)
    finally:
        signal.signal(signal.SIGALRM, previous)


def _ping() -> bool:
    return True


_pool: Any = None
_pool_lock = threading.Lock()


def _worker_pool() -> Any:
    """The grading worker, started (and waited for) on first use, outside any comparison's bound."""
    global _pool
    with _pool_lock:
        if _pool is None:
            # spawn: forking a process that runs threads (vLLM, tqdm, torch) can deadlock the child
            pool = multiprocessing.get_context("spawn").Pool(1, initializer=_worker_init)
            pool.apply_async(_ping).get(timeout=_WORKER_START_S)
            _pool = pool
        return _pool


def _kill_worker(pool: Any) -> None:
    global _pool
    with _pool_lock:
        if _pool is pool:
            _pool = None
    pool.terminate()


_PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def answers_equal(predicted: str, ground_truth: str) -> bool:
    """math-verify equivalence of two answer strings (LaTeX or plain); False on any failure, on an
    answer over MAX_ANSWER_CHARS, or after GRADE_TIMEOUT_S."""
    pred, gold = predicted.strip(), _strip_math_delimiters(str(ground_truth))
    if _PLAIN_NUMBER.fullmatch(pred) and _PLAIN_NUMBER.fullmatch(gold):
        # plain decimals (most GSM8K / AIME / embedded answers): exact, and ~1000x cheaper than sympy
        from decimal import Decimal

        return Decimal(pred) == Decimal(gold)
    if len(pred) > MAX_ANSWER_CHARS or len(str(ground_truth)) > MAX_ANSWER_CHARS:
        return False
    try:
        pool = _worker_pool()
    except Exception as exc:  # noqa: BLE001 - e.g. inside a daemonic process, which may not have children
        log.debug("no grading worker (%s): grading in this process", exc)
        return _in_process_equal(predicted, str(ground_truth))
    try:
        return bool(pool.apply_async(_sympy_equal, (predicted, str(ground_truth))).get(timeout=GRADE_TIMEOUT_S))
    except multiprocessing.TimeoutError:  # stuck where its alarm cannot reach (C code): kill it
        log.warning("grading %r vs %r took over %.0f s: counted wrong", predicted[:80], ground_truth, GRADE_TIMEOUT_S)
        _kill_worker(pool)
        return False
    except Exception as exc:  # noqa: BLE001 - e.g. the worker died
        log.debug("grading worker failed for %r vs %r: %s", predicted, ground_truth, exc)
        _kill_worker(pool)
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
