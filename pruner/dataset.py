"""The length-harmonizing training set, built from pre-sampled responses.

    python pruner/dataset.py                                   # runs/default/samples.jsonl -> runs/default/trainset/
    python pruner/dataset.py --kind sft|dpo --lam 5 --keep-per-problem 2

Per problem (its K samples): Lbar_ref = mean length, Abar_ref = mean accuracy. Per sample:
R = Lbar_ref / L - 1 + lam * (A - Abar_ref) clipped to [-2, 4] (o1pruner_kernels.length_harmonizing_reward),
advantage = (R - mean) / std over the kept samples (std 0, e.g. K = 1 where every R is 0:
advantage = R - mean, i.e. all zeros, no division).

Decisions (tested in tests/test_dataset.py):
- Lengths L are token counts of the response as trained (EOS included), so L >= 1.
- EOS: appended to a response that stopped (finish_reason != "length") without one, so the model
  learns to stop; an empty stopped response becomes just [EOS] (L = 1). Truncated responses
  ("length") are wrong, count in the statistics, are kept for training (they are the longest,
  most-penalised samples) and are left unterminated: they never ended.
- A sample with no tokens at all (only possible when truncated at 0 tokens) is dropped.
- Duplicate problems (identical prompts under several ids) are merged: their samples pool into
  one set of statistics, one `problem_index`; problem_stats lists every id in `ids`.
- `keep_per_problem=m` keeps a uniformly random m of a problem's samples (numpy, `seed`), after
  the statistics were computed on all of them. The paper's code keeps 2.
- sft: per problem the shortest correct sample (ties: lowest sample_index), advantage 1;
  problems without a correct sample are skipped.
- dpo: per problem chosen = shortest correct, rejected = the longest wrong sample, or the
  longest sample when none is wrong; problems without a correct sample or with a single
  sample are skipped. Rows come in (chosen, rejected) order; advantages +1 / -1.
- `ref_stats` (problem_stats.jsonl of another set, or its folder) replaces each problem's own
  statistics, so on-policy rounds are rewarded against the original model.
- Inputs are checked, not trusted: a samples file needs its `.meta.json` (merge shards with
  `presample.py --merge`, never `cat`); a problem with fewer than the meta's K samples (an
  interrupted pre-sampling) is refused by id; a record that is not UTF-8 JSON or lacks a field
  names file:line and the field; an all-wrong set prints a warning.
- The output folder gets a run manifest (settings + content hashes of the inputs) and a lock: a
  folder holding a set built from other samples or settings is refused unless `--overwrite`,
  which deletes it first (the reference log-prob caches included).
"""
from __future__ import annotations

import json
import logging
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python pruner/dataset.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pruner.configs import DatasetConfig  # noqa: E402

log = logging.getLogger(__name__)

TRAINSET_FORMAT = "o1-pruner-trainset/1"
CLIP = (-2.0, 4.0)
KINDS = ("lh", "sft", "dpo")


# fields the training set reads from every sample record; a missing one names file:line
SAMPLE_FIELDS = ("problem_id", "sample_index", "prompt", "prompt_token_ids", "response_token_ids", "correct")
MERGE_HINT = "python pruner/presample.py --merge OUT SHARD..."


def _read_samples(paths: list[Path]) -> list[dict]:
    from pruner.presample import read_samples

    records: list[dict] = []
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"samples file {path} does not exist (run pruner/presample.py first)")
        records.extend(read_samples(path, required=SAMPLE_FIELDS))
    if not records:
        raise ValueError(f"no samples in {', '.join(map(str, paths))}")
    return records


def _samples_meta(paths: list[Path]) -> dict[str, Any]:
    """The samples' meta (model, tokenizer, sampling settings); every file must have one."""
    from pruner.presample import meta_path

    for p in paths:
        if not meta_path(p).exists():
            raise ValueError(f"{p} has no {meta_path(p).name}: its model, tokenizer and settings are unknown, so "
                             "its token ids cannot be checked. Pre-sampling writes one; shard files concatenated by "
                             f"hand lack it: merge shards with `{MERGE_HINT}`.")
    metas = [json.loads(meta_path(p).read_text()) for p in paths]
    for m in metas[1:]:
        if m.get("tokenizer_fingerprint") != metas[0].get("tokenizer_fingerprint"):
            raise ValueError("the samples files were produced with different tokenizers")
    return metas[0]


