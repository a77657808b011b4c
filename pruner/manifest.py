"""Run manifests and output locks: no stage silently reuses, mixes or loses another run's state.

Every stage that writes (pre-sampling, the training set, the trainer, the benchmark) claims its
output before any heavy work:

1. a lock: `fcntl.flock` on a lock file next to the output (the OS drops it when the owner dies,
   so a crashed run never blocks the next one); the file records PID and host for the message a
   second writer gets. Where flock is not supported (some network file systems) the PID + host
   recorded in the file decide whether the owner is still alive.
2. a manifest: the stage's resolved configuration plus fingerprints of its inputs (model and
   tokenizer, input files by content hash, upstream manifests). An output whose manifest differs
   is refused, naming the differing fields, unless `overwrite` starts afresh (the old outputs are
   deleted first, never mixed with the new ones). An identical manifest continues (`resume`);
   stages whose re-run is not a continuation (the trainer without `--resume`) refuse that too.

Fields that may differ between a run and its continuation (how often to checkpoint, where to
stop, progress bars, ...) are left out of the manifest by each stage's `VOLATILE` list.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

MANIFEST_FORMAT = "o1-pruner-manifest/1"
COMPARED = ("format", "stage", "config", "inputs")   # what must match; anything else is informational


class RunStateError(RuntimeError):
    """An output holds another run's state (or another writer holds it); the message says what to do."""


