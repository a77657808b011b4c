"""The training-set folder format: what `pruner/dataset.py` writes and the trainer reads.

    trainset.safetensors   flat tensors: input_ids, offsets, prompt/response lengths, rewards, advantages, ...
    meta.json              format, kind, model, tokenizer fingerprint, lam, reward mean/std, the samples' sampling
    problem_stats.jsonl    one row per problem: ref_mean_length, ref_mean_accuracy, k, ids (rows of `problem_index`)
    manifest.json          the run manifest (pruner/manifest.py): settings + fingerprints of the inputs

The trainer and the on-policy rounds read a set through this module only, so neither sits above the
stage that builds it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TRAINSET_FORMAT = "o1-pruner-trainset/1"
TENSORS = "trainset.safetensors"
META = "meta.json"
STATS = "problem_stats.jsonl"


def stats_file(path: str | Path) -> Path:
    """A set's problem_stats.jsonl, given the file itself or the training-set folder holding it."""
    p = Path(path)
    return p / STATS if p.is_dir() else p


def read_stats(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in stats_file(path).read_text().splitlines() if line.strip()]


def read_meta(folder: str | Path) -> dict[str, Any]:
    """meta.json of a training-set folder; a folder without one names the commands that build it."""
    path = Path(folder) / META
    if not path.exists():
        raise FileNotFoundError(f"training set {folder} not found (no {path}): build it with "
                                "`python pruner/presample.py` then `python pruner/dataset.py`, or pass --data")
    meta = json.loads(path.read_text())
    if meta.get("format") != TRAINSET_FORMAT:
        raise ValueError(f"{path}: field format is {meta.get('format')!r}, expected {TRAINSET_FORMAT!r}")
    return meta


def write_files(out: Path, tensors: dict, meta: dict[str, Any], stats: list[dict]) -> None:
    """The set's three data files (the caller holds the folder's lock and wrote its manifest)."""
    from safetensors.torch import save_file

    save_file(tensors, str(out / TENSORS))
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    with (out / STATS).open("w", encoding="utf-8") as fh:
        for row in stats:
            fh.write(json.dumps(row) + "\n")


def load_trainset(path: str | Path) -> dict[str, Any]:
    """A training-set folder as one flat dict: every tensor by name, plus "meta" (meta.json) and
    "stats" (problem_stats.jsonl rows, indexed by the `problem_index` tensor)."""
    from safetensors.torch import load_file

    meta = read_meta(path)
    return {**load_file(str(Path(path) / TENSORS)), "meta": meta, "stats": read_stats(path)}