def _check_complete(records: list[dict], k: int | None, paths: list[Path]) -> None:
    """Every problem must have its K samples: fewer means an interrupted pre-sampling run."""
    if not k:
        return
    counts: dict[str, int] = {}
    for rec in records:
        counts[str(rec["problem_id"])] = counts.get(str(rec["problem_id"]), 0) + 1
    short = [f"{pid} ({n})" for pid, n in counts.items() if n < k]
    if short:
        raise ValueError(f"{paths[0]}: {len(short)} problem(s) have fewer than k={k} samples: "
                         f"{', '.join(short[:20])}{' ...' if len(short) > 20 else ''}. Resume pre-sampling with "
                         "the same --out to complete them (their statistics would be biased).")


def _warn_if_all_wrong(records: list[dict], paths: list[Path]) -> None:
    if not any(_is_correct(r) for r in records):
        print(f"WARNING: every one of the {len(records)} samples in {paths[0]} is wrong: the accuracy term of the "
              "reward is zero everywhere, only length is rewarded. Check the grader and the answers, or sample "
              "at a higher temperature.", flush=True)


def _manifest(paths: list[Path], fingerprint: str, ref_stats: Any, config: dict[str, Any]) -> dict[str, Any]:
    from pruner.manifest import build_manifest, file_digest, manifest_digest
    from pruner.presample import meta_path

    inputs: dict[str, Any] = {"tokenizer": fingerprint, "samples": [file_digest(p) for p in paths],
                              "samples_manifests": [manifest_digest(meta_path(p)) for p in paths]}
    if ref_stats is not None:
        stats = Path(ref_stats) / "problem_stats.jsonl" if Path(ref_stats).is_dir() else Path(ref_stats)
        inputs["ref_stats"] = file_digest(stats)
    return build_manifest("dataset", config, inputs)


def load_ref_stats(path: str | Path) -> dict[str, dict]:
    """problem id -> stats row, from a problem_stats.jsonl (or the training-set folder holding it)."""
    p = Path(path)
    if p.is_dir():
        p = p / "problem_stats.jsonl"
    rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return {str(pid): row for row in rows for pid in row.get("ids", [row["id"]])}


def _model_vocab_size(model: str | None) -> int:
    """The model's embedding rows (config.json's vocab_size), or 0 when its config cannot be read."""
    if not model:
        return 0
    try:
        from transformers import AutoConfig

        return int(getattr(AutoConfig.from_pretrained(model), "vocab_size", 0) or 0)
    except (OSError, ValueError):
        return 0


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


def _is_correct(rec: dict) -> bool:
    # a truncated response is wrong even if a grader upstream credited an early box
    return bool(rec["correct"]) and rec.get("finish_reason") != "length"


def _response_ids(rec: dict, eos_ids: list[int]) -> tuple[list[int], bool]:
    """The response as trained, and whether an EOS was appended."""
    ids = [int(t) for t in rec["response_token_ids"]]
    if rec.get("finish_reason") == "length" or (ids and ids[-1] in eos_ids):
        return ids, False
    return ids + [eos_ids[0]], True


def _select(kind: str, samples: list[dict], lengths: list[int], keep: int | None,
            rng: np.random.Generator) -> list[tuple[int, bool]]:
    """(sample position, is_chosen) rows to keep for one problem."""
    order = range(len(samples))
    if kind == "lh":
        if keep is None or keep >= len(samples):
            return [(i, False) for i in order]
        return [(int(i), False) for i in sorted(rng.choice(len(samples), size=keep, replace=False))]
    correct = [i for i in order if _is_correct(samples[i])]
    if not correct:
        return []
    # shortest correct; ties go to the lowest sample_index
    best = min(correct, key=lambda i: (lengths[i], samples[i]["sample_index"]))
    if kind == "sft":
        return [(best, True)]
    wrong = [i for i in order if not _is_correct(samples[i])]
    pool = wrong or [i for i in order if i != best]
    if not pool:
        return []
    worst = max(pool, key=lambda i: (lengths[i], -samples[i]["sample_index"]))
    return [(best, True), (worst, False)]


