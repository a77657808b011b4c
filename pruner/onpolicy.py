"""On-policy rounds (beyond the paper's code): sample from the current policy, reward against the
fixed reference statistics of the first training set, and train on that with the ratio taken
against the sampling policy.

A round runs the pre-sampling stage and the training-set builder as they are, from configs
(`PresampleConfig`, `DatasetConfig`) built from the first set's recorded sampling settings, each
in a fresh process (`pruner.cli.run_stage`) started by rank 0: vLLM spawns its own workers and
must not live inside the torchrun process group. This module imports neither stage.

A round's folder `<out>/round-<r>/` holds the exported policy (`model/`), its samples and its
training set, and `round.json`: the two configs and the digest of the set's manifest, written
last. A resumed run reuses a round only when `round.json` says it was built, completely, by the
configs this run builds now; anything else is rebuilt from the policy at the round's start.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from torch import nn

from pruner.checkpoint import export_hf
from pruner.cli import run_stage
from pruner.configs import DatasetConfig, PresampleConfig
from pruner.distributed import Dist, barrier, broadcast_object
from pruner.manifest import manifest_digest
from pruner.trainset import META, read_meta, stats_file


# What a round needs from the first set's meta["sampling"] (pre-sampling records them all).
SAMPLING_FIELDS = ("problems", "k", "temperature", "top_p", "max_new_tokens", "seed", "system_prompt", "suffix",
                   "think")


def round_dir(out: Path, round_index: int) -> Path:
    return out / f"round-{round_index}"


def round_configs(first_trainset: Path, folder: Path, round_index: int,
                  samples_per_problem: int = 0) -> tuple[PresampleConfig, DatasetConfig]:
    """What round `round_index` runs: the first set's sampling settings on the round's policy
    (a seed of its own per round), rewarded against the first set's reference statistics."""
    meta_path = first_trainset / META
    meta = read_meta(first_trainset)
    sampling = meta.get("sampling") or {}
    missing = [k for k in SAMPLING_FIELDS if k not in sampling]
    if missing:
        raise ValueError(f"{meta_path}: field sampling lacks {', '.join(missing)}; on-policy rounds (--rounds > 1) "
                         "re-sample with the first training set's recorded sampling settings")
    presample = PresampleConfig(
        model=str(folder / "model"), problems=sampling["problems"], out=str(folder / "samples.jsonl"),
        k=samples_per_problem or sampling["k"], temperature=sampling["temperature"], top_p=sampling["top_p"],
        max_new_tokens=sampling["max_new_tokens"], seed=sampling["seed"] + round_index,
        system_prompt=sampling["system_prompt"] or "", suffix=sampling["suffix"] or "", think=sampling["think"],
        # the first set's problems: pre-sampling takes a prefix of the problem list (--limit)
        limit=meta["num_problems"])
    dataset = DatasetConfig(samples=presample.out, out=str(folder / "trainset"), kind=meta.get("kind", "lh"),
                            lam=meta["lam"], keep_per_problem=meta.get("keep_per_problem"),
                            seed=meta.get("seed", 0), ref_stats=str(stats_file(first_trainset)))
    return presample, dataset


def _record(presample: PresampleConfig, dataset: DatasetConfig) -> dict:
    return {"presample": asdict(presample), "dataset": asdict(dataset)}


def _is_built(folder: Path, expected: dict) -> bool:
    """True when round.json records these configs and the training set it names is still there."""
    path, manifest = folder / "round.json", folder / "trainset" / "manifest.json"
    if not (path.exists() and manifest.exists() and (folder / "model" / "config.json").exists()):
        return False
    recorded = json.loads(path.read_text())
    return {k: recorded.get(k) for k in expected} == expected \
        and recorded.get("trainset_manifest") == manifest_digest(manifest)


def resample(policy: nn.Module, first_trainset: Path, out: Path, round_index: int, source_model: str, d: Dist,
             *, samples_per_problem: int = 0, at_round_start: bool = True) -> tuple[Path, Path]:
    """The round's (sampling model, training set): reused when already built by this run's configs,
    else built from `policy`, which must then be the policy at the round's start."""
    folder = round_dir(out, round_index)
    presample, dataset = round_configs(first_trainset, folder, round_index, samples_per_problem)
    expected = json.loads(json.dumps(_record(presample, dataset)))  # as round.json reads back
    model_dir, trainset = Path(presample.model), Path(dataset.out)
    if broadcast_object(_is_built(folder, expected) if d.is_main else None):
        return model_dir, trainset
    if not at_round_start:
        raise RuntimeError(f"{folder}: round {round_index} is incomplete or was built with other settings, and "
                           "the resumed policy is past the round's start; resume from an earlier checkpoint")
    if d.is_main:  # a partial or foreign round: start it afresh
        shutil.rmtree(folder, ignore_errors=True)
    barrier()
    export_hf(policy, model_dir, source_model, d, sampling=read_meta(first_trainset).get("sampling"))
    if d.is_main:
        run_stage("pruner.presample", presample)
        run_stage("pruner.dataset", dataset)
        record = {**expected, "trainset_manifest": manifest_digest(trainset / "manifest.json")}
        (folder / "round.json").write_text(json.dumps(record, indent=2) + "\n")
    barrier()
    return model_dir, trainset
