"""Grading is right, not just bounded, wherever `grade()` is called (issue 25).

Each case failed on the single shared worker process of the previous version: 16 threads behind
one slow answer (0 of 15 right), a forked child of a process that had graded (wrong after 4 s), a
daemonic `multiprocessing.Pool` worker (hung), a script without a main guard (ran twice; failed
from stdin). The process cases run in a fresh interpreter, as a user's program would.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO_ROOT, run_script
from pruner import grade_pool
from pruner.grading import GRADE_TIMEOUT_S, grade

RIGHT = [(r"\boxed{\frac{1}{2}}", "0.5"), (r"\boxed{\dfrac{14}{3}}", r"\frac{14}{3}"), (r"\boxed{90^\circ}", "90"),
         (r"\boxed{\left(3, \frac{\pi}{2}\right)}", r"\left( 3, \frac{\pi}{2} \right)"), (r"\boxed{\sqrt{4}}", "2")]
WRONG = (r"\boxed{\frac{1}{3}}", "0.5")
SLOW = (r"\boxed{" + "(" * 300 + "1" + ")" * 300 + "}", "2")   # sympy's parser blows up: only the bound ends it
ENV = {"PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'kernels'}"}


def _threads(cases: list[tuple[str, str]]) -> list[tuple[bool, float]]:
    """Grade every case in its own thread, all at once: (verdict, seconds) per case."""
    results: list[tuple[bool, float]] = [(False, -1.0)] * len(cases)
    barrier = threading.Barrier(len(cases))

    def one(i: int) -> None:
        barrier.wait()
        t0 = time.perf_counter()
        verdict = grade(*cases[i])
        results[i] = (verdict, time.perf_counter() - t0)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not any(t.is_alive() for t in threads), "grading hung in a thread"
    return results


@pytest.mark.slow
def test_sixteen_threads_one_slow_answer_costs_only_its_own_verdict() -> None:
    cases = [SLOW] + [RIGHT[i % len(RIGHT)] for i in range(15)]
    first = _threads(cases)   # cold: each thread's worker starts (seconds, outside the bound)
    assert [v for v, _ in first[1:]] == [True] * 15 and first[0][0] is False
    warm = _threads(cases)    # warm: every comparison within its bound, none queued behind the slow one
    assert [v for v, _ in warm[1:]] == [True] * 15 and warm[0][0] is False
    assert max(s for _, s in warm) <= GRADE_TIMEOUT_S + 1.0, warm
    assert max(s for _, s in warm[1:]) < GRADE_TIMEOUT_S / 2, warm  # the right ones did not wait for the slow one


@pytest.mark.slow
def test_a_worker_that_stops_answering_is_replaced() -> None:
    assert grade(*RIGHT[0]) is True
    worker = grade_pool.take()         # the idle worker the next grade would use: freeze it (as C code would)
    os.kill(worker.proc.pid, signal.SIGSTOP)
    grade_pool.give_back(worker)
    t0 = time.perf_counter()
    assert grade(*RIGHT[1]) is False   # its verdict is lost ...
    assert time.perf_counter() - t0 <= GRADE_TIMEOUT_S + 1.0
    assert worker.proc.poll() is not None   # ... the frozen worker is killed ...
    assert grade(*RIGHT[1]) is True and grade(*WRONG) is False   # ... and grading goes on


FORK = r"""
import os, sys, time
from pruner.grading import grade
assert grade(r"\boxed{\frac{1}{2}}", "0.5")        # the parent has a worker
pid = os.fork()
if pid == 0:
    t0 = time.perf_counter()
    ok = [grade(r"\boxed{\frac{1}{2}}", "0.5"), grade(r"\boxed{\sqrt{4}}", "2"), not grade(r"\boxed{\frac{1}{3}}", "0.5")]
    os.write(1, f"child {ok} {time.perf_counter() - t0:.2f}\n".encode())
    os._exit(0 if all(ok) else 1)
_, status = os.waitpid(pid, 0)
print("parent", grade(r"\boxed{90^\circ}", "90"), os.waitstatus_to_exitcode(status))
"""


@pytest.mark.slow
def test_a_forked_child_of_a_process_that_graded(tmp_path) -> None:
    out = run_script(tmp_path, FORK, env=ENV, timeout=120).stdout
    # once each: the script is never re-run by a worker importing it as its main module
    assert out.count("child [True, True, True]") == 1 and out.count("parent") == 1 and "parent True 0" in out, out


POOL = r"""
import multiprocessing, sys, threading, time
from pruner.grading import grade

def job(case):
    t0 = time.perf_counter()
    in_thread = []
    thread = threading.Thread(target=lambda: in_thread.append(grade(*case)))   # a thread of the pool worker too
    thread.start()
    verdict = grade(*case)
    thread.join()
    assert in_thread == [verdict], (in_thread, verdict)
    return multiprocessing.current_process().daemon, verdict, time.perf_counter() - t0

if __name__ == "__main__":
    cases = [(r"\boxed{\frac{1}{2}}", "0.5"), (r"\boxed{\frac{1}{3}}", "0.5"), (r"\boxed{\sqrt{4}}", "2")] * 2
    assert grade(*cases[0])   # the parent has workers: a forked pool worker inherits them
    for method in ("fork", "spawn"):
        with multiprocessing.get_context(method).Pool(2) as pool:
            got = pool.map_async(job, cases).get(timeout=120)
        print(method, [v for _, v, _ in got], all(d for d, _, _ in got), f"{max(s for _, _, s in got):.2f}")
"""


@pytest.mark.slow
def test_inside_a_daemonic_pool_worker(tmp_path) -> None:
    out = run_script(tmp_path, POOL, env=ENV, timeout=300).stdout
    for method in ("fork", "spawn"):
        assert f"{method} [True, False, True, True, False, True] True" in out, out


NO_GUARD = r"""
import time
print("RUN", flush=True)
from pruner.grading import grade
t0 = time.perf_counter()
print("VERDICT", grade(r"\boxed{\frac{1}{2}}", "0.5"), grade(r"\boxed{\frac{1}{3}}", "0.5"), flush=True)
"""


@pytest.mark.slow
def test_a_script_without_a_main_guard_runs_once_as_a_file_and_from_stdin(tmp_path) -> None:
    as_file = run_script(tmp_path, NO_GUARD, env=ENV, timeout=120).stdout
    from_stdin = subprocess.run([sys.executable, "-"], input=NO_GUARD, capture_output=True, text=True,
                                cwd=tmp_path, env={**os.environ, **ENV}, timeout=120)
    assert from_stdin.returncode == 0, from_stdin.stderr[-3000:]
    for out in (as_file, from_stdin.stdout):
        assert out.count("RUN") == 1 and "VERDICT True False" in out, out
