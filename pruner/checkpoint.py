"""Resumable training state through torch.distributed.checkpoint (the Hugging Face export: pruner/export.py).

A checkpoint is a folder `step-XXXXXXX/` holding the sharded model and optimizer (DCP) plus one
small `trainer-rank{r}.json` per rank (scheduler, step, RNG). It is written under a temporary name
and renamed only when every rank has finished, so a run killed mid-save never resumes from a
half-written checkpoint. Nothing in it is read through an unrestricted unpickler
(`pruner/safe_load.py`): a checkpoint from someone else cannot run code here.

`--resume` takes the newest checkpoint that is complete on every rank (rank 0 lists them, every
rank checks its own files, the ranks agree); a damaged newer one (a truncated copy, a kill
outside the rename's protection) is set aside as `step-XXXXXXX.damaged`, and the log says so.
"""
from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from pruner.distributed import Dist, all_gather_object, barrier, decided_by_main, print0
from pruner.safe_load import (DamagedFileError, SafeFileSystemReader, SafeLoadPlanner, UnsafeFileError,
                              check_dcp_files, load_weights_only, read_dcp_metadata, unwrap_checkpoint_error)

_PREFIX = "step-"
_NAME = re.compile(r"step-(\d+)")
_TRAINER = re.compile(r"trainer-rank(\d+)\.(json|pt)")
TRAINER_FORMAT = "o1-pruner trainer state"


