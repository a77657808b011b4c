"""Worker processes that never outlive the benchmark that started them.

Each per-model worker of `bench/speed.py` runs in a process group of its own (vLLM's engine-core and
worker processes, on GPUs, join it) and is told by the kernel when its parent dies
(prctl PR_SET_PDEATHSIG): a SIGKILLed parent still takes its workers with it. A SIGTERM, SIGINT or SIGHUP
to the parent kills every worker's group and waits until none of its processes is left before the
parent exits, so nothing is written to --out after the parent is gone. Linux only for the death signal;
elsewhere the group and the handler remain.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from pathlib import Path
from types import FrameType
from typing import Sequence

_PR_SET_PDEATHSIG = 1
# Signals that end the benchmark; each stops the workers first.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

_live: dict[int, subprocess.Popen] = {}  # pid -> worker, while it runs


def _set_death_signal(sig: int = signal.SIGTERM) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the group and the parent's handler remain
        pass


def _child_setup(parent: int) -> None:
    """Runs in the child between fork and exec (the death signal survives exec)."""
    _set_death_signal()
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(1)


def group_alive(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes of group `pgid`."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses, so split after the last ')'
        fields = text[text.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def kill_group(pgid: int, timeout: float = 10.0) -> None:
    """SIGKILL every process of group `pgid` and wait until none is left running."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)


def stop_all() -> None:
    # No proc.wait() here: the handler interrupts Popen.wait, which holds the Popen's (non-reentrant) lock.
    # A killed worker left as a zombie writes nothing; the exiting parent's end reaps it.
    for pid in list(_live):
        kill_group(pid)
        _live.pop(pid, None)


def _on_stop_signal(signum: int, frame: FrameType | None) -> None:
    stop_all()
    raise SystemExit(128 + signum)


def install_stop_handlers() -> None:
    """In the parent: a stop signal ends every worker before the parent goes."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_stop_signal)


def run_worker(cmd: Sequence[str], *, env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None,
               on_start: object = None) -> int:
    """Run `cmd` as a worker (own process group, dies with this process); returns its exit code.
    `on_start(pid)` is called once it runs (bench/speed.py prints the pid)."""
    install_stop_handlers()
    parent = os.getpid()
    proc = subprocess.Popen(list(cmd), env=env, cwd=cwd, process_group=0,
                            preexec_fn=lambda: _child_setup(parent))
    _live[proc.pid] = proc
    try:
        if callable(on_start):
            on_start(proc.pid)
        code = proc.wait()
    finally:
        # Whatever ends the wait (an error here, KeyboardInterrupt), the worker's group goes with it.
        kill_group(proc.pid, timeout=5.0)
        _live.pop(proc.pid, None)
    return code


def exit_with_parent() -> None:
    """In a worker: a stop signal (the death signal included) kills the worker's whole group at once,
    engine processes too, and nothing more is written."""
    _set_death_signal()

    def kill_own_group(signum: int, frame: FrameType | None) -> None:
        if os.getpgrp() == os.getpid():  # a worker leads its group; run by hand it would share the shell's
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os._exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, kill_own_group)
