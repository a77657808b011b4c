"""On-policy rounds (beyond the paper's code): sample from the current policy, reward against the
fixed reference statistics of the first training set, and train on that with the ratio taken
against the sampling policy.

Sampling reuses the pre-sampling stage as it is (`python -m pruner.presample`) and the training
set builder (`python -m pruner.dataset --ref-stats ...`), run by rank 0 in subprocesses: vLLM
spawns its own workers and must not live inside the torchrun process group.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from torch import nn

from pruner.checkpoint import export_hf
from pruner.distributed import Dist, barrier


def round_dir(out: Path, round_index: int) -> Path:
    return out / f"round-{round_index}"


def resample(policy: nn.Module, first_trainset: Path, out: Path, round_index: int, source_model: str, d: Dist,
             *, samples_per_problem: int = 0) -> tuple[Path, Path]:
    """Export the policy, sample from it, build the round's training set. Returns (model, trainset)."""
    folder = round_dir(out, round_index)
    model_dir, trainset = folder / "model", folder / "trainset"
    if (trainset / "meta.json").exists() and (model_dir / "config.json").exists():
        return model_dir, trainset  # a resumed run: this round was already sampled
    export_hf(policy, model_dir, source_model, d)
    if d.is_main:
        meta = json.loads((first_trainset / "meta.json").read_text())
        samples_meta = Path(meta["samples_file"]).with_name(Path(meta["samples_file"]).name + ".meta.json")
        sampling = json.loads(samples_meta.read_text())["sampling"]
        samples = folder / "samples.jsonl"
        cmd = [sys.executable, "-m", "pruner.presample", "--model", str(model_dir), "--problems", sampling["problems"],
               "--out", str(samples), "--k", str(samples_per_problem or sampling["k"]),
               "--temperature", str(sampling["temperature"]), "--top-p", str(sampling["top_p"]),
               "--max-new-tokens", str(sampling["max_new_tokens"]), "--seed", str(sampling["seed"] + round_index),
               "--system-prompt", sampling["system_prompt"] or "", "--suffix", sampling["suffix"] or "",
               "--think", sampling["think"]]
        subprocess.run(cmd, check=True)
        subprocess.run([sys.executable, "-m", "pruner.dataset", "--samples", str(samples), "--out", str(trainset),
                        "--kind", meta.get("kind", "lh"), "--lam", str(meta["lam"]),
                        "--ref-stats", str(first_trainset / "problem_stats.jsonl")], check=True)
    barrier()
    return model_dir, trainset
