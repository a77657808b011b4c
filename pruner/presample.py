"""Pre-sampling: K responses per training problem from the reference model, graded.

    python pruner/presample.py                      # embedded model and task, K = 8
    python pruner/presample.py --model /models/QwQ-32B --problems data/math_train_hard.json \
        --k 12 --max-new-tokens 8192 --tensor-parallel-size 4 --out runs/qwq/samples.jsonl

Output: one JSON line per sample (see `_record`), appended and fsynced per chunk of problems,
plus `<out>.meta.json` (model, tokenizer fingerprint, sampling settings) and
`<out stem>.summary.json`. Rerunning with the same `--out` resumes: complete problems are kept,
a torn last line or a problem with fewer than K samples is dropped and re-done. Multi-node:
run `--shard i/n` on node i (output `<out stem>.shard<i>of<n>.jsonl`) and concatenate.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python pruner/presample.py` runs without the package on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pruner.prompting import DEFAULT_SYSTEM_PROMPT, build_prompt  # noqa: E402

SAMPLES_FORMAT = "o1-pruner-samples/1"


@dataclass
class PresampleConfig:
    """Pre-sample K graded responses per problem from the reference model with vLLM."""

    model: str = field(default="", metadata={"help": "model folder or hub id; empty = the embedded default model"})
    problems: str = field(default="embedded:train", metadata={"help": "problems: .json/.jsonl/.parquet file, embedded:train|test, or hub id"})
    out: str = field(default="runs/default/samples.jsonl", metadata={"help": "output JSONL (resumed when it exists)"})
    k: int = field(default=8, metadata={"help": "samples per problem (the paper's code: 12-16)"})
    temperature: float = field(default=0.5, metadata={"help": "sampling temperature (the paper's code: 0.5)"})
    top_p: float = field(default=0.8, metadata={"help": "nucleus sampling top-p (the paper's code: 0.8)"})
    max_new_tokens: int = field(default=1024, metadata={"help": "max response tokens (1024 suits the embedded model; the paper uses 8192)"})
    seed: int = field(default=0, metadata={"help": "base seed; each problem samples with a seed derived from it and the problem id"})
    system_prompt: str = field(default=DEFAULT_SYSTEM_PROMPT, metadata={"help": "system prompt ('' for none, e.g. R1 distills)"})
    suffix: str = field(default="", metadata={"help": "text appended to every problem (e.g. the fast-solving baseline)"})
    think: str = field(default="auto", metadata={"help": "open a <think> block after the prompt: auto (if the template uses it), on, off"})
    tensor_parallel_size: int = field(default=1, metadata={"help": "GPUs per model replica"})
    data_parallel_size: int = field(default=1, metadata={"help": "model replicas on this node (where vLLM supports it)"})
    shard: str = field(default="0/1", metadata={"help": "i/n: this process samples problems i, i+n, ... (multi-node); output gets a .shard<i>of<n> suffix"})
    limit: int | None = field(default=None, metadata={"help": "only the first N problems (before sharding)"})
    chunk_problems: int = field(default=64, metadata={"help": "problems per vLLM call; the file is appended and fsynced after each"})
    max_model_len: int | None = field(default=None, metadata={"help": "vLLM context length; default = longest prompt + max new tokens"})
    dtype: str = field(default="auto", metadata={"help": "vLLM dtype"})
    problem_field: str | None = field(default=None, metadata={"help": "name of the problem field when not detected"})
    answer_field: str | None = field(default=None, metadata={"help": "name of the answer field when not detected"})
    id_field: str | None = field(default=None, metadata={"help": "name of the id field when not detected"})


def problem_seed(seed: int, problem_id: str) -> int:
    """A per-problem seed: a re-done problem reproduces its samples whatever the chunking."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{problem_id}".encode()).digest()[:4], "little") & 0x7FFFFFFF


