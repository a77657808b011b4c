"""The samples file: one JSON record per sampled response, with its meta, summary and lock beside it.

    runs/default/samples.jsonl              records (`make_record` lists the fields), one per line
    runs/default/samples.jsonl.meta.json    the run manifest: settings, model/tokenizer/problems fingerprints
    runs/default/samples.summary.json       accuracy, lengths, throughput (`summarize`)
    runs/default/samples.jsonl.lock         held while a writer appends

Pre-sampling appends whole chunks with one write + fsync (`append_records`), so a kill leaves
whole chunks plus at most one torn last line, which `read_samples` drops (and with `repair`
cuts). Rewrites (dropping incomplete problems, merging shards) replace the file atomically.
Every reader (the training-set builder, the shard merge, the reports, the GPU fixture) goes
through this module, never through the sampling stage.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
from pathlib import Path
from typing import IO, Any

from pruner.configs import PresampleConfig
from pruner.manifest import Output, build_manifest, bytes_digest, file_digest, model_inputs, write_manifest

SAMPLES_FORMAT = "o1-pruner-samples/1"
MERGE_COMMAND = "python pruner/presample.py --merge OUT SHARD..."
NO_META_HINT = ("A samples file without its .meta.json is typically shards concatenated by hand: merge shards "
                f"with `{MERGE_COMMAND}` instead. ")

# Settings that change what a sample is: a resume must match them exactly.
SAMPLING_KEYS = ("k", "temperature", "top_p", "max_new_tokens", "seed", "system_prompt", "suffix", "think",
                 "problems", "shard")
# Settings that may change between a run and its resume: they do not change what a sample is
# (`limit` extends or narrows the problem list; every problem has its own seed).
VOLATILE = ("out", "limit", "chunk_problems", "max_model_len", "tensor_parallel_size", "data_parallel_size",
            "overwrite")


# ------------------------------------------------------------------------------------------ records

def make_record(*, problem_id: str, sample_index: int, prompt: str, prompt_token_ids: list[int], response: str,
                response_token_ids: list[int], finish_reason: str | None, extracted_answer: str | None,
                correct: bool, answer: str, min_tokens: int | None = None) -> dict[str, Any]:
    """One sample record, its fields in file order. `finish_reason` "length" = truncated;
    `min_tokens` (the shortest correct trace, known for the embedded task) only when given."""
    rec = {"problem_id": str(problem_id), "sample_index": sample_index, "prompt": prompt,
           "prompt_token_ids": prompt_token_ids, "response": response, "response_token_ids": response_token_ids,
           "response_tokens": len(response_token_ids), "finish_reason": finish_reason,
           "extracted_answer": extracted_answer, "correct": correct, "answer": answer}
    if min_tokens is not None:
        rec["min_tokens"] = min_tokens
    return rec


def _encode(records: list[dict]) -> str:
    return "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)


def append_records(fh: IO[str], records: list[dict]) -> int:
    """Append a chunk with one write + fsync: a kill leaves whole chunks plus at most one torn line."""
    fh.write(_encode(records))
    fh.flush()
    os.fsync(fh.fileno())
    return len(records)


def rewrite_samples(path: Path, records: list[dict]) -> None:
    """Replace the file's content atomically (a temporary file renamed over it)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        append_records(fh, records)
    os.replace(tmp, path)


def read_samples(path: Path, *, repair: bool = False, required: tuple[str, ...] = ("problem_id", "sample_index")
                 ) -> list[dict]:
    """All records of a samples file. A torn last line (a kill mid-write) is dropped, and with
    `repair=True` also cut from the file; a bad line anywhere else (not UTF-8, not JSON, not an
    object, a `required` field missing) is an error naming file:line and the field."""
    if not path.exists():
        return []
    return _read(path, repair, required)[0]


def read_samples_digest(path: Path, *, required: tuple[str, ...] = ("problem_id", "sample_index")
                        ) -> tuple[list[dict], str]:
    """`read_samples` of an existing file (never repaired) and the content hash (`file_digest`'s form)
    of the very bytes the records were parsed from: a run manifest fingerprints its input in the same read."""
    records, data = _read(path, False, required)
    return records, bytes_digest(data)


def _read(path: Path, repair: bool, required: tuple[str, ...]) -> tuple[list[dict], bytes]:
    """(the records, the file's bytes as read)."""
    data = path.read_bytes()
    # JSON escapes newlines inside strings, so "\n" only ever ends a record: an unterminated
    # tail is exactly a write that did not finish.
    cut = data.rfind(b"\n") + 1
    if data[cut:].strip() and repair:
        with path.open("r+b") as fh:
            fh.truncate(cut)
            fh.flush()
            os.fsync(fh.fileno())
    lines = data[:cut].split(b"\n")[:-1]
    return [_parse_line(path, lineno, raw, required) for lineno, raw in enumerate(lines, 1) if raw.strip()], data


def _parse_line(path: Path, lineno: int, raw: bytes, required: tuple[str, ...]) -> dict:
    try:
        rec = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}:{lineno}: invalid UTF-8 at byte {exc.start} of the line") from None
    except ValueError:
        raise ValueError(f"{path}:{lineno}: corrupt sample record (not valid JSON)") from None
    if not isinstance(rec, dict):
        raise ValueError(f"{path}:{lineno}: a sample record must be a JSON object, got {type(rec).__name__}")
    missing = [name for name in required if name not in rec]
    if missing:
        raise ValueError(f"{path}:{lineno}: sample record has no field {missing[0]!r}")
    return rec


