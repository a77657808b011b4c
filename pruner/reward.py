"""The length-harmonizing recipe: what each pre-sampled response is worth to the trainer.

Per problem, over all its K samples: the reference statistics `ref_mean_length` (Lbar_ref) and
`ref_mean_accuracy` (Abar_ref), or, in on-policy rounds, those of the first round (`--ref-stats`).
Per sample:

    R = Lbar_ref / L - 1 + lam * (A - Abar_ref), clipped to CLIP          (the paper's Eq. 4)
    advantage = (R - mean R) / std R over the kept samples                (std 0: R - mean, no division)

The formula is the kernel library's `length_harmonizing_reward`; the policy around it is here:
- L counts the response as trained: an EOS is appended to a response that stopped without one
  (the model learns to stop), so L >= 1; an empty stopped response becomes [EOS].
- A truncated response (finish_reason "length") is wrong whatever its grade, keeps its length in
  the statistics, is trained on (the longest, most penalised samples) and stays unterminated.
- A response with no tokens at all (truncated at 0) is dropped from training; it counts as
  L = 1 in the statistics.
- `keep_per_problem=m` trains on a uniformly random m of a problem's samples (numpy, `seed`),
  drawn after the statistics were taken on all K. The paper's code keeps 2.
- The baselines: sft = per problem the shortest correct sample (ties: lowest sample_index),
  advantage 1; dpo = that (chosen, +1) against the longest wrong sample, or the longest other
  one when none is wrong (rejected, -1). Problems where no pair or no correct sample exists are skipped.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from o1pruner_kernels.sequence import length_harmonizing_reward
from pruner.trainset import read_stats

CLIP = (-2.0, 4.0)
KINDS = ("lh", "sft", "dpo")


def check_selection(kind: str, keep_per_problem: int | None) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if keep_per_problem is not None and keep_per_problem < 1:
        raise ValueError("keep_per_problem must be >= 1 (or None for all)")


def is_correct(rec: dict) -> bool:
    # a truncated response is wrong even if a grader upstream credited an early box
    return bool(rec["correct"]) and rec.get("finish_reason") != "length"


def response_ids(rec: dict, eos_ids: list[int]) -> tuple[list[int], bool]:
    """The response as trained (its length is L), and whether an EOS was appended."""
    ids = [int(t) for t in rec["response_token_ids"]]
    if rec.get("finish_reason") == "length" or (ids and ids[-1] in eos_ids):
        return ids, False
    return ids + [eos_ids[0]], True


def own_stats(samples: list[dict], lengths: list[int]) -> tuple[float, float]:
    """(mean length, mean accuracy) of one problem's samples; an empty response counts as L = 1."""
    return float(np.mean([max(n, 1) for n in lengths])), float(np.mean([is_correct(r) for r in samples]))


def load_ref_stats(path: str | Path) -> dict[str, dict]:
    """problem id -> stats row (`ref_mean_length`, `ref_mean_accuracy`, ...), every id of a merged problem."""
    rows = read_stats(path)
    return {str(pid): row for row in rows for pid in row.get("ids", [row["id"]])}


def reference_stats(problem_id: str, own: tuple[float, float], ref: dict[str, dict] | None,
                    ref_source: str | Path | None) -> tuple[float, float]:
    """(ref_mean_length, ref_mean_accuracy) of a problem: its own samples', or those loaded from `--ref-stats`."""
    if ref is None:
        return own
    if problem_id not in ref:
        raise KeyError(f"problem {problem_id} is not in ref_stats {ref_source}")
    return float(ref[problem_id]["ref_mean_length"]), float(ref[problem_id]["ref_mean_accuracy"])


def select(kind: str, samples: list[dict], lengths: list[int], keep: int | None,
           rng: np.random.Generator) -> list[tuple[int, bool]]:
    """(sample position, is_chosen) rows to train on for one problem."""
    order = range(len(samples))
    if kind == "lh":
        if keep is None or keep >= len(samples):
            return [(i, False) for i in order]
        return [(int(i), False) for i in sorted(rng.choice(len(samples), size=keep, replace=False))]
    correct = [i for i in order if is_correct(samples[i])]
    if not correct:
        return []
    best = min(correct, key=lambda i: (lengths[i], samples[i]["sample_index"]))
    if kind == "sft":
        return [(best, True)]
    pool = [i for i in order if not is_correct(samples[i])] or [i for i in order if i != best]
    if not pool:
        return []
    worst = max(pool, key=lambda i: (lengths[i], -samples[i]["sample_index"]))
    return [(best, True), (worst, False)]


def rewards(lengths: torch.Tensor, correct: list[bool], ref_mean_length: list[float],
            ref_mean_accuracy: list[float], lam: float) -> torch.Tensor:
    """R per row (fp32), clipped to CLIP."""
    return length_harmonizing_reward(
        lengths,
        torch.tensor(correct, dtype=torch.float32),
        torch.tensor(ref_mean_length, dtype=torch.float64),
        torch.tensor(ref_mean_accuracy, dtype=torch.float64),
        lam=lam, clip=CLIP,
    ).float()


def advantages(kind: str, reward: torch.Tensor, chosen: list[bool]) -> tuple[torch.Tensor, float, float]:
    """(advantages fp32, reward mean, reward std): lh standardises R; sft is 1; dpo is +1 chosen / -1 rejected."""
    mean = float(reward.double().mean())
    std = float(reward.double().std(unbiased=False)) if len(reward) > 1 else 0.0
    if kind == "lh":
        centred = reward.double() - mean
        return (centred / std if std > 1e-8 else centred).float(), mean, std
    if kind == "sft":
        return torch.ones(len(reward), dtype=torch.float32), mean, std
    return torch.tensor([1.0 if c else -1.0 for c in chosen], dtype=torch.float32), mean, std