def parse_shard(shard: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in shard.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n, got {shard!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"--shard {shard}: need 0 <= i < n")
    return index, count


def output_path(cfg: PresampleConfig) -> Path:
    out = Path(cfg.out)
    index, count = parse_shard(cfg.shard)
    return out if count == 1 else out.with_name(f"{out.stem}.shard{index}of{count}{out.suffix}")


def meta_path(out: Path) -> Path:
    return out.with_name(out.name + ".meta.json")


def summary_path(out: Path) -> Path:
    return out.with_name(out.stem + ".summary.json")


def sampling_settings(cfg: PresampleConfig) -> dict[str, Any]:
    """Everything that changes what a sample is; a resume must match it exactly."""
    keys = ("k", "temperature", "top_p", "max_new_tokens", "seed", "system_prompt", "suffix", "think", "problems", "shard")
    return {key: getattr(cfg, key) for key in keys}


def check_or_write_meta(out: Path, meta: dict[str, Any]) -> None:
    path = meta_path(out)
    if path.exists() and out.exists() and out.stat().st_size > 0:
        old = json.loads(path.read_text())
        diffs = [key for key in ("model", "tokenizer_fingerprint", "sampling") if old.get(key) != meta.get(key)]
        if diffs:
            detail = "; ".join(f"{k}: file has {old.get(k)!r}, this run {meta.get(k)!r}" for k in diffs)
            raise SystemExit(f"refusing to resume {out}: it was sampled with other settings ({detail}). "
                             "Use another --out or delete the file.")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(meta, indent=2) + "\n")


def read_samples(path: Path, *, repair: bool = False) -> list[dict]:
    """All records of a samples file. A torn last line (a kill mid-write) is dropped, and with
    `repair=True` also cut from the file; a bad line anywhere else is an error naming file:line."""
    if not path.exists():
        return []
    data = path.read_bytes()
    # JSON escapes newlines inside strings, so "\n" only ever ends a record: an unterminated
    # tail is exactly a write that did not finish.
    cut = data.rfind(b"\n") + 1
    if data[cut:].strip() and repair:
        with path.open("r+b") as fh:
            fh.truncate(cut)
            fh.flush()
            os.fsync(fh.fileno())
    records: list[dict] = []
    for lineno, raw in enumerate(data[:cut].split(b"\n")[:-1], 1):
        if not raw.strip():
            continue
        try:
            records.append(json.loads(raw))
        except ValueError:
            raise ValueError(f"{path}:{lineno}: corrupt sample record (not valid JSON)") from None
    return records


def complete_problems(records: list[dict], k: int) -> tuple[dict[str, list[dict]], bool]:
    """Problems that have exactly samples 0..k-1, and whether any record falls outside them."""
    by_problem: dict[str, dict[int, dict]] = {}
    for rec in records:
        by_problem.setdefault(str(rec["problem_id"]), {})[int(rec["sample_index"])] = rec
    done = {pid: [s[i] for i in range(k)] for pid, s in by_problem.items() if set(s) == set(range(k))}
    extra = sum(len(v) for v in done.values()) != len(records)
    return done, extra


