"""On-policy rounds (beyond the paper's code): sample from the current policy, reward against the
fixed reference statistics of the first training set, and train on that with the ratio taken
against the sampling policy.

A round runs the pre-sampling stage and the training-set builder as they are, from configs
(`PresampleConfig`, `DatasetConfig`) built from the first set's recorded sampling settings, each
in a fresh process (`pruner.cli.run_stage`) with torchrun's variables removed from its environment:
vLLM spawns its own workers and must not join the torchrun process group. On the CPU rank 0 starts
them from inside the trainer; on GPUs the round driver (`python -m pruner.rounds`) does, between two
torchrun launches, so no process group waits and no GPU holds training state while vLLM samples.
This module imports neither stage.

A round's folder `<out>/round-<r>/` holds the exported policy (`model/`), its samples and its
training set, and `round.json`: the two configs and the digest of the set's manifest, written
last. A resumed run reuses a round only when `round.json` says it was built, completely, by the
configs this run builds now; anything else is rebuilt from the policy at the round's start.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path

from torch import nn

from pruner.cli import run_stage
from pruner.configs import DatasetConfig, PresampleConfig
from pruner.distributed import Dist, barrier, decided_by_main
from pruner.export import export_hf
from pruner.manifest import manifest_digest
from pruner.trainset import META, read_meta, stats_file


# torchrun's variables: a child that sees them would try to join (or re-create) the training group.
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                 "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# How pre-sampling runs, not what it samples: the round driver sets them for the GPUs at hand.
RUN_ONLY = ("tensor_parallel_size", "data_parallel_size", "chunk_problems")


def clean_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) without torchrun's variables, for a stage started from a rank."""
    source = os.environ if env is None else env
    return {k: v for k, v in source.items() if k not in TORCHRUN_VARS and not k.startswith("TORCHELASTIC_")}


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


def _comparable(record: dict) -> dict:
    """A round record without the fields that say how pre-sampling ran (GPUs, chunking)."""
    presample = {k: v for k, v in (record.get("presample") or {}).items() if k not in RUN_ONLY}
    return {"presample": presample, "dataset": record.get("dataset")}


def is_built(folder: Path, expected: dict) -> bool:
    """True when round.json records these configs (how it ran aside) and the training set it names is still there."""
    path, manifest = folder / "round.json", folder / "trainset" / "manifest.json"
    if not (path.exists() and manifest.exists() and (folder / "model" / "config.json").exists()):
        return False
    recorded = json.loads(path.read_text())
    return _comparable(recorded) == _comparable(expected) \
        and recorded.get("trainset_manifest") == manifest_digest(manifest)


def expected_record(first_trainset: Path, out: Path, round_index: int, samples_per_problem: int = 0) -> dict:
    """What round.json of round `round_index` must record (as it reads back from JSON)."""
    presample, dataset = round_configs(first_trainset, round_dir(out, round_index), round_index, samples_per_problem)
    return json.loads(json.dumps(_record(presample, dataset)))


def _built_by_main(folder: Path, expected: dict) -> bool:
    """`is_built` as rank 0 sees it, on every rank (an error there is raised on every rank, not a hang)."""
    return decided_by_main(lambda: is_built(folder, expected))


def export_round_model(policy: nn.Module, first_trainset: Path, out: Path, round_index: int, source_model: str,
                       d: Dist, *, samples_per_problem: int = 0, at_round_start: bool = True) -> bool:
    """Every rank: True when the round is already built by this run's configs; else the round's folder
    is started afresh and `policy` (which must be the policy at the round's start) exported to its model/."""
    folder = round_dir(out, round_index)
    expected = expected_record(first_trainset, out, round_index, samples_per_problem)
    if _built_by_main(folder, expected):
        return True
    if not at_round_start:
        raise RuntimeError(f"{folder}: round {round_index} is incomplete or was built with other settings, and "
                           "the resumed policy is past the round's start; resume from an earlier checkpoint")
    if d.is_main:  # a partial or foreign round: start it afresh
        shutil.rmtree(folder, ignore_errors=True)
    barrier()
    export_hf(policy, folder / "model", source_model, d, sampling=read_meta(first_trainset).get("sampling"))
    return False


def sample_round(first_trainset: Path, out: Path, round_index: int, samples_per_problem: int = 0, *,
                 run_options: dict | None = None, env: Mapping[str, str] | None = None) -> Path:
    """Pre-sample round `round_index` from its exported model and build its training set, each in a fresh
    process without torchrun's variables; round.json last. `run_options`: RUN_ONLY fields of pre-sampling.
    Call it where no process group waits (rank 0 on the CPU, the round driver on GPUs). Returns the set."""
    folder = round_dir(out, round_index)
    presample, dataset = round_configs(first_trainset, folder, round_index, samples_per_problem)
    if not (folder / "model" / "config.json").exists():
        raise FileNotFoundError(f"{folder / 'model'}: round {round_index}'s policy was not exported")
    presample = replace(presample, **{k: v for k, v in (run_options or {}).items() if k in RUN_ONLY})
    run_stage("pruner.presample", presample, env=clean_env(env))
    run_stage("pruner.dataset", dataset, env=clean_env(env))
    trainset = Path(dataset.out)
    record = {**_record(presample, dataset), "trainset_manifest": manifest_digest(trainset / "manifest.json")}
    (folder / "round.json").write_text(json.dumps(record, indent=2) + "\n")
    return trainset


def resample(policy: nn.Module, first_trainset: Path, out: Path, round_index: int, source_model: str, d: Dist,
             *, samples_per_problem: int = 0, at_round_start: bool = True, sample_here: bool = True
             ) -> tuple[Path, Path]:
    """The round's (sampling model, training set): reused when already built by this run's configs,
    else built from `policy`, which must then be the policy at the round's start. `sample_here=False`
    (the round driver's trainer): a round that is not built is an error, never sampled in the group."""
    folder = round_dir(out, round_index)
    model_dir, trainset = folder / "model", folder / "trainset"
    if not sample_here:
        if not _built_by_main(folder, expected_record(first_trainset, out, round_index, samples_per_problem)):
            raise RuntimeError(f"{folder}: round {round_index} is not built; the round driver (python -m pruner.rounds)"
                               " samples it between torchrun launches")
        return model_dir, trainset
    if not export_round_model(policy, first_trainset, out, round_index, source_model, d,
                              samples_per_problem=samples_per_problem, at_round_start=at_round_start):
        if d.is_main:
            sample_round(first_trainset, out, round_index, samples_per_problem)
        barrier()
    return model_dir, trainset
