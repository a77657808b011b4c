"""A pool of grading workers (`pruner/grade_worker.py`), safe from any thread and any process.

Why this shape (each point is a case where a single shared worker was wrong, not just slow):
- several workers, one per concurrent caller up to one per CPU (MAX_WORKERS, at least 2): a slow
  answer holds only its own worker, so the other callers are not queued behind it. Each
  comparison's clock starts when a worker takes it, so a caller waiting for a free worker (at
  most GRADE_TIMEOUT_S per comparison ahead of it) never turns a right answer wrong;
- workers are plain `subprocess` children running a module of this package: nothing re-imports
  the caller's `__main__` (a script without a main guard, or read from stdin, runs once), and a
  daemonic `multiprocessing` worker may start them;
- a forked child never talks to its parent's workers (their pipes carry the parent's requests):
  `os.register_at_fork` and a pid check at every use give the child an empty pool of its own;
- a comparison past its bound kills its worker (its own alarm could not reach it: C code) and a
  replacement starts in the background; the start (a Python process importing sympy, seconds)
  is waited for once per worker, outside any comparison's bound.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0   # a worker's start (imports sympy); on a loaded machine this can take tens of seconds
# Comparisons at once: one per CPU this process may use, and at least 2, so one slow answer never
# holds every worker. More would only share the same CPUs: the bound is wall-clock, and 16 sympy
# comparisons on 2 cores each took longer than it (right answers counted wrong).
MAX_WORKERS = max(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2)
_ROOT = str(Path(__file__).resolve().parent.parent)
# sys.path[0] becomes this checkout, not the caller's working directory: a file there named like a
# module math-verify imports cannot shadow it, and `pruner` is this package whatever the cwd.
_BOOT = "import sys; sys.path[0] = sys.argv[1]; from pruner.grade_worker import main; main()"


class WorkerError(RuntimeError):
    """A worker did not start or broke its protocol."""


class Worker:
    """One worker process and its pipes (unbuffered: no lock a fork could leave held)."""

    def __init__(self) -> None:
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", _BOOT, _ROOT], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0, close_fds=True)
        except OSError as exc:  # e.g. a sandbox that forbids new processes
            raise WorkerError(f"cannot start the grading worker: {exc}") from exc
        self.owner = os.getpid()
        self._buffer = b""
        try:
            reply = self._read_line(START_TIMEOUT_S)
        except WorkerError:
            self.kill()
            raise
        if reply is None or not json.loads(reply).get("ready"):
            self.kill()
            raise WorkerError(f"the grading worker did not start within {START_TIMEOUT_S:.0f} s")

    def _read_line(self, timeout: float) -> bytes | None:
        """One line from the worker, or None after `timeout` seconds."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise WorkerError(f"the grading worker (pid {self.proc.pid}) exited")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def ask(self, predicted: str, ground_truth: str, timeout: float, budget: float) -> bool | None:
        """The verdict, or None when it took longer than `timeout` seconds (the worker is then unusable)."""
        assert self.proc.stdin is not None
        request = json.dumps({"pred": predicted, "gold": ground_truth, "budget": budget}) + "\n"
        os.write(self.proc.stdin.fileno(), request.encode("utf-8"))
        reply = self._read_line(timeout)
        return None if reply is None else bool(json.loads(reply)["equal"])

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._close_pipes()

    def close(self) -> None:
        """End of input: the worker exits by itself."""
        self._close_pipes()
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.kill()

    def abandon(self) -> None:
        """In a forked child: drop this process's copies of the parent's pipes; the worker is not ours."""
        self._close_pipes()
        self.proc.returncode = 0  # never wait for (or kill) a process that is the parent's child

    def _close_pipes(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


class _State:
    """The pool of this process; a forked child replaces it (its lock may have been held at the fork)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.cond = threading.Condition()
        self.idle: list[Worker] = []
        self.live: set[Worker] = set()
        self.starting = 0


_state = _State()


def _forked() -> None:
    """In a forked child (also called on a pid change the hook missed): a pool of our own."""
    global _state
    inherited, _state = _state, _State()
    for worker in list(inherited.live):  # also those a parent's thread was using at the fork
        worker.abandon()


os.register_at_fork(after_in_child=_forked)


def _current() -> _State:
    if _state.pid != os.getpid():
        _forked()
    return _state


def take() -> Worker:
    """An idle worker, a new one while fewer than MAX_WORKERS run (its start waited for here, outside
    any comparison's bound), or else the next one given back (within GRADE_TIMEOUT_S: a busy worker
    answers or is killed by then)."""
    state = _current()
    with state.cond:
        while True:
            while state.idle:
                worker = state.idle.pop()
                if worker.proc.poll() is None:
                    return worker
                state.live.discard(worker)  # died while idle (killed from outside): never asked
            if len(state.live) + state.starting < MAX_WORKERS:
                state.starting += 1
                break
            state.cond.wait()
    return _start(state)


def _start(state: _State) -> Worker:
    """Start a worker for a slot reserved in `state.starting`."""
    try:
        worker = Worker()
    except BaseException:
        with state.cond:
            state.starting -= 1
            state.cond.notify()
        raise
    with state.cond:
        state.starting -= 1
        state.live.add(worker)
    return worker


def give_back(worker: Worker) -> None:
    state = _current()
    with state.cond:
        if worker.owner == state.pid and worker in state.live:
            state.idle.append(worker)
            state.cond.notify()
            return
    worker.close()


def discard(worker: Worker) -> None:
    """Kill a worker past its bound, and start its replacement in the background."""
    state = _current()
    with state.cond:
        state.live.discard(worker)
        state.starting += 1
    worker.kill()
    threading.Thread(target=_prestart, args=(state,), name="grade-worker-start", daemon=True).start()


def _prestart(state: _State) -> None:
    try:
        give_back(_start(state))
    except Exception as exc:  # noqa: BLE001 - the next caller starts one itself
        log.debug("grading worker replacement failed: %s", exc)


def alarm_budget(timeout: float) -> float:
    """The comparison's own alarm inside a `timeout`-second bound: it fires first, leaving time to answer."""
    return max(0.5, timeout - 0.5)


def compare(predicted: str, ground_truth: str, timeout: float) -> bool:
    """The worker's verdict within `timeout` seconds of asking; False (and the worker replaced) past it."""
    worker = take()
    try:
        verdict = worker.ask(predicted, ground_truth, timeout, budget=alarm_budget(timeout))
    except (WorkerError, OSError, ValueError, KeyError) as exc:  # it died or broke the protocol
        log.debug("grading worker failed for %r vs %r: %s", predicted, ground_truth, exc)
        verdict = None
    if verdict is None:
        log.warning("grading %r vs %r took over %.0f s: counted wrong", predicted[:80], ground_truth[:80], timeout)
        discard(worker)
        return False
    give_back(worker)
    return verdict


@atexit.register
def _shutdown() -> None:
    state = _current()
    with state.cond:
        workers, state.idle = list(state.idle), []
        state.live.clear()
    for worker in workers:
        worker.close()