def _atomic_rewrite(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _record(problem: dict, index: int, prompt: str, prompt_ids: list[int], completion: Any) -> dict:
    from pruner.grading import extract_answer, grade

    truncated = completion.finish_reason == "length"
    rec = {
        "problem_id": str(problem["id"]),
        "sample_index": index,
        "prompt": prompt,
        "prompt_token_ids": prompt_ids,
        "response": completion.text,
        "response_token_ids": completion.token_ids,
        "response_tokens": len(completion.token_ids),
        "finish_reason": completion.finish_reason,
        "extracted_answer": extract_answer(completion.text),
        "correct": grade(completion.text, problem["answer"], truncated=truncated),
        "answer": problem["answer"],
    }
    if problem.get("min_tokens") is not None:
        rec["min_tokens"] = problem["min_tokens"]
    return rec


def summarize(records: list[dict], *, wall_s: float | None = None, new_samples: int = 0) -> dict[str, Any]:
    lengths = [r["response_tokens"] for r in records]
    summary: dict[str, Any] = {
        "samples": len(records),
        "problems": len({r["problem_id"] for r in records}),
        "accuracy": statistics.fmean(r["correct"] for r in records) if records else 0.0,
        "mean_length": statistics.fmean(lengths) if lengths else 0.0,
        "median_length": statistics.median(lengths) if lengths else 0.0,
        "truncated_fraction": statistics.fmean(r["finish_reason"] == "length" for r in records) if records else 0.0,
        "new_samples_this_run": new_samples,
    }
    if wall_s is not None:
        summary["wall_s"] = round(wall_s, 2)
        summary["samples_per_s"] = round(new_samples / wall_s, 3) if wall_s > 0 else None
    return summary


def run(cfg: PresampleConfig, *, llm: Any = None) -> dict[str, Any]:
    """Sample, grade and append; returns the summary (also written next to the output).

    `llm`: an already open engine (e.g. a caller sampling several sets with one model).
    """
    from tqdm import tqdm

    from pruner.data import load_problems
    from pruner.generation import generate, open_llm
    from pruner.hf import load_tokenizer, tokenizer_fingerprint

    t_start = time.perf_counter()
    if not cfg.model:
        from pruner import default_model_path

        cfg = dataclasses.replace(cfg, model=str(default_model_path()))
    if cfg.think not in ("auto", "on", "off"):
        raise SystemExit(f"--think must be auto, on or off, got {cfg.think!r}")
    out = output_path(cfg)
    shard_index, shard_count = parse_shard(cfg.shard)
    problems = load_problems(cfg.problems, problem_field=cfg.problem_field, answer_field=cfg.answer_field,
                             id_field=cfg.id_field, limit=cfg.limit)
    problems = problems[shard_index::shard_count]
    tokenizer = load_tokenizer(cfg.model)
    model_id = str(Path(cfg.model).resolve()) if Path(cfg.model).exists() else cfg.model
    check_or_write_meta(out, {"format": SAMPLES_FORMAT, "model": model_id,
                              "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                              "sampling": sampling_settings(cfg)})

    records = read_samples(out, repair=True)
    done, extra = complete_problems(records, cfg.k)
    if extra:  # partial problems (a kill mid-chunk) are re-done whole: drop their samples first
        kept = [rec for samples in done.values() for rec in samples]
        print(f"resume: dropping {len(records) - len(kept)} sample(s) of incomplete problems", file=sys.stderr)
        _atomic_rewrite(out, kept)
    pending = [p for p in problems if str(p["id"]) not in done]
    if done:
        print(f"resume: {len(done)} problem(s) already complete in {out}, {len(pending)} to go", file=sys.stderr)

    think = None if cfg.think == "auto" else cfg.think == "on"
    gen_s = 0.0
    new = 0
    if pending:
        prompts = [build_prompt(tokenizer, p["problem"], system_prompt=cfg.system_prompt or None,
                                suffix=cfg.suffix, think=think) for p in pending]
        prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in prompts]
        max_len = cfg.max_model_len or max(len(ids) for ids in prompt_ids) + cfg.max_new_tokens
        llm = llm or open_llm(cfg.model, dtype=cfg.dtype, max_model_len=max_len, seed=cfg.seed,
                       tensor_parallel_size=cfg.tensor_parallel_size, data_parallel_size=cfg.data_parallel_size)
        out.parent.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=len(pending) * cfg.k, unit="sample", desc="presample", dynamic_ncols=True)
        with out.open("a", encoding="utf-8") as fh:
            for start in range(0, len(pending), cfg.chunk_problems):
                chunk = slice(start, start + cfg.chunk_problems)
                t0 = time.perf_counter()
                outputs = generate(llm, prompt_ids[chunk], n=cfg.k, temperature=cfg.temperature, top_p=cfg.top_p,
                                   max_tokens=cfg.max_new_tokens,
                                   seed=[problem_seed(cfg.seed, str(p["id"])) for p in pending[chunk]])
                gen_s += time.perf_counter() - t0
                lines = []
                for problem, prompt, ids, completions in zip(pending[chunk], prompts[chunk], prompt_ids[chunk], outputs):
                    for index, completion in enumerate(completions):
                        rec = _record(problem, index, prompt, ids, completion)
                        records.append(rec)
                        lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
                # one write + fsync per chunk: a kill leaves whole chunks plus at most one torn line
                fh.write("".join(lines))
                fh.flush()
                os.fsync(fh.fileno())
                new += len(lines)
                bar.update(len(lines))
        bar.close()
    kept_ids = {str(p["id"]) for p in problems}
    final = [r for r in read_samples(out) if str(r["problem_id"]) in kept_ids]
    summary = summarize(final, wall_s=time.perf_counter() - t_start, new_samples=new)
    summary.update(generation_s=round(gen_s, 2), generation_samples_per_s=round(new / gen_s, 3) if gen_s else None,
                   out=str(out), model=model_id)
    summary_path(out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from pruner.cli import parse_config

    return run(parse_config(PresampleConfig, argv))


if __name__ == "__main__":
    main()
