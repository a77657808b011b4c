"""The run manifest and the output lock every stage uses (pruner/manifest.py)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pruner.manifest import Output, OutputLock, RunStateError, build_manifest, claim_output, diff_manifests

ROOT = Path(__file__).resolve().parent.parent


def _m(**config) -> dict:
    return build_manifest("stage", {"a": 1, "b": {"c": 2}, "stop": 5, **config}, {"model": "sha256:x"},
                          volatile=("stop",), note="not compared")


def test_diff_names_nested_fields_and_ignores_volatile_and_extra() -> None:
    assert diff_manifests(_m(), {**_m(stop=9), "note": "other"}) == []
    assert diff_manifests(_m(), _m(a=3, b={"c": 4})) == ["config.a: was 1, now 3", "config.b.c: was 2, now 4"]
    other_input = {**_m(), "inputs": {"model": "sha256:y"}}
    assert diff_manifests(_m(), other_input) == ["inputs.model: was 'sha256:x', now 'sha256:y'"]


def test_claim_resume_refuse_overwrite(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    out = Output.folder(folder)
    with claim_output(out, _m(), what="folder", resume=False, overwrite=False):
        (folder / "result.txt").write_text("run 1")
    with claim_output(out, _m(stop=7), what="folder", resume=True, overwrite=False):
        pass  # identical but for a volatile field: continues
    with pytest.raises(RunStateError, match="pass --resume"):
        claim_output(out, _m(), what="folder", resume=False, overwrite=False)
    with pytest.raises(RunStateError, match=r"config\.a: was 1, now 2.*--overwrite"):
        claim_output(out, _m(a=2), what="folder", resume=True, overwrite=False)
    with pytest.raises(ValueError, match="contradict"):
        claim_output(out, _m(), what="folder", resume=True, overwrite=True)
    assert (folder / "result.txt").read_text() == "run 1"  # refusals touch nothing
    with claim_output(out, _m(a=2), what="folder", resume=False, overwrite=True):
        assert not (folder / "result.txt").exists()  # deleted before the new run writes
    assert json.loads((folder / "manifest.json").read_text())["config"]["a"] == 2
    assert not (folder / ".lock").exists()


def test_files_without_a_manifest_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "legacy"
    folder.mkdir()
    (folder / "checkpoints").mkdir()
    with pytest.raises(RunStateError, match="without a run manifest"):
        claim_output(Output.folder(folder), _m(), what="folder", resume=True, overwrite=False)
    claim_output(Output.folder(folder), _m(), what="folder", resume=False, overwrite=True).release()
    assert [p.name for p in folder.iterdir()] == ["manifest.json"]


def test_an_input_inside_the_output_is_refused(tmp_path: Path) -> None:
    """--overwrite would delete it: e.g. --out runs/x with --data runs/x/trainset."""
    (tmp_path / "run" / "trainset").mkdir(parents=True)
    for inputs in ([tmp_path / "run" / "trainset"], [tmp_path / "run"]):
        with pytest.raises(ValueError, match="lies inside the output"):
            claim_output(Output.folder(tmp_path / "run"), _m(), what="f", resume=False, overwrite=True, inputs=inputs)
    assert (tmp_path / "run" / "trainset").is_dir()
    claim_output(Output.folder(tmp_path / "other"), _m(), what="f", resume=False, overwrite=False,
                 inputs=[tmp_path / "run" / "trainset"]).release()


def _holder(lock: Path) -> subprocess.Popen:
    code = ("import time; from pathlib import Path; from pruner.manifest import OutputLock; "
            f"l = OutputLock(Path({str(lock)!r}), 'x').acquire(); print('held', flush=True); time.sleep(300)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_refuses_a_second_writer_and_is_stale_after_the_owner_dies(tmp_path: Path) -> None:
    lock = tmp_path / "out.lock"
    proc = _holder(lock)
    try:
        with pytest.raises(RunStateError, match=rf"another process \(pid={proc.pid} host="):
            OutputLock(lock, "the output").acquire()
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # kill -9: no cleanup runs, the lock file stays behind
        proc.wait()
    assert lock.exists()
    with OutputLock(lock, "the output"):
        assert f"pid={os.getpid()}" in lock.read_text()
    assert not lock.exists()


def test_lock_falls_back_to_pid_and_host_without_flock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import socket

    import pruner.manifest as manifest

    def no_flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "no locks on this file system")

    monkeypatch.setattr(manifest.fcntl, "flock", no_flock)
    lock = tmp_path / "out.lock"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        lock.write_text(f"pid={proc.pid} host={socket.gethostname()}\n")
        with pytest.raises(RunStateError, match=f"pid={proc.pid}"):
            OutputLock(lock, "x").acquire()
    finally:
        proc.kill()
        proc.wait()
    OutputLock(lock, "x").acquire().release()  # the recorded owner is dead: stale, taken over
