"""Grading: the last boxed answer of the final part, math-verify equivalence, never a crash."""
from __future__ import annotations

import json
import random
import threading
import time

import pytest

from conftest import shared_data
from pruner.grading import extract_answer, final_part, grade

MATH500 = shared_data("math500.jsonl")


@pytest.mark.parametrize(
    "response, expected",
    [
        (r"First \boxed{2}. Re-check... so \boxed{3}.", "3"),
        (r"<think>maybe \boxed{1}</think> The answer is \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"<think>\boxed{7}</think> so the answer is 7", None),  # a box only inside the thinking
        (r"\boxed{\{1, 2\}} and \boxed{x^{2}+1}", "x^{2}+1"),
        (r"\boxed 5", "5"),
        (r"done \boxed{12", None),  # truncated inside the box
        (r"so \boxed{3}. Final: \boxed{}", None),  # an empty last box is no answer, not the earlier 3
        (r"so \boxed{3}. Final: \boxed{  }", None),
        ("", None),
        ("no box at all, 42", None),
    ],
)
def test_extract_answer(response: str, expected: str | None) -> None:
    assert extract_answer(response) == expected


@pytest.mark.parametrize(
    "response, truth, ok",
    [
        (r"\boxed{0.5}", r"\frac12", True),
        (r"\boxed{\dfrac{14}{3}}", r"\frac{14}{3}", True),
        (r"\boxed{90^\circ}", "90", True),
        (r"\boxed{\left(3, \frac{\pi}{2}\right)}", r"\left( 3, \frac{\pi}{2} \right)", True),
        (r"\boxed{\text{Evelyn}}", r"\text{Evelyn}", True),
        (r"\boxed{27}", "27.0", True),
        (r"\boxed{\{1,2\}}", r"$\{1,2\}$", True),
        (r"\boxed{3}", "4", False),
        (r"\boxed{\frac{1}{0}}", "1", False),
        (r"\boxed{}", "1", False),
        (r"\boxed{1} no wait \boxed{}", "1", False),
        (r"\boxed{((((}", "1", False),
        ("\x00\x01 garbage \\boxed{\\sqrt{}", "2", False),
    ],
)
def test_grade_cases(response: str, truth: str, ok: bool) -> None:
    assert grade(response, truth) is ok


def test_truncated_is_wrong_even_with_right_box() -> None:
    assert grade(r"\boxed{3}", "3") and not grade(r"\boxed{3}", "3", truncated=True)
    assert grade(None, "3") is False


@pytest.mark.slow
@pytest.mark.skipif(not MATH500.exists(), reason="MATH-500 not present")
def test_math500_reference_solutions_bar() -> None:
    rows = [json.loads(line) for line in MATH500.read_text().splitlines()]
    right = sum(grade(r["solution"], r["answer"]) for r in rows)
    assert right / len(rows) >= 0.99, right
    # a solution graded against the next problem's answer: only genuinely equal answers may pass
    shifted = [(r["solution"], rows[(i + 1) % len(rows)]["answer"], r["answer"]) for i, r in enumerate(rows)]
    false_pos = [(own, other) for sol, other, own in shifted if grade(sol, other) and own.replace(" ", "") != other.replace(" ", "")]
    assert len(false_pos) / len(rows) <= 0.01, false_pos


# --- hard bounds (issue 12, case 6) ---

def _quadratic_extract(response: str) -> str | None:
    """The former algorithm (each box scanned to its end): the reference the linear pass must match."""
    import re

    text = final_part(response)
    for match in reversed(list(re.finditer(r"\\(?:boxed|fbox)\s*", text))):
        start, content = match.end(), None
        if start < len(text) and text[start] != "{":
            bare = re.match(r"[^\s$\\{}]+", text[start:])
            content = bare.group(0) if bare else None
        elif start < len(text):
            depth, i = 0, start
            while i < len(text):
                if text[i] == "\\":
                    i += 2
                    continue
                depth += {"{": 1, "}": -1}.get(text[i], 0)
                if depth == 0:
                    content = text[start + 1:i]
                    break
                i += 1
        if content is not None:  # an empty last box is no answer (issue 25), never an earlier box
            return content.strip() or None
    return None


def test_linear_extraction_matches_the_scan_per_box_on_random_text() -> None:
    rng = random.Random(0)
    atoms = ["\\boxed", "\\fbox", "{", "}", "\\{", "\\}", " ", "1", "x", "</think>", "\\", "$"]
    for _ in range(3000):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 30)))
        assert extract_answer(text) == _quadratic_extract(text), text


def _timed_in_thread(fn, *args) -> tuple[object, float]:
    result: dict = {}

    def target() -> None:
        t0 = time.perf_counter()
        result["value"] = fn(*args)
        result["s"] = time.perf_counter() - t0

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "grading hung in a worker thread"
    return result["value"], result["s"]


@pytest.mark.slow
@pytest.mark.parametrize("response", [
    "\\boxed{" * 20000,                                              # 105 s before (quadratic extraction)
    "\\boxed{" + "{" * 400 + "1" + "}" * 400 + "}",                   # deeply nested, under the size cap
    "\\boxed{" + "(" * 300 + "1" + ")" * 300 + "}",                   # sympy parser blow-up
    "\\boxed{9^{9^{9^{9}}}}",                                          # a tower sympy tries to evaluate
    "\\boxed{" + "x+" * 5000 + "1}",                                   # over MAX_ANSWER_CHARS
])
def test_pathological_answers_return_within_5_s_in_a_worker_thread(response: str) -> None:
    assert _timed_in_thread(grade, r"\boxed{\frac{1}{2}}", "0.5")[0] is True  # the worker is up (one-time start)
    value, seconds = _timed_in_thread(grade, response, "2")
    assert value is False and seconds <= 5.0, seconds
    assert _timed_in_thread(grade, r"\boxed{\frac{1}{2}}", "0.5")[0] is True  # and grading still works after


@pytest.mark.slow
def test_without_a_worker_the_main_thread_grades_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    import pruner.grading as grading

    def no_worker():
        raise grading.grade_pool.WorkerError("cannot start the grading worker: no processes here")

    monkeypatch.setattr(grading.grade_pool, "take", no_worker)
    assert grade(r"\boxed{\frac{1}{2}}", "0.5") is True and grade(r"\boxed{\frac{1}{3}}", "0.5") is False
    t0 = time.perf_counter()
    assert grade(r"\boxed{" + "(" * 300 + "1" + ")" * 300 + "}", "2") is False
    assert time.perf_counter() - t0 <= 5.0
    assert _timed_in_thread(grade, r"\boxed{\frac{1}{2}}", "0.5")[0] is False  # off the main thread: no bound, so wrong
