"""Problem loading: every math set format of ../shared/data, the embedded task, or a hub dataset.

Each problem comes back as a dict with at least `id`, `problem` and `answer` (a string); the
record's other fields are kept (e.g. `min_tokens`, `level`). The field names are detected
(`problem`/`question`, `answer`/`ground_truth_answer`/`final_answer`) or named by the caller.
"""
from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Iterator

from pruner.embedded.task import make_problems

log = logging.getLogger(__name__)

PROBLEM_FIELDS = ("problem", "question", "prompt", "input")
ANSWER_FIELDS = ("answer", "ground_truth_answer", "final_answer", "gt_answer", "target")
ID_FIELDS = ("id", "unique_id", "idx", "problem_id")
# A math problem is well under 10,000 characters; a 10 MB "problem" is a broken file, and tokenizing it
# took 43 s before the context check could refuse it. Refused on reading, before any tokenizer work.
MAX_PROBLEM_CHARS = 200_000
_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.S)


class ProblemFormatError(ValueError):
    """A malformed problem file; the message names file:line and the field."""


class NoUsableAnswerError(ProblemFormatError):
    """A problem file in which no record has a usable answer; `fields`: the fields its records do have."""

    def __init__(self, message: str, fields: list[str]):
        super().__init__(message)
        self.fields = fields


def _normalise_answer(value: Any) -> str | None:
    """Answer as a string; GSM8K's worked solution `... #### 42` becomes `42`."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        # 27.0 -> "27": numeric sets store integers as floats, and "27" reads better in a prompt
        value = int(value) if value.is_integer() else value
    text = str(value).strip()
    if "####" in text:
        match = _GSM8K_FINAL.search(text)
        text = match.group(1).replace(",", "").strip() if match else ""
    return text or None


def _pick(record: dict, explicit: str | None, candidates: tuple[str, ...]) -> str | None:
    if explicit is not None:
        return explicit
    return next((name for name in candidates if name in record), None)


def _iter_file(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, record) pairs; location is `file:line` (JSONL) or `file[index]` (JSON, parquet)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open("rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                line = _decode(raw, path, lineno)
                if lineno == 1:
                    line = line.removeprefix("\ufeff")  # a UTF-8 BOM (Windows editors write one)
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ProblemFormatError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    elif suffix == ".json":
        raw = path.read_bytes()
        try:
            data = json.loads(raw.decode("utf-8-sig"))  # -sig: a UTF-8 BOM is accepted
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            raise ProblemFormatError(f"{path}:{line}: invalid UTF-8 (byte {exc.start} of the file)") from None
        except json.JSONDecodeError as exc:
            raise ProblemFormatError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if isinstance(data, dict):  # {"data": [...]} / {"problems": [...]} wrappers
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise ProblemFormatError(f"{path}:1: expected a JSON list of problems (or an object holding one list)")
            data = lists[0]
        if not isinstance(data, list):
            raise ProblemFormatError(f"{path}:1: expected a JSON list of problems")
        for index, record in enumerate(data):
            yield f"{path}[{index}]", record
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
        for index, record in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}[{index}]", record
    else:
        raise ProblemFormatError(f"{path}: unsupported file type {suffix!r} (use .json, .jsonl or .parquet)")


def _decode(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProblemFormatError(f"{path}:{lineno}: invalid UTF-8 at byte {exc.start} of the line") from None


def check_limit(limit: int | None, name: str = "limit") -> int | None:
    """None = all problems; a positive N = the first N; anything else is an error naming `name`."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"{name} must be a positive number of problems or None for all, got {limit!r}")
    return limit


def _records_from_hub(source: str) -> Iterator[tuple[str, Any]]:
    name, _, split = source.partition(":")
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"{source!r} is neither a local file nor 'embedded:train|test'; loading it as a hub dataset "
            "needs the `datasets` package (pip install datasets) and network access"
        ) from None
    dataset = datasets.load_dataset(name, split=split or "test")
    for index, record in enumerate(dataset):
        yield f"{name}[{index}]", dict(record)


def _embedded_problems(split: str) -> list[dict]:
    """The embedded task's split ("" = train), answers normalised as for a file."""
    problems = make_problems(split or "train")
    for p in problems:
        p["id"], p["answer"] = str(p["id"]), _normalise_answer(p.get("answer"))
    return problems


