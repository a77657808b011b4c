"""The training set: pre-sampled records -> tensors -> a folder the trainer reads.

    python pruner/dataset.py                                   # runs/default/samples.jsonl -> runs/default/trainset/
    python pruner/dataset.py --kind sft|dpo --lam 5 --keep-per-problem 2

What a sample is worth (reference statistics, length policy, clip, standardisation, the SFT/DPO
selections) is `pruner/reward.py`; the samples file format is `pruner/samples.py`. Here:
- Duplicate problems (identical prompts under several ids) are merged: their samples pool into
  one set of statistics, one `problem_index`; problem_stats lists every id in `ids`.
- Inputs are checked, not trusted: a samples file needs its `.meta.json` (merge shards with
  `presample.py --merge`, never `cat`); a problem with fewer than the meta's K samples (an
  interrupted pre-sampling) is refused by id; a record that is not UTF-8 JSON or lacks a field
  names file:line and the field; a token id outside the model's vocabulary names the sample;
  an all-wrong set prints a warning.
- The folder: trainset.safetensors (rows back to back, `offsets` into them), meta.json (the
  settings, the reward's mean/std, the samples' `sampling` block whose temperature the trainer's
  log-probs use), problem_stats.jsonl (`ref_mean_length`, `ref_mean_accuracy` per problem, the
  next round's `--ref-stats`), report/. It gets a run manifest (settings + content hashes of the
  inputs) and a lock: a folder holding a set built from other samples or settings is refused
  unless `--overwrite`, which deletes the set's own files first (the old log-prob caches included;
  other files are kept, and a folder of only other files is refused).
"""
from __future__ import annotations

import json
import logging
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python pruner/dataset.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import pruner.reward as reward  # noqa: E402
from pruner.configs import DatasetConfig  # noqa: E402
from pruner.manifest import Output, build_manifest, claim_output, file_digest, manifest_digest  # noqa: E402
from pruner.model_files import eos_token_ids, load_tokenizer, tokenizer_fingerprint  # noqa: E402
from pruner.samples import (meta_path, read_meta, read_samples_digest, samples_per_problem,  # noqa: E402
                            short_problems)
from pruner.trainset import TRAINSET_FORMAT, load_trainset, stats_file, write_files  # noqa: E402,F401 (load_trainset: the API)
from pruner.trainset import read_meta as read_trainset_meta  # noqa: E402

log = logging.getLogger(__name__)

# fields the training set reads from every sample record; a missing one names file:line
SAMPLE_FIELDS = ("problem_id", "sample_index", "prompt", "prompt_token_ids", "response_token_ids", "correct")
EOS_POLICY = "appended to stopped responses lacking an EOS; truncated ones left unterminated"


@dataclass
class _Samples:
    """The checked inputs: records, their meta, and the tokenizer facts the rows are checked against."""

    paths: list[Path]
    digests: list[str]  # of the samples files, taken from the bytes the records were parsed from
    records: list[dict]
    meta: dict[str, Any]
    model: str | None
    fingerprint: str
    eos_ids: list[int]
    vocab_size: int


def _read_records(paths: list[Path]) -> tuple[list[dict], list[str]]:
    """(every file's records, each file's content hash)."""
    records: list[dict] = []
    digests: list[str] = []
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"samples file {path} does not exist (run pruner/presample.py first)")
        file_records, digest = read_samples_digest(path, required=SAMPLE_FIELDS)
        records.extend(file_records)
        digests.append(digest)
    if not records:
        raise ValueError(f"no samples in {', '.join(map(str, paths))}")
    return records, digests


def _check_complete(records: list[dict], k: int | None, paths: list[Path]) -> None:
    """Every problem must have its K samples: fewer means an interrupted pre-sampling run."""
    short = short_problems(records, k) if k else []
    if short:
        raise ValueError(f"{paths[0]}: {len(short)} problem(s) have fewer than k={k} samples: "
                         f"{', '.join(short[:20])}{' ...' if len(short) > 20 else ''}. Resume pre-sampling with "
                         "the same --out to complete them (their statistics would be biased).")


