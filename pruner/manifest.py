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
   deleted first, never mixed with the new ones; only what a run of the stage writes, `STAGE_FILES`,
   so a user's files are never deleted). An identical manifest continues (`resume`); stages whose
   re-run is not a continuation (the trainer without `--resume`) refuse that too. An output that
   holds no completed work (a failed start) is taken over instead of refused: the manifest protects
   work, not failed attempts. Inputs whose content is fingerprinted are not compared by path
   (`LOCATED`): a moved run folder or a re-pathed model continues.

Fields that may differ between a run and its continuation (how often to checkpoint, where to
stop, progress bars, ...) are left out of the manifest by each stage's `VOLATILE` list.
"""
from __future__ import annotations

import errno
import fcntl
import fnmatch
import hashlib
import json
import os
import shutil
import socket
import sys
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

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
    """Fingerprint of an upstream manifest: its compared fields only (so re-claims, and moving the
    upstream's inputs, do not change it)."""
    p = Path(path)
    if not p.exists():
        return None
    return json_digest(_compared(json.loads(p.read_text())))


def model_inputs(model: str, tokenizer: Any = None) -> dict[str, str]:
    """Fingerprints of a model folder (config + weights' head and tail) and of its tokenizer."""
    from pruner.model_files import model_fingerprint, tokenizer_fingerprint

    inputs = {"model": model_fingerprint(model)}
    if tokenizer is not None:
        inputs["tokenizer"] = tokenizer_fingerprint(tokenizer)
    return inputs


# Config keys naming an input whose content the stage's `inputs` fingerprint (model files, the training
# set's tensors and manifest, the problems file, the reference statistics): compared by that fingerprint,
# not by the path string, so a run folder moved together with its inputs, or the same model named by a
# relative path, continues. The resolved paths are kept under "located", for readers only.
LOCATED: dict[str, tuple[str, ...]] = {"train": ("model", "data"), "presample": ("model", "problems"),
                                       "dataset": ("ref_stats",), "bench": ("data",)}


def _resolved(value: Any) -> Any:
    if isinstance(value, str) and value and Path(value).expanduser().exists():
        return str(Path(value).expanduser().resolve())
    return value


def build_manifest(stage: str, config: dict[str, Any], inputs: dict[str, Any], *,
                   volatile: Iterable[str] = (), **extra: Any) -> dict[str, Any]:
    """A manifest: `config` without its `volatile` keys and the `LOCATED` ones (their content is in
    `inputs`), the input fingerprints, and `extra` fields kept for readers (not compared)."""
    skip = set(volatile) | set(LOCATED.get(stage, ()))
    return {"format": MANIFEST_FORMAT, "stage": stage,
            "config": {k: v for k, v in sorted(config.items()) if k not in skip},
            "inputs": inputs, "located": {k: _resolved(config[k]) for k in LOCATED.get(stage, ()) if k in config},
            **extra}


def _compared(manifest: dict[str, Any]) -> dict[str, Any]:
    """The fields a continuation must match; `LOCATED` keys left out also where an older manifest has them."""
    view = {k: manifest.get(k) for k in COMPARED}
    located = LOCATED.get(str(manifest.get("stage")), ())
    if isinstance(view["config"], dict):
        view["config"] = {k: v for k, v in view["config"].items() if k not in located}
    return view


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat or {prefix: {}}
    return {prefix: value}


def diff_manifests(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'field: was X, now Y' for every compared field that differs (dotted names)."""
    a, b = _flatten(_compared(old)), _flatten(_compared(new))
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

# What a run of each folder stage writes into its output (name patterns of the folder's entries), and
# which of those hold completed work. `--overwrite` deletes only the first kind; a folder whose
# entries hold no completed work (a run that failed before its first checkpoint or result) is taken
# over by the next run. A file output (the samples file) names its files exactly instead.
STAGE_FILES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "dataset": (("trainset.safetensors", "meta.json", "problem_stats.jsonl", "report", "old_logps-*.safetensors",
                 "old_logps-*.tmp", "manifest.json.tmp"),
                ("trainset.safetensors",)),
    "train": (("checkpoints", "export", "export.tmp", "metrics.jsonl", "metrics.png", "config.json",
               "memory_plan.json", "tensorboard", "round-*", "old_logps-*", "old_logps", "manifest.json.tmp"),
              ("checkpoints/step-*", "export", "metrics.jsonl", "round-*")),
    "bench": (("results.json", "results.md", "raw_*.json", "vllm-*.log", "lengths_*.png", "manifest.json.tmp"),
              ("results.json", "raw_*.json")),
}
_SHOWN = 5  # foreign files named in a refusal


@dataclass
class Output:
    """Where a stage's manifest and lock live, and the paths `overwrite` deletes (a folder: only the
    entries its stage writes, `STAGE_FILES`)."""

    manifest: Path
    lock: Path
    paths: list[Path] = field(default_factory=list)
    incidental: tuple[str, ...] = ()  # kept for callers; STAGE_FILES' work patterns now decide what holds results
    owns: Callable[[Path], bool] | None = None  # a file output: is an existing file one this stage wrote?

    @classmethod
    def folder(cls, folder: str | os.PathLike, incidental: tuple[str, ...] = ()) -> "Output":
        root = Path(folder)
        return cls(manifest=root / "manifest.json", lock=root / ".lock", paths=[root], incidental=incidental)

    def existing(self) -> list[Path]:
        """Output paths present on disk (a folder's contents, without its lock and manifest)."""
        found: list[Path] = []
        for p in self.paths:
            if p.is_dir():
                found += sorted(c for c in p.iterdir() if c not in (self.lock, self.manifest))
            elif p.exists() and p != self.lock and p != self.manifest:
                found.append(p)
        return found

    def split(self, stage: str) -> tuple[list[Path], list[Path]]:
        """(entries a run of `stage` writes, foreign entries) of what exists."""
        owned_names = STAGE_FILES.get(stage, (("*",), ()))[0]
        owned: list[Path] = []
        foreign: list[Path] = []
        for p in self.existing():
            if p.parent in self.paths:
                mine = any(fnmatch.fnmatchcase(p.name, pat) for pat in owned_names)
            else:
                mine = self.owns is None or self.owns(p)
            (owned if mine else foreign).append(p)
        return owned, foreign

    def has_work(self, stage: str) -> bool:
        """Whether the output holds completed work (a checkpoint, samples, results), not just a failed start."""
        patterns = STAGE_FILES[stage][1] if stage in STAGE_FILES else ("*",)
        for index, path in enumerate(self.paths):
            if path.is_dir():
                hits = (hit for pattern in patterns for hit in path.glob(pattern) if not hit.name.endswith(".tmp"))
                if any(hit not in (self.lock, self.manifest) and _non_empty(hit) for hit in hits):
                    return True
            elif index == 0 and path.is_file() and path.stat().st_size > 0:  # a file output's data file
                return True
        return False


def _non_empty(path: Path) -> bool:
    return any(path.iterdir()) if path.is_dir() else path.stat().st_size > 0


def _names(paths: list[Path]) -> str:
    shown = ", ".join(p.name + ("/" if p.is_dir() else "") for p in paths[:_SHOWN])
    return shown + (f" and {len(paths) - _SHOWN} more" if len(paths) > _SHOWN else "")


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

    `resume=True`: an identical manifest continues. `overwrite=True`: what a run of this stage
    wrote (`STAGE_FILES`) is deleted and this run starts afresh; other files are kept, and a
    folder of other files without a manifest is refused. Otherwise outputs from any other (or,
    without `resume`, the same) configuration are refused with the differing fields named, unless
    they hold no completed work (a failed start): those are taken over, with a message. Outputs
    without a manifest (older versions, hand-made files) are refused unless `overwrite`. `inputs`:
    local files/folders this run reads, which must not lie inside its output.
    """
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: choose one")
    _check_inputs_outside(output, inputs)
    lock = OutputLock(output.lock, what).acquire()
    try:
        _reconcile(output, manifest, what=what, resume=resume, overwrite=overwrite, legacy_hint=legacy_hint)
        write_manifest(output.manifest, manifest)
    except BaseException:
        lock.release()
        raise
    return lock


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _reconcile(output: Output, manifest: dict[str, Any], *, what: str, resume: bool, overwrite: bool,
               legacy_hint: str) -> None:
    """Delete, take over, continue or refuse (raises RunStateError naming why and what to do)."""
    stage = str(manifest.get("stage", ""))
    owned, foreign = output.split(stage)
    old = json.loads(output.manifest.read_text()) if output.manifest.exists() else None
    if old is not None and old.get("stage") not in (None, stage):
        raise RunStateError(f"{what} holds a {old.get('stage')} run (its manifest {output.manifest}), not a {stage} "
                            "run: choose another output.")
    if overwrite:
        if foreign and old is None:
            raise RunStateError(f"{what} holds files that no {stage} run writes ({_names(foreign)}) and no run "
                                "manifest: --overwrite deletes only a run's own files, so it will not empty this "
                                "folder. Choose another output, or move those files away.")
        _delete(owned + ([output.manifest] if old is not None else []))
        if foreign:
            _say(f"{what}: --overwrite kept {len(foreign)} file(s) that no {stage} run writes: {_names(foreign)}")
        return
    present = [p for p in owned + foreign if p.name not in output.incidental]
    refusal = _refusal(output, old, manifest, what, resume, legacy_hint, present, foreign)
    if refusal is None:
        return
    if old is not None and not foreign and not output.has_work(stage):  # a failed start of a run of ours
        _delete(owned)
        _say(f"{what}: taking it over: it holds no completed work (no checkpoint, samples or results), only a "
             f"failed attempt's {_names(owned) if owned else 'manifest'}.")
        return
    raise RunStateError(refusal)


def _refusal(output: Output, old: dict[str, Any] | None, manifest: dict[str, Any], what: str, resume: bool,
             legacy_hint: str, present: list[Path], foreign: list[Path]) -> str | None:
    """Why this run may not continue in the output as it stands (None: it may)."""
    if not present and (old is None or resume):
        return None
    if old is None:
        remedy = ("Choose another output, or move them away." if foreign else
                  "Pass --overwrite to delete them and start afresh, or choose another output.")
        return (f"{what} already holds files without a run manifest ({_names(present)}; {output.manifest} is "
                f"missing), so they cannot be checked against this run. {legacy_hint}{remedy}")
    diffs = diff_manifests(old, manifest)
    if diffs:
        return (f"{what} holds another run; its manifest {output.manifest} differs in " + "; ".join(diffs)
                + ". Use another output, or --overwrite to replace it.")
    if not resume:
        return (f"{what} already holds a run with this configuration: pass --resume to continue it or "
                "--overwrite to start afresh.")
    return None