def _parse_record(where: str, index: int, record: Any, stem: str,
                  fields: tuple[str | None, str | None, str | None]) -> tuple[str, dict | None, str | None]:
    """(id, problem dict or None when the record has no usable answer, id field) of one record."""
    problem_field, answer_field, id_field = fields
    if not isinstance(record, dict):
        raise ProblemFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    p_field = _pick(record, problem_field, PROBLEM_FIELDS)
    a_field = _pick(record, answer_field, ANSWER_FIELDS)
    if p_field is None or p_field not in record:
        wanted = problem_field or "/".join(PROBLEM_FIELDS)
        raise ProblemFormatError(f"{where}: no problem field {wanted!r} (fields: {sorted(record)}); pass problem_field=")
    problem = record[p_field]
    if not isinstance(problem, str) or not problem.strip():
        raise ProblemFormatError(f"{where}: field {p_field!r} must be a non-empty string")
    if len(problem) > MAX_PROBLEM_CHARS:
        raise ProblemFormatError(f"{where}: field {p_field!r} holds {len(problem)} characters, over the limit of "
                                 f"{MAX_PROBLEM_CHARS} (a math problem is a few thousand): a broken record?")
    answer = _normalise_answer(record.get(a_field)) if a_field is not None else None
    i_field = _pick(record, id_field, ID_FIELDS)
    raw_id = record.get(i_field) if i_field is not None else None
    pid = str(raw_id) if raw_id is not None else f"{stem}-{index}"
    if answer is None:
        return pid, None, i_field
    out = {k: v for k, v in record.items() if k not in (p_field, a_field)}
    out.update(id=pid, problem=problem, answer=answer)
    return pid, out, i_field


def load_problems(
    source: str | Path,
    *,
    problem_field: str | None = None,
    answer_field: str | None = None,
    id_field: str | None = None,
    limit: int | None = None,
) -> list[dict]:
    """Problems from a .json/.jsonl/.parquet file, `embedded:train|test`, or a hub id (`name[:split]`).

    A record without a usable answer is skipped (one warning counts and names them); a
    malformed record raises ProblemFormatError naming file:line and the field. `limit`: None =
    all, N >= 1 = the first N; 0 or negative is a ValueError.
    """
    check_limit(limit)
    source_str = str(source)
    if source_str.startswith("embedded:"):
        problems = _embedded_problems(source_str.split(":", 1)[1])
        return problems[:limit] if limit is not None else problems
    path = Path(source_str).expanduser()
    if not path.exists() and path.suffix.lower() in (".json", ".jsonl", ".parquet"):
        # A missing file is not a hub id: say so here, not through `datasets` trying the hub with the path.
        raise FileNotFoundError(f"problems file {source_str} does not exist (looked at {path.resolve()})")
    records = _iter_file(path) if path.exists() else _records_from_hub(source_str)
    stem = path.stem if path.exists() else source_str.replace("/", "_")
    problems: list[dict] = []
    skipped: list[str] = []
    seen_ids: set[str] = set()
    fields: set[str] = set()
    for index, (where, record) in enumerate(records):
        pid, problem, i_field = _parse_record(where, index, record, stem, (problem_field, answer_field, id_field))
        if problem is None:
            skipped.append(pid)
            fields.update(record)
            continue
        if pid in seen_ids:
            raise ProblemFormatError(f"{where}: duplicate id {pid!r} in field {i_field!r}")
        seen_ids.add(pid)
        problems.append(problem)
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        _refuse_empty(source_str, len(skipped), fields, answer_field)
    if skipped:
        shown = ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else "")
        log.warning("%s: skipped %d record(s) without a usable answer: %s", source_str, len(skipped), shown)
    return problems


def _refuse_empty(source: str, skipped: int, fields: set[str], answer_field: str | None) -> None:
    """No problem at all is an error before any engine starts (not a run of 0 samples), naming what the file has."""
    if not skipped:
        raise ProblemFormatError(f"{source}: no problems in the file")
    wanted = repr(answer_field) if answer_field else "any of " + "/".join(ANSWER_FIELDS)
    raise NoUsableAnswerError(f"{source}: none of its {skipped} record(s) has a usable answer (looked for {wanted}, "
                              f"non-empty); its records have the fields {sorted(fields)}: name the answer field "
                              "with --answer-field", sorted(fields))