def _to_tensors(rows: list[dict], kind: str, lam: float) -> tuple[dict[str, torch.Tensor], float, float]:
    """The training set's tensors from its rows; also the reward mean and std."""
    import o1pruner_kernels

    lengths_t = torch.tensor([len(r["response"]) for r in rows], dtype=torch.int64)
    rewards = o1pruner_kernels.length_harmonizing_reward(
        lengths_t,
        torch.tensor([r["correct"] for r in rows], dtype=torch.float32),
        torch.tensor([r["lbar"] for r in rows], dtype=torch.float64),
        torch.tensor([r["abar"] for r in rows], dtype=torch.float64),
        lam=lam, clip=CLIP,
    ).float()
    mean = float(rewards.double().mean())
    std = float(rewards.double().std(unbiased=False)) if len(rows) > 1 else 0.0
    if kind == "lh":
        centred = rewards.double() - mean
        advantages = (centred / std if std > 1e-8 else centred).float()
    elif kind == "sft":
        advantages = torch.ones(len(rows), dtype=torch.float32)
    else:
        advantages = torch.tensor([1.0 if r["chosen"] else -1.0 for r in rows], dtype=torch.float32)

    sequences = [r["prompt"] + r["response"] for r in rows]
    offsets = torch.zeros(len(rows) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor([len(s) for s in sequences], dtype=torch.int64), 0)
    tensors = {
        "input_ids": torch.tensor([t for s in sequences for t in s], dtype=torch.int32),
        "offsets": offsets,
        "prompt_lengths": torch.tensor([len(r["prompt"]) for r in rows], dtype=torch.int32),
        "response_lengths": lengths_t.to(torch.int32),
        "rewards": rewards.contiguous(),
        "advantages": advantages.contiguous(),
        "correct": torch.tensor([r["correct"] for r in rows], dtype=torch.uint8),
        "problem_index": torch.tensor([r["problem_index"] for r in rows], dtype=torch.int64),
    }
    if kind == "dpo":
        tensors["pair_index"] = torch.arange(len(rows), dtype=torch.int64) // 2
        tensors["chosen"] = torch.tensor([r["chosen"] for r in rows], dtype=torch.uint8)
    return tensors, mean, std


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
    `overwrite` (which deletes it first, reference log-prob caches included).
    """
    from pruner.model_files import eos_token_ids, load_tokenizer, tokenizer_fingerprint

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if keep_per_problem is not None and keep_per_problem < 1:
        raise ValueError("keep_per_problem must be >= 1 (or None for all)")
    paths = [Path(p) for p in (samples_path if isinstance(samples_path, list) else [samples_path])]
    records = _read_samples(paths)
    meta_in = _samples_meta(paths)
    _check_complete(records, (meta_in.get("config") or meta_in.get("sampling") or {}).get("k"), paths)
    model = meta_in.get("model")
    if isinstance(tokenizer, (str, Path)):
        model = model or str(tokenizer)
        tokenizer = load_tokenizer(tokenizer)
    if tokenizer is None:
        if not model:
            raise ValueError(f"{paths[0]} has no .meta.json naming its model: pass tokenizer=")
        tokenizer = load_tokenizer(model)
    fingerprint = tokenizer_fingerprint(tokenizer)
    if meta_in.get("tokenizer_fingerprint") not in (None, fingerprint):
        raise ValueError(f"the tokenizer given is not the one that produced {paths[0]} (fingerprint differs)")
    eos_ids = eos_token_ids(tokenizer, model if model and Path(model).is_dir() else None)
    if not eos_ids:
        raise ValueError("the tokenizer has no EOS token; cannot terminate responses")
    # A model may sample ids past the tokenizer's end (embedding rows padded to a round size): they
    # are the model's own outputs and train fine, so the bound is the model's vocabulary when known.
    vocab_size = max(len(tokenizer), _model_vocab_size(model))

    groups = _group_problems(records)
    ref = load_ref_stats(ref_stats) if ref_stats is not None else None
    rng = np.random.default_rng(seed)
    rows: list[dict] = []
    stats: list[dict] = []
    appended = dropped_empty = 0
    for group in groups.values():
        samples = sorted(group["samples"], key=lambda r: (r["problem_id"], r["sample_index"]))
        responses = [_response_ids(r, eos_ids) for r in samples]
        lengths = [len(ids) for ids, _ in responses]
        own_len = float(np.mean([max(n, 1) for n in lengths]))
        own_acc = float(np.mean([_is_correct(r) for r in samples]))
        pid = group["ids"][0]
        if ref is not None:
            if pid not in ref:
                raise KeyError(f"problem {pid} is not in ref_stats {ref_stats}")
            lbar, abar = float(ref[pid]["ref_mean_length"]), float(ref[pid]["ref_mean_accuracy"])
        else:
            lbar, abar = own_len, own_acc
        row = {"id": pid, "ids": group["ids"], "ref_mean_length": lbar, "ref_mean_accuracy": abar,
               "k": len(samples), "mean_length": own_len, "mean_accuracy": own_acc}
        if samples[0].get("min_tokens") is not None:
            row["min_tokens"] = samples[0]["min_tokens"]
        problem_index = len(stats)
        stats.append(row)
        for pos, is_chosen in _select(kind, samples, lengths, keep_per_problem, rng):
            ids, added = responses[pos]
            if not ids:
                dropped_empty += 1
                continue
            rec = samples[pos]
            prompt_ids = [int(t) for t in rec["prompt_token_ids"]]
            top = max(prompt_ids + ids)
            if top >= vocab_size:
                raise ValueError(f"{paths[0]}: sample {rec['problem_id']}/{rec['sample_index']} has token id "
                                 f"{top}, outside the model's vocabulary of {vocab_size}")
            appended += added
            rows.append({"prompt": prompt_ids, "response": ids, "correct": _is_correct(rec),
                         "problem_index": problem_index, "chosen": is_chosen, "lbar": lbar, "abar": abar})
    if not rows:
        raise ValueError(f"no training rows: kind={kind!r} kept nothing from {len(groups)} problem(s)")
    if dropped_empty:
        log.warning("dropped %d sample(s) with no response tokens", dropped_empty)

    tensors, mean, std = _to_tensors(rows, kind, lam)
    _warn_if_all_wrong(records, paths)
    meta = {
        "format": TRAINSET_FORMAT, "kind": kind, "model": model, "tokenizer_fingerprint": fingerprint,
        "lam": lam, "clip": list(CLIP), "reward_mean": mean, "reward_std": std,
        "num_samples": len(rows), "num_problems": len(stats),
        # absolute: on-policy rounds find the samples' .meta.json from here, from any cwd
        "samples_file": str(paths[0].resolve()), "samples_files": [str(p.resolve()) for p in paths],
        "keep_per_problem": keep_per_problem, "seed": seed,
        "ref_stats": str(ref_stats) if ref_stats is not None else None,
        "eos_appended": {"count": appended, "eos_token_id": eos_ids[0],
                         "policy": "appended to stopped responses lacking an EOS; truncated ones left unterminated"},
        "dropped_empty": dropped_empty, "sampling": meta_in.get("sampling"),
    }
    config = {"kind": kind, "lam": lam, "keep_per_problem": keep_per_problem, "seed": seed, "report": report,
              "ref_stats": str(ref_stats) if ref_stats is not None else None}
    manifest = _manifest(paths, fingerprint, ref_stats, config)
    inputs = paths + ([Path(ref_stats)] if ref_stats is not None else [])
    return _write_trainset(Path(out_dir), manifest, tensors, meta, stats, records if report else None, overwrite,
                           inputs)


def _write_trainset(out: Path, manifest: dict, tensors: dict, meta: dict, stats: list[dict],
                    report_records: list[dict] | None, overwrite: bool, inputs: list[Path]) -> Path:
    """Claim the folder (lock + manifest), then write the set; nothing is written on a refusal."""
    from safetensors.torch import save_file

    from pruner.manifest import Output, claim_output

    with claim_output(Output.folder(out), manifest, what=f"training set folder {out}", resume=not overwrite,
                      overwrite=overwrite, inputs=inputs):
        save_file(tensors, str(out / "trainset.safetensors"))
        (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        with (out / "problem_stats.jsonl").open("w", encoding="utf-8") as fh:
            for row in stats:
                fh.write(json.dumps(row) + "\n")
        if report_records is not None:
            from pruner.report import write_report

            write_report(report_records, out / "report")
    return out


def load_trainset(path: str | Path) -> dict[str, Any]:
    """A training-set folder as one flat dict: every tensor by name, plus "meta" (meta.json) and
    "stats" (problem_stats.jsonl rows, indexed by the `problem_index` tensor)."""
    from safetensors.torch import load_file

    p = Path(path)
    meta = json.loads((p / "meta.json").read_text())
    if meta.get("format") != TRAINSET_FORMAT:
        raise ValueError(f"{p}: format {meta.get('format')!r}, expected {TRAINSET_FORMAT!r}")
    stats = [json.loads(line) for line in (p / "problem_stats.jsonl").read_text().splitlines() if line.strip()]
    return {**load_file(str(p / "trainset.safetensors")), "meta": meta, "stats": stats}




def main(argv: list[str] | None = None) -> Path:
    from pruner.cli import parse_config
    from pruner.model_files import load_tokenizer

    cfg = parse_config(DatasetConfig, argv)
    tok = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    out = build_trainset(cfg.samples, cfg.out, kind=cfg.kind, lam=cfg.lam, keep_per_problem=cfg.keep_per_problem,
                         ref_stats=cfg.ref_stats, seed=cfg.seed, tokenizer=tok, report=cfg.report,
                         overwrite=cfg.overwrite)
    meta = json.loads((out / "meta.json").read_text())
    print(json.dumps({k: meta[k] for k in ("kind", "num_samples", "num_problems", "reward_mean", "reward_std")}, indent=2))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