def _model_vocab_size(model: str | None) -> int:
    """The model's embedding rows (config.json's vocab_size), or 0 when its config cannot be read."""
    if not model:
        return 0
    try:
        from transformers import AutoConfig

        return int(getattr(AutoConfig.from_pretrained(model), "vocab_size", 0) or 0)
    except (OSError, ValueError):
        return 0


def _resolve_tokenizer(tokenizer: Any, model: str | None, source: Path) -> tuple[Any, str | None]:
    """(tokenizer object, model): `tokenizer` may be an object, a folder/id, or None for the meta's model."""
    if isinstance(tokenizer, (str, Path)):
        model = model or str(tokenizer)
        tokenizer = load_tokenizer(tokenizer)
    if tokenizer is None:
        if not model:
            raise ValueError(f"{source} has no .meta.json naming its model: pass tokenizer=")
        tokenizer = load_tokenizer(model)
    return tokenizer, model


def _load_samples(samples_path: str | Path | list[str | Path], tokenizer: Any) -> _Samples:
    paths = [Path(p) for p in (samples_path if isinstance(samples_path, list) else [samples_path])]
    records, digests = _read_records(paths)
    meta = read_meta(paths)
    _check_complete(records, samples_per_problem(meta), paths)
    tokenizer, model = _resolve_tokenizer(tokenizer, meta.get("model"), paths[0])
    fingerprint = tokenizer_fingerprint(tokenizer)
    if meta.get("tokenizer_fingerprint") not in (None, fingerprint):
        raise ValueError(f"the tokenizer given is not the one that produced {paths[0]} (fingerprint differs)")
    eos_ids = eos_token_ids(tokenizer, model if model and Path(model).is_dir() else None)
    if not eos_ids:
        raise ValueError("the tokenizer has no EOS token; cannot terminate responses")
    # A model may sample ids past the tokenizer's end (embedding rows padded to a round size): they
    # are the model's own outputs and train fine, so the bound is the model's vocabulary when known.
    vocab_size = max(len(tokenizer), _model_vocab_size(model))
    return _Samples(paths, digests, records, meta, model, fingerprint, eos_ids, vocab_size)


def _group_problems(records: list[dict]) -> "OrderedDict[str, dict]":
    """Problems keyed by prompt text (duplicates merge), each with its samples and ids."""
    groups: "OrderedDict[str, dict]" = OrderedDict()
    seen: set[tuple[str, int]] = set()
    for rec in records:
        key = (str(rec["problem_id"]), int(rec["sample_index"]))
        if key in seen:
            raise ValueError(f"duplicate sample {key} in the samples file(s)")
        seen.add(key)
        group = groups.setdefault(rec["prompt"], {"ids": [], "samples": [], "answer": rec.get("answer")})
        if key[0] not in group["ids"]:
            group["ids"].append(key[0])
        if group["answer"] != rec.get("answer"):
            log.warning("problem %s: same prompt as %s but another answer (%r vs %r); merged anyway",
                        key[0], group["ids"][0], rec.get("answer"), group["answer"])
        group["samples"].append(rec)
    return groups


def _stats_row(group: dict, samples: list[dict], lengths: list[int], ref: dict[str, dict] | None,
               ref_source: str | Path | None) -> dict[str, Any]:
    """A problem's problem_stats.jsonl row: the statistics it is rewarded against, and its own."""
    own_length, own_accuracy = own = reward.own_stats(samples, lengths)
    ref_length, ref_accuracy = reward.reference_stats(group["ids"][0], own, ref, ref_source)
    row = {"id": group["ids"][0], "ids": group["ids"], "ref_mean_length": ref_length,
           "ref_mean_accuracy": ref_accuracy, "k": len(samples), "mean_length": own_length,
           "mean_accuracy": own_accuracy}
    if samples[0].get("min_tokens") is not None:
        row["min_tokens"] = samples[0]["min_tokens"]
    return row


