"""The problem sets of `bench/speed.py --data`, by name or path, and the names that become file names.

A set is named (`math500`, `o1pruner/gaokao`, ...: files of the shared data folder), `embedded:test|train`,
a .json/.jsonl/.parquet file, or a hub id `org/name[:split]`. Anything else is refused with the known
names listed. Every name that ends up in a path under --out (models, sets) is either checked against a
safe pattern (model names: the user picks them) or mapped to a safe file name (set labels: they may be paths).
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> file under the shared data folder (../shared/data, or $O1PRUNER_DATA).
KNOWN_SETS = {
    "math500": "math500.jsonl",
    "gsm8k": "gsm8k_test.jsonl",
    "aime24": "aime24.jsonl",
    "amc23": "amc23.jsonl",
    "o1pruner/math_test": "o1pruner/math_test.json",
    "o1pruner/gsm8k": "o1pruner/gsm8k.json",
    "o1pruner/gaokao": "o1pruner/gaokao.json",
}
EMBEDDED_SETS = ("embedded:test", "embedded:train")
DATA_SUFFIXES = (".json", ".jsonl", ".parquet")
# A model name names raw_<name>.json and vllm-<name>.log in --out: no separators, no leading dot.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+(:\w+)?")


@dataclass(frozen=True)
class ProblemSet:
    label: str  # how tables and results.json name it
    source: str  # what pruner.problems.load_problems reads


def data_root() -> Path:
    """$O1PRUNER_DATA, else the nearest `shared/data` above the checkout (a git worktree sits deeper)."""
    if os.environ.get("O1PRUNER_DATA"):
        return Path(os.environ["O1PRUNER_DATA"])
    for parent in ROOT.parents:
        if (parent / "shared" / "data").is_dir():
            return parent / "shared" / "data"
    return ROOT.parent / "shared" / "data"


def known_names() -> str:
    return ", ".join([*KNOWN_SETS, *EMBEDDED_SETS]) + ", a .json/.jsonl/.parquet file or a hub id org/name[:split]"


def resolve_set(name: str) -> ProblemSet:
    """The set `--data NAME` means; an unknown name is a ValueError listing the known ones."""
    if name in KNOWN_SETS:
        path = data_root() / KNOWN_SETS[name]
        if not path.is_file():
            raise FileNotFoundError(f"--data {name}: {path} does not exist (set $O1PRUNER_DATA to the folder "
                                    "that holds the shared data sets)")
        return ProblemSet(name, str(path))
    if name in EMBEDDED_SETS:
        return ProblemSet(name, name)
    path = Path(name).expanduser()
    if path.is_file():
        return ProblemSet(path.stem, name)
    if path.suffix.lower() in DATA_SUFFIXES:
        raise FileNotFoundError(f"--data {name}: no such file (looked at {path.resolve()})")
    # org/name is a hub id, except under a prefix of the known names (o1pruner/gsm8 is a typo, not a hub set).
    prefixes = {known.split("/")[0] for known in KNOWN_SETS if "/" in known}
    if _HUB_ID.fullmatch(name) and name.split("/")[0] not in prefixes and not name.startswith("."):
        return ProblemSet(name, name)
    raise ValueError(f"--data {name!r} is not a known set: use one of {known_names()}")


def resolve_sets(names: list[str]) -> list[ProblemSet]:
    if not names:
        raise ValueError(f"--data needs at least one set: {known_names()}")
    sets = [resolve_set(name) for name in names]
    labels = [s.label for s in sets]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"--data names the set(s) {repeated} twice (a file's stem names its set)")
    return sets


def check_model_name(name: str) -> str:
    """A model name is a file name in --out: refused unless it matches SAFE_NAME (`../escape` is not one)."""
    if not SAFE_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"--models name {name!r}: use letters, digits, '.', '_', '-' or '+' (up to 64, no '..', "
                         "not starting with '.'), since it names files in --out")
    return name


def safe_filename(label: str) -> str:
    """A file name for `label` (a set name or path): unsafe characters become '-', plus a short hash when
    anything was changed, so two labels never share a file."""
    cleaned = re.sub(r"[^A-Za-z0-9._+-]+", "-", label).strip(".-")[:48] or "set"
    if cleaned == label:
        return label
    return f"{cleaned}-{hashlib.sha1(label.encode()).hexdigest()[:8]}"


def set_limits(sets: list[ProblemSet], names: list[str], limit: int | None, per_set: list[str]) -> dict[str, int | None]:
    """How many problems of each set to take: `--set-limit NAME=N` for the sets it names, `--limit` for the rest.
    NAME is a set as `--data` names it (or its label); an entry naming no set of `--data` is a ValueError."""
    from pruner.problems import check_limit

    check_limit(limit, "--limit")
    limits: dict[str, int | None] = {s.label: limit for s in sets}
    label_of = {**{s.label: s.label for s in sets}, **dict(zip(names, (s.label for s in sets)))}
    seen: set[str] = set()
    for entry in per_set:
        name, sep, count = entry.rpartition("=")
        if not sep or not name or not count.isdigit():
            raise ValueError(f"--set-limit entries look like NAME=N (N a positive number of problems), got {entry!r}")
        if name not in label_of:
            raise ValueError(f"--set-limit {entry!r}: {name!r} is not one of the sets of --data ({', '.join(names)})")
        if label_of[name] in seen:
            raise ValueError(f"--set-limit names the set {name!r} twice")
        seen.add(label_of[name])
        limits[label_of[name]] = check_limit(int(count), f"--set-limit {name}")
    return limits


def load_sets(sets: list[ProblemSet], names: list[str], limit: int | None, per_set: list[str]
              ) -> dict[str, list[dict]]:
    """The sets `resolve_sets(names)` gave, each cut to its limit (`set_limits`), by label."""
    limits = set_limits(sets, names, limit, per_set)
    return {s.label: load_set(s, limits[s.label]) for s in sets}


def load_set(problem_set: ProblemSet, limit: int | None) -> list[dict]:
    """A set's problems; a set in which no record has a usable answer is an error here, before any engine."""
    from pruner.problems import ANSWER_FIELDS, NoUsableAnswerError, load_problems

    try:
        problems = load_problems(problem_set.source, limit=limit)
    except NoUsableAnswerError as exc:  # its hint names pre-sampling's --answer-field, which this script lacks
        raise ValueError(f"--data {problem_set.label} ({problem_set.source}): no problem with a usable answer "
                         f"(none of the fields {'/'.join(ANSWER_FIELDS)} holds one; its records have the fields "
                         f"{exc.fields}), so nothing can be graded") from None
    return problems
