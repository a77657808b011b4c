"""Report on pre-sampled responses: how length relates to accuracy, before any training.

Writes `summary.json`, `report.md` and two PNGs into a folder:
- the paper's Table 1: accuracy by length quartile *within* each problem (samples of one
  problem ranked by length, quartile 1 = shortest); if shorter samples of the same problem are
  as accurate or more, length can be cut without losing accuracy;
- the paper's Figure 1 style: accuracy per global length bucket, and the length histogram.
"""
from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from pruner.samples import summarize


def quartile_accuracy(records: list[dict]) -> dict[str, Any]:
    """Mean accuracy and length per within-problem length quartile (Q1 = shortest)."""
    by_problem: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        by_problem[str(rec["problem_id"])].append(rec)
    acc: list[list[float]] = [[] for _ in range(4)]
    length: list[list[float]] = [[] for _ in range(4)]
    for samples in by_problem.values():
        # ties broken by sample_index so the table is deterministic
        ranked = sorted(samples, key=lambda r: (r["response_tokens"], r["sample_index"]))
        k = len(ranked)
        if k < 4:  # a problem with fewer than 4 samples cannot fill four quartiles
            continue
        for rank, rec in enumerate(ranked):
            q = rank * 4 // k
            acc[q].append(float(rec["correct"]))
            length[q].append(float(rec["response_tokens"]))
    return {
        f"Q{q + 1}": {
            "accuracy": statistics.fmean(acc[q]) if acc[q] else None,
            "mean_length": statistics.fmean(length[q]) if length[q] else None,
            "samples": len(acc[q]),
        }
        for q in range(4)
    }


def bucket_accuracy(records: list[dict], buckets: int = 10) -> list[dict[str, Any]]:
    """Accuracy in equal-count global length buckets."""
    lengths = np.array([r["response_tokens"] for r in records], dtype=np.float64)
    correct = np.array([float(r["correct"]) for r in records])
    order = np.argsort(lengths, kind="stable")
    rows = []
    for part in np.array_split(order, min(buckets, len(order))):
        if len(part) == 0:
            continue
        rows.append({
            "min_length": int(lengths[part].min()),
            "max_length": int(lengths[part].max()),
            "mean_length": float(lengths[part].mean()),
            "accuracy": float(correct[part].mean()),
            "samples": int(len(part)),
        })
    return rows


def summarize_samples(records: list[dict]) -> dict[str, Any]:
    """The samples file's own summary (`samples.summarize`: accuracy, mean/median length, truncation)
    plus length percentiles, per-problem extremes and the length/accuracy tables."""
    lengths = np.array([r["response_tokens"] for r in records], dtype=np.float64)
    per_problem: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        per_problem[str(rec["problem_id"])].append(rec)
    problem_acc = [statistics.fmean(float(r["correct"]) for r in s) for s in per_problem.values()]
    base = summarize(records)
    return {
        "samples": base["samples"],
        "problems": len(per_problem),
        "accuracy": float(base["accuracy"]),
        "mean_length": float(base["mean_length"]),
        "median_length": float(base["median_length"]),
        "length_percentiles": {str(p): float(np.percentile(lengths, p)) for p in (10, 25, 75, 90, 99)},
        "truncated_fraction": float(base["truncated_fraction"]),
        "problems_all_correct": sum(a == 1.0 for a in problem_acc),
        "problems_all_wrong": sum(a == 0.0 for a in problem_acc),
        "no_answer_fraction": float(np.mean([r.get("extracted_answer") is None for r in records])),
        "accuracy_by_length_quartile": quartile_accuracy(records),
        "accuracy_by_length_bucket": bucket_accuracy(records),
    }


def _plots(records: list[dict], summary: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buckets = summary["accuracy_by_length_bucket"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([b["mean_length"] for b in buckets], [b["accuracy"] for b in buckets], marker="o")
    ax.set_xlabel("response length (tokens), bucket mean")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Accuracy by response length (equal-count buckets)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_length.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    right = [r["response_tokens"] for r in records if r["correct"]]
    wrong = [r["response_tokens"] for r in records if not r["correct"]]
    ax.hist([right, wrong], bins=40, stacked=True, label=["correct", "wrong"], color=["tab:green", "tab:red"])
    ax.set_xlabel("response length (tokens)")
    ax.set_ylabel("samples")
    ax.set_title("Response length distribution")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "length_hist.png", dpi=120)
    plt.close(fig)


def _markdown(summary: dict[str, Any]) -> str:
    lines = [
        "# Pre-sampling report",
        "",
        f"{summary['samples']} samples of {summary['problems']} problems: accuracy {summary['accuracy']:.3f}, "
        f"mean length {summary['mean_length']:.1f} tokens (median {summary['median_length']:.0f}), "
        f"truncated {summary['truncated_fraction']:.1%}, no boxed answer {summary['no_answer_fraction']:.1%}; "
        f"{summary['problems_all_correct']} problems all correct, {summary['problems_all_wrong']} all wrong.",
        "",
        "## Accuracy by length quartile within each problem (paper's Table 1)",
        "",
        "| quartile | accuracy | mean length | samples |",
        "|---|---|---|---|",
    ]
    for name, row in summary["accuracy_by_length_quartile"].items():
        acc = "-" if row["accuracy"] is None else f"{row['accuracy']:.3f}"
        mean = "-" if row["mean_length"] is None else f"{row['mean_length']:.1f}"
        lines.append(f"| {name} | {acc} | {mean} | {row['samples']} |")
    lines += ["", "## Accuracy by global length bucket", "", "| length range | accuracy | samples |", "|---|---|---|"]
    for b in summary["accuracy_by_length_bucket"]:
        lines.append(f"| {b['min_length']}-{b['max_length']} | {b['accuracy']:.3f} | {b['samples']} |")
    lines += ["", "![accuracy vs length](accuracy_vs_length.png)", "", "![length histogram](length_hist.png)", ""]
    return "\n".join(lines)


def write_report(records: list[dict], out_dir: str | Path) -> Path:
    """Write summary.json, report.md, accuracy_vs_length.png and length_hist.png; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize_samples(records)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "report.md").write_text(_markdown(summary))
    _plots(records, summary, out)
    return out