def _training_row(inputs: _Samples, rec: dict, response: list[int], stats: dict, problem_index: int,
                  is_chosen: bool) -> dict[str, Any]:
    prompt_ids = [int(t) for t in rec["prompt_token_ids"]]
    top = max(prompt_ids + response)
    if top >= inputs.vocab_size:
        raise ValueError(f"{inputs.paths[0]}: sample {rec['problem_id']}/{rec['sample_index']} has token id "
                         f"{top}, outside the model's vocabulary of {inputs.vocab_size}")
    return {"prompt": prompt_ids, "response": response, "correct": reward.is_correct(rec),
            "problem_index": problem_index, "chosen": is_chosen, "ref_mean_length": stats["ref_mean_length"],
            "ref_mean_accuracy": stats["ref_mean_accuracy"]}


def _rows(inputs: _Samples, kind: str, keep_per_problem: int | None, ref_stats: str | Path | None,
          seed: int) -> tuple[list[dict], list[dict], dict[str, int]]:
    """(training rows, problem_stats rows, counts of appended EOS and dropped empty responses)."""
    groups = _group_problems(inputs.records)
    ref = reward.load_ref_stats(ref_stats) if ref_stats is not None else None
    rng = np.random.default_rng(seed)
    rows: list[dict] = []
    stats: list[dict] = []
    counts = {"appended": 0, "dropped_empty": 0}
    for group in groups.values():
        samples = sorted(group["samples"], key=lambda r: (r["problem_id"], r["sample_index"]))
        responses = [reward.response_ids(r, inputs.eos_ids) for r in samples]
        lengths = [len(ids) for ids, _ in responses]
        stats.append(_stats_row(group, samples, lengths, ref, ref_stats))
        for pos, is_chosen in reward.select(kind, samples, lengths, keep_per_problem, rng):
            ids, added = responses[pos]
            if not ids:
                counts["dropped_empty"] += 1
                continue
            rows.append(_training_row(inputs, samples[pos], ids, stats[-1], len(stats) - 1, is_chosen))
            counts["appended"] += added
    if not rows:
        raise ValueError(f"no training rows: kind={kind!r} kept nothing from {len(groups)} problem(s)")
    if counts["dropped_empty"]:
        log.warning("dropped %d sample(s) with no response tokens", counts["dropped_empty"])
    return rows, stats, counts


def _to_tensors(rows: list[dict], kind: str, lam: float) -> tuple[dict[str, torch.Tensor], float, float]:
    """The training set's tensors from its rows; also the reward mean and std."""
    lengths = torch.tensor([len(r["response"]) for r in rows], dtype=torch.int64)
    rewards = reward.rewards(lengths, [r["correct"] for r in rows], [r["ref_mean_length"] for r in rows],
                             [r["ref_mean_accuracy"] for r in rows], lam)
    advantages, mean, std = reward.advantages(kind, rewards, [r["chosen"] for r in rows])
    sequences = [r["prompt"] + r["response"] for r in rows]
    offsets = torch.zeros(len(rows) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor([len(s) for s in sequences], dtype=torch.int64), 0)
    tensors = {
        "input_ids": torch.tensor([t for s in sequences for t in s], dtype=torch.int32),
        "offsets": offsets,
        "prompt_lengths": torch.tensor([len(r["prompt"]) for r in rows], dtype=torch.int32),
        "response_lengths": lengths.to(torch.int32),
        "rewards": rewards.contiguous(),
        "advantages": advantages.contiguous(),
        "correct": torch.tensor([r["correct"] for r in rows], dtype=torch.uint8),
        "problem_index": torch.tensor([r["problem_index"] for r in rows], dtype=torch.int64),
    }
    if kind == "dpo":
        tensors["pair_index"] = torch.arange(len(rows), dtype=torch.int64) // 2
        tensors["chosen"] = torch.tensor([r["chosen"] for r in rows], dtype=torch.uint8)
    return tensors, mean, std


def _warn_if_all_wrong(records: list[dict], paths: list[Path]) -> None:
    if not any(reward.is_correct(r) for r in records):
        print(f"WARNING: every one of the {len(records)} samples in {paths[0]} is wrong: the accuracy term of the "
              "reward is zero everywhere, only length is rewarded. Check the grader and the answers, or sample "
              "at a higher temperature.", flush=True)


