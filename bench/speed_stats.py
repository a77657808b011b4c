"""Paired bootstrap intervals over problems for `bench/speed.py`'s comparisons.

Base and compared model answered the same problems, so each bootstrap replicate resamples problems
(with replacement) and takes both models' results for the same draws: the interval of the accuracy
delta and of the token ratio then reflects how much the problems vary, without counting that variation
twice. A problem's accuracy is the mean over its n samples (pass@1) and its length the mean tokens.
Several sets (the table's average row) are resampled within each set (a stratified bootstrap) and
averaged as the row is: accuracy delta = mean of the sets' deltas, token ratio = mean tokens / mean tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REPLICATES = 2000
LEVEL = 0.95


@dataclass
class Paired:
    """One set's per-problem means, aligned by problem: base and compared model."""

    base_acc: np.ndarray
    base_tokens: np.ndarray
    acc: np.ndarray
    tokens: np.ndarray


def per_problem(samples: list[dict]) -> dict[str, tuple[float, float]]:
    """problem id -> (accuracy over its samples, mean tokens)."""
    grouped: dict[str, list[dict]] = {}
    for s in samples:
        grouped.setdefault(str(s["problem_id"]), []).append(s)
    return {pid: (sum(bool(s["correct"]) for s in group) / len(group), sum(s["tokens"] for s in group) / len(group))
            for pid, group in grouped.items()}


def pair(base_samples: list[dict], samples: list[dict]) -> Paired:
    """Align two models' samples of one set by problem id; both must have answered the same problems."""
    base, other = per_problem(base_samples), per_problem(samples)
    if base.keys() != other.keys():
        missing = sorted(base.keys() ^ other.keys())[:5]
        raise ValueError(f"the models answered different problems (e.g. {missing}): no paired comparison")
    ids = sorted(base)
    return Paired(np.array([base[i][0] for i in ids]), np.array([base[i][1] for i in ids]),
                  np.array([other[i][0] for i in ids]), np.array([other[i][1] for i in ids]))


def _statistics(sets: list[Paired], draws: list[np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
    """(accuracy delta, token ratio) over the sets, for each replicate's draws (None: the data as is)."""
    deltas, base_len, other_len = [], [], []
    for k, p in enumerate(sets):
        idx = draws[k] if draws is not None else np.arange(len(p.acc))[None, :]
        deltas.append(p.acc[idx].mean(axis=1) - p.base_acc[idx].mean(axis=1))
        base_len.append(p.base_tokens[idx].mean(axis=1))
        other_len.append(p.tokens[idx].mean(axis=1))
    delta = np.mean(deltas, axis=0)
    ratio = np.mean(other_len, axis=0) / np.maximum(np.mean(base_len, axis=0), 1e-12)
    return delta, ratio


def bootstrap(sets: list[Paired], *, replicates: int = REPLICATES, seed: int = 0, level: float = LEVEL) -> dict:
    """Point estimates and percentile intervals of the accuracy delta and the token ratio."""
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(p.acc), size=(replicates, len(p.acc))) for p in sets]
    delta, ratio = _statistics(sets, draws)
    point_delta, point_ratio = (float(x[0]) for x in _statistics(sets, None))
    tail = 100 * (1 - level) / 2
    d_lo, d_hi = np.percentile(delta, [tail, 100 - tail])
    r_lo, r_hi = np.percentile(ratio, [tail, 100 - tail])
    return {"accuracy_delta": point_delta, "accuracy_delta_ci": [float(d_lo), float(d_hi)],
            "token_ratio": point_ratio, "token_ratio_ci": [float(r_lo), float(r_hi)],
            "ci_level": level, "replicates": replicates, "problems": sum(len(p.acc) for p in sets)}


def includes(interval: list[float] | None, value: float) -> bool:
    """Whether the interval holds `value` (a delta's 0, a ratio's 1): such a difference is not established."""
    return interval is not None and interval[0] <= value <= interval[1]