def file_digest(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    """sha256 of a file's content, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def bytes_digest(data: bytes) -> str:
    """sha256 of content already in memory, in `file_digest`'s form (the file read once, not twice)."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def json_digest(obj: Any) -> str:
    """sha256 of a JSON value in canonical form (sorted keys)."""
    return "sha256:" + hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def manifest_digest(path: str | os.PathLike) -> str | None:
    """Fingerprint of an upstream manifest: its compared fields only (so re-claims do not change it)."""
    p = Path(path)
    if not p.exists():
        return None
    data = json.loads(p.read_text())
    return json_digest({k: data.get(k) for k in COMPARED})


def model_inputs(model: str, tokenizer: Any = None) -> dict[str, str]:
    """Fingerprints of a model folder (config + weights' head and tail) and of its tokenizer."""
    from pruner.model_files import model_fingerprint, tokenizer_fingerprint

    inputs = {"model": model_fingerprint(model)}
    if tokenizer is not None:
        inputs["tokenizer"] = tokenizer_fingerprint(tokenizer)
    return inputs


def build_manifest(stage: str, config: dict[str, Any], inputs: dict[str, Any], *,
                   volatile: Iterable[str] = (), **extra: Any) -> dict[str, Any]:
    """A manifest: `config` without its `volatile` keys, the input fingerprints, and `extra` fields
    kept for readers (not compared)."""
    skip = set(volatile)
    return {"format": MANIFEST_FORMAT, "stage": stage,
            "config": {k: v for k, v in sorted(config.items()) if k not in skip},
            "inputs": inputs, **extra}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat or {prefix: {}}
    return {prefix: value}


def diff_manifests(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'field: was X, now Y' for every compared field that differs (dotted names)."""
    a = _flatten({k: old.get(k) for k in COMPARED})
    b = _flatten({k: new.get(k) for k in COMPARED})
    return [f"{key}: was {a.get(key)!r}, now {b.get(key)!r}" for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


# ---------------------------------------------------------------------------------------------- lock

_HELD: "weakref.WeakSet[OutputLock]" = weakref.WeakSet()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """An exclusive, non-blocking lock on `path` (a lock file), released by `release()`, by garbage
    collection of this object, or by the OS when the process dies."""

    def __init__(self, path: Path, what: str):
        self.path, self.what, self.fd = Path(path), what, None

    def _owner(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def _refuse(self, owner: str) -> RunStateError:
        return RunStateError(f"{self.what} is being written by another process ({owner}, lock {self.path}); "
                             "wait for it to finish or stop it. Two writers would mix their records.")

    def acquire(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._refuse(self._owner()) from None
            except OSError as exc:  # no flock on this file system: fall back to the recorded PID + host
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(fd)
                    raise
                try:
                    self._check_pid_owner()
                except RunStateError:
                    os.close(fd)
                    raise
            try:  # the previous owner may have unlinked the file between our open and flock
                mine, current = os.fstat(fd), os.stat(self.path)
                same = (mine.st_dev, mine.st_ino) == (current.st_dev, current.st_ino)
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"pid={os.getpid()} host={socket.gethostname()}\n".encode())
            self.fd = fd
            _HELD.add(self)
            return self

    def _check_pid_owner(self) -> None:
        fields = dict(part.split("=", 1) for part in self._owner().split() if "=" in part)
        pid, host = fields.get("pid"), fields.get("host")
        if pid is None or (pid.isdigit() and int(pid) == os.getpid()):
            return
        if host != socket.gethostname() or (pid.isdigit() and _alive(int(pid))):
            raise self._refuse(self._owner())

    def release(self) -> None:
        if self.fd is None:
            return
        try:  # unlink first, then close: a waiter that opened the old file sees the inode change
            if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "OutputLock":
        return self if self.fd is not None else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the OS drops the lock anyway
            pass


def release_all() -> None:
    """Release every lock this process holds (entry points call it on exit, errors included)."""
    for lock in list(_HELD):
        lock.release()


# ------------------------------------------------------------------------------------------- claim

@dataclass
class Output:
    """Where a stage's manifest and lock live, and the paths `overwrite` deletes."""

    manifest: Path
    lock: Path
    paths: list[Path] = field(default_factory=list)
    incidental: tuple[str, ...] = ()  # names written at start-up: deleted by overwrite, but hold no results

    @classmethod
    def folder(cls, folder: str | os.PathLike, incidental: tuple[str, ...] = ()) -> "Output":
        root = Path(folder)
        return cls(manifest=root / "manifest.json", lock=root / ".lock", paths=[root], incidental=incidental)

    def existing(self) -> list[Path]:
        """Output paths present on disk (a folder's contents, without its lock and manifest)."""
        found: list[Path] = []
        for p in self.paths:
            if p.is_dir():
                found += [c for c in p.iterdir() if c not in (self.lock, self.manifest)]
            elif p.exists() and p != self.lock and p != self.manifest:
                found.append(p)
        return found


def _delete(paths: list[Path]) -> None:
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Atomically: a reader never sees half a manifest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)


def _check_inputs_outside(output: Output, inputs: Iterable[str | os.PathLike]) -> None:
    """An input inside the output would be read as this run's input and deleted by --overwrite."""
    for item in inputs:
        src = Path(item).expanduser().resolve()
        for out in output.paths:
            dst = out.resolve()
            if src == dst or dst in src.parents:
                raise ValueError(f"input {item} lies inside the output {out}: choose an output folder of its own")


def claim_output(output: Output, manifest: dict[str, Any], *, what: str, resume: bool, overwrite: bool,
                 legacy_hint: str = "", inputs: Iterable[str | os.PathLike] = ()) -> OutputLock:
    """Lock the output and reconcile its manifest with this run's; returns the held lock.

    `resume=True`: an identical manifest continues. `overwrite=True`: existing outputs are
    deleted and this run starts afresh. Otherwise outputs from any other (or, without `resume`,
    the same) configuration are refused with the differing fields named. Outputs without a
    manifest at all (older versions, hand-made files) are refused unless `overwrite`. `inputs`:
    local files/folders this run reads, which must not lie inside its output.
    """
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: choose one")
    _check_inputs_outside(output, inputs)
    lock = OutputLock(output.lock, what).acquire()
    try:
        existing = output.existing()
        present = [p for p in existing if p.name not in output.incidental]
        old = json.loads(output.manifest.read_text()) if output.manifest.exists() else None
        if overwrite:
            _delete(existing + ([output.manifest] if old is not None else []))
        elif present and old is None:
            raise RunStateError(f"{what} already holds files without a run manifest ({output.manifest} is "
                                f"missing), so they cannot be checked against this run. {legacy_hint}"
                                "Pass --overwrite to delete them and start afresh, or choose another output.")
        elif present:
            diffs = diff_manifests(old, manifest)
            if diffs:
                raise RunStateError(f"{what} holds another run; its manifest {output.manifest} differs in "
                                    + "; ".join(diffs) + ". Use another output, or --overwrite to replace it.")
            if not resume:
                raise RunStateError(f"{what} already holds a run with this configuration: pass --resume to "
                                    "continue it or --overwrite to start afresh.")
        write_manifest(output.manifest, manifest)
    except BaseException:
        lock.release()
        raise
    return lock