def _manifest(inputs: _Samples, ref_stats: str | Path | None, config: dict[str, Any]) -> dict[str, Any]:
    digests: dict[str, Any] = {"tokenizer": inputs.fingerprint, "samples": inputs.digests,
                               "samples_manifests": [manifest_digest(meta_path(p)) for p in inputs.paths]}
    if ref_stats is not None:
        digests["ref_stats"] = file_digest(stats_file(ref_stats))
    return build_manifest("dataset", config, digests)


def build_trainset(
    samples_path: str | Path | list[str | Path],
    out_dir: str | Path,
    *,
    kind: str = "lh",
    lam: float = 2.0,
    keep_per_problem: int | None = None,
    ref_stats: str | Path | None = None,
    seed: int = 0,
    tokenizer: Any = None,
    report: bool = True,
    overwrite: bool = False,
) -> Path:
    """Build the training set folder (trainset.safetensors, meta.json, problem_stats.jsonl, report/).

    `tokenizer`: a tokenizer object, a folder/id to load one from, or None for the model named
    in the samples' `.meta.json`. The folder gets a run manifest (settings + content hashes of the
    samples): a folder holding a set built from other samples or settings is refused unless
    `overwrite` (which deletes it first, old log-prob caches included).
    """
    reward.check_selection(kind, keep_per_problem)
    inputs = _load_samples(samples_path, tokenizer)
    rows, stats, counts = _rows(inputs, kind, keep_per_problem, ref_stats, seed)
    tensors, mean, std = _to_tensors(rows, kind, lam)
    _warn_if_all_wrong(inputs.records, inputs.paths)
    ref_source = str(ref_stats) if ref_stats is not None else None
    config = {"kind": kind, "lam": lam, "keep_per_problem": keep_per_problem, "seed": seed, "report": report,
              "ref_stats": ref_source}
    meta = {
        "format": TRAINSET_FORMAT, "kind": kind, "model": inputs.model, "tokenizer_fingerprint": inputs.fingerprint,
        "lam": lam, "clip": list(reward.CLIP), "reward_mean": mean, "reward_std": std,
        "num_samples": len(rows), "num_problems": len(stats),
        # absolute: on-policy rounds find the samples' .meta.json from here, from any cwd
        "samples_file": str(inputs.paths[0].resolve()), "samples_files": [str(p.resolve()) for p in inputs.paths],
        "keep_per_problem": keep_per_problem, "seed": seed, "ref_stats": ref_source,
        "eos_appended": {"count": counts["appended"], "eos_token_id": inputs.eos_ids[0], "policy": EOS_POLICY},
        "dropped_empty": counts["dropped_empty"], "sampling": inputs.meta.get("sampling"),
    }
    read_paths = inputs.paths + ([Path(ref_stats)] if ref_stats is not None else [])
    return _write_trainset(Path(out_dir), _manifest(inputs, ref_stats, config), tensors, meta, stats,
                           inputs.records if report else None, overwrite, read_paths)


def _write_trainset(out: Path, manifest: dict, tensors: dict, meta: dict, stats: list[dict],
                    report_records: list[dict] | None, overwrite: bool, inputs: list[Path]) -> Path:
    """Claim the folder (lock + manifest), then write the set; nothing is written on a refusal."""
    with claim_output(Output.folder(out), manifest, what=f"training set folder {out}", resume=not overwrite,
                      overwrite=overwrite, inputs=inputs):
        write_files(out, tensors, meta, stats)
        if report_records is not None:
            from pruner.report import write_report

            write_report(report_records, out / "report")
    return out


def main(argv: list[str] | None = None) -> Path:
    from pruner.cli import parse_config

    cfg = parse_config(DatasetConfig, argv)
    tok = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    out = build_trainset(cfg.samples, cfg.out, kind=cfg.kind, lam=cfg.lam, keep_per_problem=cfg.keep_per_problem,
                         ref_stats=cfg.ref_stats, seed=cfg.seed, tokenizer=tok, report=cfg.report,
                         overwrite=cfg.overwrite)
    meta = read_trainset_meta(out)
    print(json.dumps({k: meta[k] for k in ("kind", "num_samples", "num_problems", "reward_mean", "reward_std")}, indent=2))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