def complete_problems(records: list[dict], k: int) -> tuple[dict[str, list[dict]], bool]:
    """Problems that have exactly samples 0..k-1, and whether any record falls outside them."""
    by_problem: dict[str, dict[int, dict]] = {}
    for rec in records:
        by_problem.setdefault(str(rec["problem_id"]), {})[int(rec["sample_index"])] = rec
    done = {pid: [s[i] for i in range(k)] for pid, s in by_problem.items() if set(s) == set(range(k))}
    extra = sum(len(v) for v in done.values()) != len(records)
    return done, extra


def short_problems(records: list[dict], k: int) -> list[str]:
    """'id (count)' of every problem with fewer than k records (an interrupted pre-sampling)."""
    counts: dict[str, int] = {}
    for rec in records:
        counts[str(rec["problem_id"])] = counts.get(str(rec["problem_id"]), 0) + 1
    return [f"{pid} ({n})" for pid, n in counts.items() if n < k]


def summarize(records: list[dict], *, wall_s: float | None = None, new_samples: int = 0) -> dict[str, Any]:
    """The `.summary.json` numbers: accuracy, lengths, truncation, and this run's throughput."""
    lengths = [r["response_tokens"] for r in records]
    summary: dict[str, Any] = {
        "samples": len(records),
        "problems": len({r["problem_id"] for r in records}),
        "accuracy": statistics.fmean(r["correct"] for r in records) if records else 0.0,
        "mean_length": statistics.fmean(lengths) if lengths else 0.0,
        "median_length": statistics.median(lengths) if lengths else 0.0,
        "truncated_fraction": (statistics.fmean(r.get("finish_reason") == "length" for r in records)
                               if records else 0.0),
        "new_samples_this_run": new_samples,
    }
    if wall_s is not None:
        summary["wall_s"] = round(wall_s, 2)
        summary["samples_per_s"] = round(new_samples / wall_s, 3) if wall_s > 0 else None
    return summary


# ------------------------------------------------------------------------------- paths and the meta

def meta_path(out: Path) -> Path:
    return out.with_name(out.name + ".meta.json")


def summary_path(out: Path) -> Path:
    return out.with_name(out.stem + ".summary.json")


def lock_path(out: Path) -> Path:
    return out.with_name(out.name + ".lock")


def samples_output(out: Path) -> Output:
    """The samples file's manifest is its `.meta.json`; --overwrite deletes the file and its summary, and
    refuses a file at `out` that is not a samples file (a user's file named by mistake)."""
    return Output(manifest=meta_path(out), lock=lock_path(out), paths=[out, summary_path(out)],
                  owns=_looks_like_samples)


def _looks_like_samples(path: Path) -> bool:
    """An empty file, or one whose first line is a sample record (the summary is ours by name)."""
    if path.name.endswith(".summary.json"):
        return True
    with path.open("rb") as fh:
        first = fh.readline(1 << 20)
    if not first.strip():
        return True
    try:
        return isinstance(rec := json.loads(first), dict) and "problem_id" in rec
    except ValueError:
        return False


def sampling_settings(cfg: PresampleConfig) -> dict[str, Any]:
    """Everything that changes what a sample is; a resume must match it exactly."""
    return {key: getattr(cfg, key) for key in SAMPLING_KEYS}


def samples_manifest(cfg: PresampleConfig, model_id: str, tokenizer: Any) -> dict[str, Any]:
    """The `.meta.json`: settings, fingerprints of model, tokenizer and problems, and the readers' fields
    (`model`, `tokenizer_fingerprint`, `sampling`)."""
    inputs = model_inputs(cfg.model, tokenizer)
    problems = Path(cfg.problems).expanduser()
    inputs["problems"] = file_digest(problems) if problems.is_file() else cfg.problems
    return build_manifest("presample", dataclasses.asdict(cfg), inputs, volatile=VOLATILE,
                          samples_format=SAMPLES_FORMAT, model=model_id,
                          tokenizer_fingerprint=inputs["tokenizer"], sampling=sampling_settings(cfg))


def record_contents(out: Path, summary: dict[str, Any]) -> None:
    """The meta's `contents` (not compared on resume): what the file holds now, whatever this run's --limit."""
    path = meta_path(out)
    meta = json.loads(path.read_text())
    meta["contents"] = {"problems": summary["problems"], "samples": summary["samples"]}
    write_manifest(path, meta)


def read_meta(paths: list[Path]) -> dict[str, Any]:
    """The samples' meta (model, tokenizer, sampling settings); every file must have one, with one tokenizer."""
    for p in paths:
        if not meta_path(p).exists():
            raise ValueError(f"{p} has no {meta_path(p).name}: its model, tokenizer and settings are unknown, so "
                             "its token ids cannot be checked. Pre-sampling writes one; shard files concatenated by "
                             f"hand lack it: merge shards with `{MERGE_COMMAND}`.")
    metas = [json.loads(meta_path(p).read_text()) for p in paths]
    for m in metas[1:]:
        if m.get("tokenizer_fingerprint") != metas[0].get("tokenizer_fingerprint"):
            raise ValueError("the samples files were produced with different tokenizers")
    return metas[0]


def samples_per_problem(meta: dict[str, Any]) -> int | None:
    """K from a meta (the run manifest's config, or the `sampling` block of a minimal meta)."""
    return (meta.get("config") or meta.get("sampling") or {}).get("k")