def _b64(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def _rng_state() -> dict:
    """Every generator's state as JSON values (byte states in base64)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
             "torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    """From `_rng_state`'s JSON form, or from an older version's `.pt` (tuples, arrays, tensors)."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(i) for i in internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((str(kind), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    as_tensor = (lambda s: _unb64(s) if isinstance(s, str) else s)  # noqa: E731
    torch.set_rng_state(as_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([as_tensor(s) for s in state["cuda"]])


def checkpoints(root: Path) -> list[Path]:
    """The checkpoint folders under `root`, oldest first (never a `.tmp` or a `.damaged` one)."""
    found = [p for p in root.glob(f"{_PREFIX}*") if p.is_dir() and _NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint folder this process sees (`resume_checkpoint` also checks it and agrees
    across ranks)."""
    done = checkpoints(root)
    return done[-1] if done else None


def _write_trainer_state(path: Path, state: dict) -> None:
    path.write_text(json.dumps({"format": TRAINER_FORMAT, "version": 1, **state}))


def read_trainer_state(checkpoint: Path, rank: int) -> dict:
    """Rank `rank`'s trainer state (step, scheduler, RNG, extras): `trainer-rank<r>.json`, or an older
    version's `.pt` read as weights only. DamagedFileError names the file and the field."""
    path = checkpoint / f"trainer-rank{rank}.json"
    if path.exists():
        try:
            state = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise DamagedFileError(f"{path}: not valid JSON ({exc}); the file is truncated or corrupt") from None
        if not isinstance(state, dict) or state.get("format") != TRAINER_FORMAT:
            raise DamagedFileError(f"{path}: not an o1-pruner trainer state (field format)")
    elif (legacy := checkpoint / f"trainer-rank{rank}.pt").exists():
        state = load_weights_only(legacy)
        path = legacy
        if not isinstance(state, dict):
            raise DamagedFileError(f"{path}: holds {type(state).__name__}, not a trainer state")
    else:
        raise DamagedFileError(f"{path}: missing")
    for name, kind in (("step", int), ("scheduler", dict), ("rng", dict)):
        if not isinstance(state.get(name), kind):
            raise DamagedFileError(f"{path}: field {name} is missing or not a{'n' if kind is int else ''} "
                                   f"{kind.__name__}")
    return state


def _ranks_written(checkpoint: Path) -> int:
    ranks = {int(m.group(1)) for p in checkpoint.iterdir() if (m := _TRAINER.fullmatch(p.name))}
    return max(ranks) + 1 if ranks else 0


def checkpoint_problem(checkpoint: Path, d: Dist) -> tuple[str, str] | None:
    """What this rank finds wrong with `checkpoint`, before any weight is read: None, or (kind, message)
    where kind is "damaged" (an earlier checkpoint may do), "unsafe" or "mismatch" (stop)."""
    if not checkpoint.is_dir():
        return ("damaged", f"{checkpoint}: not found by this process (checkpoints must be on a filesystem "
                           "every process sees)")
    written = _ranks_written(checkpoint)
    if written and written != d.world_size:
        return ("mismatch", f"{checkpoint}: written by {written} process(es), this run has {d.world_size}; resume "
                            f"with the same --nproc_per_node as the run that wrote it")
    try:
        check_dcp_files(checkpoint, read_dcp_metadata(checkpoint))
        read_trainer_state(checkpoint, d.rank)
    except UnsafeFileError as exc:
        return ("unsafe", str(exc))
    except (DamagedFileError, OSError) as exc:
        return ("damaged", str(exc))
    return None


def resume_checkpoint(root: Path, d: Dist) -> Path | None:
    """The newest checkpoint under `root` that every rank finds complete, the same on every rank (rank 0
    lists, every rank checks its own view, all agree). A damaged newer one is set aside (renamed
    `.damaged`, so pruning never keeps it over a good one) and the log says so; a crafted one, or one
    of another world size, stops the run on every rank. None: there is no checkpoint at all."""
    # rank 0's listing, and its spelling of the folder, so every rank says the same
    shown, names = decided_by_main(lambda: (str(root), [p.name for p in reversed(checkpoints(root))]))
    skipped: list[tuple[str, str]] = []
    for name in names:
        found = [(r, p) for r, p in enumerate(all_gather_object(checkpoint_problem(root / name, d))) if p]
        said = lambda items: "; ".join(dict.fromkeys(  # noqa: E731
            f"rank {r}: {m}" if d.world_size > 1 else m for r, (_, m) in items))
        fatal = [(r, p) for r, p in found if p[0] != "damaged"]
        if fatal:
            raise (UnsafeFileError if fatal[0][1][0] == "unsafe" else FileNotFoundError)(said(fatal))
        if not found:
            _set_aside(root, [n for n, _ in skipped], name, d)
            return root / name
        print0(f"checkpoint {root / name} is damaged: {said(found)}")
        skipped.append((name, said(found)))
    if skipped:
        raise DamagedFileError(f"no checkpoint in {shown} is complete: " + "; ".join(m for _, m in skipped)
                               + ". Nothing to resume: restore the folder from a copy, or rerun with --overwrite "
                               "to start afresh")
    return None


def _set_aside(root: Path, skipped: list[str], chosen: str, d: Dist) -> None:
    """Rename the damaged checkpoints newer than `chosen` (rank 0), so a later save or prune never mixes them in."""
    if skipped:
        print0(f"resuming from the previous complete checkpoint {root / chosen} instead; set aside as "
               + ", ".join(f"{n}.damaged" for n in skipped))
    if d.is_main:
        for name in skipped:
            aside = root / f"{name}.damaged"
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(root / name, aside)
    barrier()


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, extra: dict, d: Dist, keep: int = 2) -> Path:
    final = root / f"{_PREFIX}{step:07d}"
    tmp = root / f"{final.name}.tmp"
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    _write_trainer_state(tmp / f"trainer-rank{d.rank}.json",
                         {"step": step, "scheduler": scheduler.state_dict(), "rng": _rng_state(), **extra})
    barrier()
    if d.is_main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, d: Dist) -> dict[str, Any]:
    """Load `path` into the model, optimizer, schedule and RNGs; the trainer state as a dict."""
    # first: a crafted, missing or damaged file stops here, before any weight moves
    trainer = read_trainer_state(path, d.rank)
    metadata = read_dcp_metadata(path)
    check_dcp_files(path, metadata)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(state, checkpoint_id=str(path), storage_reader=SafeFileSystemReader(path, metadata),
                 planner=SafeLoadPlanner(path))
    except BaseException as exc:  # torch wraps every rank's failure into a CheckpointException (a BaseException)
        inner = unwrap_checkpoint_error(exc)
        if inner is exc:
            raise
        raise inner from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    scheduler.load_state_dict(trainer["scheduler"])
    _set_rng_state(trainer["rng"])
    return trainer
