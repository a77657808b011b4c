"""The grading worker: math-verify comparisons, one at a time, on a process's main thread under an alarm.

`pruner/grade_pool.py` starts it with `subprocess` (never `multiprocessing`): the caller's
`__main__` is never re-imported, and a daemonic process, which multiprocessing forbids to have
children, may still start it. The protocol is one JSON line each way over pipes:

    worker -> caller   {"ready": true}                       once math-verify is imported
    caller -> worker   {"pred": "...", "gold": "...", "budget": 3.5}
    worker -> caller   {"equal": true|false}

The worker exits at end of input (its caller closed the pipe, or died). math-verify's own signal
timeouts need a main thread, which is why the comparison runs here and not in a caller's thread;
`compare` is also what grading falls back to on a main thread where no worker can start.
This module imports nothing of `pruner`: the worker starts with math-verify's imports only.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
from typing import IO, Any

log = logging.getLogger(__name__)


def strip_math_delimiters(answer: str) -> str:
    """`$x$`, `$$x$$`, `\\(x\\)`, `\\[x\\]` -> `x`."""
    answer = answer.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if answer.startswith(left) and answer.endswith(right) and len(answer) > len(left) + len(right):
            return answer[len(left) : -len(right)].strip()
    return answer


def _parse(latex: str) -> list[Any]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    wrapped = f"${strip_math_delimiters(latex)}$"
    return parse(wrapped, extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
                 parsing_timeout=None)  # bounded as a whole by the alarm in `compare`


class _Budget(Exception):
    pass


def _on_alarm(signum: int, frame: Any) -> None:
    raise _Budget()


def compare(predicted: str, ground_truth: str, budget_s: float) -> bool:
    """math-verify equivalence under one alarm for the whole comparison; main thread only. False on
    any failure or when `budget_s` runs out."""
    from math_verify import verify

    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, budget_s)
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
        signal.signal(signal.SIGALRM, previous)


def _cpu_backstop(budget_s: float) -> None:
    """The kernel ends this process (SIGXCPU) if one comparison spins in C code well past its budget, where
    neither the alarm nor, once the caller has died, anyone else can stop it."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = int(usage.ru_utime + usage.ru_stime + budget_s) + 3
    if hard == resource.RLIM_INFINITY or soft <= hard:
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def serve(requests: IO[bytes], replies: IO[str]) -> None:
    """Answer requests until end of input."""
    import math_verify  # noqa: F401 - the slow import happens before "ready", outside any comparison's budget

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    replies.write(json.dumps({"ready": True}) + "\n")
    replies.flush()
    for line in requests:
        try:
            request = json.loads(line)
            _cpu_backstop(float(request["budget"]))
            equal = compare(str(request["pred"]), str(request["gold"]), float(request["budget"]))
        except _Budget:  # the alarm fired between comparisons' try blocks
            equal = False
        except (ValueError, KeyError, TypeError):
            equal = False
        replies.write(json.dumps({"equal": equal}) + "\n")
        replies.flush()


def main() -> None:
    # The protocol keeps a private copy of stdout; fd 1 then points at stderr, so whatever a library
    # prints cannot corrupt a reply.
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the caller's group: the caller decides
    serve(sys.stdin.buffer, replies)


if __name__ == "__main__":
    main()
