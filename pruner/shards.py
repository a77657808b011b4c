"""Merging `--shard i/n` pre-sampling outputs into one samples file with one meta.

    python pruner/presample.py --merge runs/qwq/samples.jsonl runs/qwq/samples.shard*of4.jsonl [--overwrite]

Refused: a shard without its `.meta.json`; shards sampled with other settings, models or
problems (the differing manifest fields are named); a missing or repeated shard index; a
problem present in two shards; a shard with an incomplete problem (resume that shard first).
The merged meta is the shards' manifest with `shard` = 0/1 (per-problem seeds make the merge the
same data as one unsharded run) plus `merged_from`: each shard's path and content hash.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pruner.cli import parse_config
from pruner.configs import parse_shard
from pruner.manifest import claim_output, diff_manifests
from pruner.samples import (complete_problems, meta_path, read_samples_digest, rewrite_samples, samples_output,
                            summarize, summary_path)


@dataclass
class MergeConfig:
    """Merge the `--shard i/n` outputs of one pre-sampling run into one samples file (settings checked, overlaps refused)."""

    out: str = field(metadata={"help": "merged samples file", "positional": True})
    shards: list[str] = field(metadata={"help": "shard files (<stem>.shard<i>of<n>.jsonl)", "positional": True})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing merged file"})


def _unsharded(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest as if sampled without sharding (what all shards of one run share)."""
    merged = copy.deepcopy(manifest)
    merged["config"]["shard"] = "0/1"
    if isinstance(merged.get("sampling"), dict):
        merged["sampling"]["shard"] = "0/1"
    merged.pop("merged_from", None)
    return merged


def _read_shard(path: Path) -> tuple[dict[str, Any], list[dict], tuple[int, int], str]:
    """(meta, records, (index, count), content hash of the bytes the records came from)."""
    if not path.exists():
        raise FileNotFoundError(f"shard {path} does not exist")
    if not meta_path(path).exists():
        raise ValueError(f"shard {path} has no {meta_path(path).name}: its settings cannot be checked; "
                         "re-run pre-sampling for that shard (it resumes nothing without a meta)")
    meta = json.loads(meta_path(path).read_text())
    if "config" not in meta:
        raise ValueError(f"{meta_path(path)}: not a run manifest (written by an older version); re-sample the shard")
    shard = parse_shard(meta["config"].get("shard", "0/1"))
    records, digest = read_samples_digest(path)
    k = int(meta["config"]["k"])
    done, extra = complete_problems(records, k)
    if extra:
        partial = sorted({str(r["problem_id"]) for r in records} - set(done))
        raise ValueError(f"shard {path}: problem(s) {', '.join(partial[:10])} have fewer than k={k} samples "
                         "(an interrupted run): resume that shard first")
    return meta, records, shard, digest


def merge_shards(out: str | Path, shards: list[str | Path], *, overwrite: bool = False) -> dict[str, Any]:
    """Check and merge shard files into `out` (+ its meta and summary); returns the summary."""
    out, paths = Path(out), [Path(s) for s in shards]
    if not paths:
        raise ValueError("--merge needs an output file and at least one shard file")
    loaded = [_read_shard(p) for p in paths]
    base = _unsharded(loaded[0][0])
    counts = {shard[1] for _, _, shard, _ in loaded}
    for path, (meta, _, _, _) in zip(paths[1:], loaded[1:]):
        diffs = diff_manifests(base, _unsharded(meta))
        if diffs:
            raise ValueError(f"shard {path} was sampled with other settings than {paths[0]}: " + "; ".join(diffs))
    indices = sorted(shard[0] for _, _, shard, _ in loaded)
    if len(counts) != 1 or indices != list(range(next(iter(counts)))):
        raise ValueError(f"shards {[f'{i}/{n}' for _, _, (i, n), _ in loaded]} are not exactly the shards 0..n-1 "
                         "of one run (missing or repeated)")
    owner: dict[str, Path] = {}
    for path, (_, records, _, _) in zip(paths, loaded):
        for pid in {str(r["problem_id"]) for r in records}:
            if pid in owner:
                raise ValueError(f"problem {pid} is in both {owner[pid]} and {path}: overlapping shards")
            owner[pid] = path
    merged = [r for _, records, _, _ in loaded for r in records]
    manifest = {**base, "merged_from": [{"file": str(p.resolve()), "content": digest}
                                        for p, (_, _, _, digest) in zip(paths, loaded)]}
    with claim_output(samples_output(out), manifest, what=f"samples file {out}", resume=False, overwrite=overwrite,
                      inputs=paths):
        rewrite_samples(out, merged)
        summary = {**summarize(merged), "out": str(out), "merged_shards": len(paths)}
        summary_path(out).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def merge_main(argv: list[str]) -> dict[str, Any]:
    """`presample.py --merge OUT SHARD... [--overwrite]` (argv without the --merge)."""
    cfg = parse_config(MergeConfig, argv, prog="presample.py --merge")
    summary = merge_shards(cfg.out, cfg.shards, overwrite=cfg.overwrite)
    print(json.dumps(summary, indent=2))
    return summary
