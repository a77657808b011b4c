"""Summaries, comparisons, the Markdown table and the PNG plots of `bench/speed.py`."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from pruner.aes import AES_FORMULA, accuracy_efficiency_score, waste_removed


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summarize_run(run: dict) -> dict:
    samples = run["samples"]
    tokens = [s["tokens"] for s in samples]
    latencies = [s["latency_s"] for s in samples if s["latency_s"] is not None]
    mins = [s["min_tokens"] for s in samples if s.get("min_tokens") is not None]
    return {
        "model": run["model"], "model_path": run["model_path"], "dataset": run["dataset"], "mode": run["mode"],
        "samples": len(samples), "n": run["n"],
        "accuracy": sum(s["correct"] for s in samples) / len(samples),
        "mean_tokens": statistics.fmean(tokens), "median_tokens": statistics.median(tokens),
        "wall_time_s": run["wall_time_s"], "tokens_per_s": sum(tokens) / run["wall_time_s"],
        "latency_p50_s": _percentile(latencies, 0.5), "latency_p90_s": _percentile(latencies, 0.9),
        "truncation_rate": sum(s["truncated"] for s in samples) / len(samples),
        "mean_min_tokens": statistics.fmean(mins) if len(mins) == len(samples) else None,
    }


def compare(base: dict, run: dict) -> dict:
    row = {"base": base["model"], "model": run["model"], "dataset": run["dataset"], "mode": run["mode"],
           "token_ratio": run["mean_tokens"] / base["mean_tokens"],
           "time_ratio": run["wall_time_s"] / base["wall_time_s"],
           "accuracy_delta": run["accuracy"] - base["accuracy"],
           "aes": accuracy_efficiency_score(base["mean_tokens"], base["accuracy"], run["mean_tokens"], run["accuracy"])
           if base["accuracy"] > 0 else None}
    if base.get("mean_min_tokens") is not None:
        row["waste_removed"] = waste_removed(base["mean_tokens"], run["mean_tokens"], base["mean_min_tokens"])
    return row


def summarize(raw_runs: list[dict]) -> dict:
    runs = [summarize_run(r) for r in raw_runs]
    comparisons = []
    for run in runs:
        base = next(r for r in runs if r["dataset"] == run["dataset"] and r["mode"] == run["mode"])
        if base is not run:
            comparisons.append(compare(base, run))
    return {"aes_formula": AES_FORMULA, "runs": runs, "comparisons": comparisons}


def _fmt(value: object, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec) if isinstance(value, float) else str(value)


def markdown(results: dict) -> str:
    lines = ["| model | mode | accuracy | mean tokens | median tokens | wall time (s) | tokens/s | p50 / p90 latency (s) | truncated |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        lines.append(f"| {r['model']} | {r['mode']} | {r['accuracy']:.3f} | {r['mean_tokens']:.1f} | "
                     f"{r['median_tokens']:.0f} | {r['wall_time_s']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{_fmt(r['latency_p50_s'], '.2f')} / {_fmt(r['latency_p90_s'], '.2f')} | {r['truncation_rate']:.3f} |")
    if results["comparisons"]:
        lines += ["", "| model vs base | mode | token ratio | time ratio | accuracy delta | AES | waste removed |",
                  "|---|---|---|---|---|---|---|"]
        for c in results["comparisons"]:
            lines.append(f"| {c['model']} vs {c['base']} | {c['mode']} | {c['token_ratio']:.3f} | {c['time_ratio']:.3f} | "
                         f"{c['accuracy_delta']:+.3f} | {_fmt(c['aes'])} | {_fmt(c.get('waste_removed'))} |")
    lines += ["", f"{results['aes_formula']}."]
    return "\n".join(lines)


def plot(raw_runs: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for mode in sorted({r["mode"] for r in raw_runs}):
        runs = [r for r in raw_runs if r["mode"] == mode]
        fig, (hist, acc) = plt.subplots(1, 2, figsize=(12, 4))
        every = [s["tokens"] for r in runs for s in r["samples"]]
        bins = 30
        edges = [min(every) + (max(every) - min(every) + 1) * i / bins for i in range(bins + 1)]
        base_tokens = sorted(s["tokens"] for s in runs[0]["samples"])
        # Length buckets: quartiles of the base model's lengths, so every model is cut the same way.
        cuts = [base_tokens[int(len(base_tokens) * q)] for q in (0.25, 0.5, 0.75)]
        labels = [f"<{cuts[0]}", f"{cuts[0]}-{cuts[1]}", f"{cuts[1]}-{cuts[2]}", f">={cuts[2]}"]
        width = 0.8 / len(runs)
        for j, r in enumerate(runs):
            hist.hist([s["tokens"] for s in r["samples"]], bins=edges, alpha=0.5, label=r["model"])
            buckets = [[] for _ in range(4)]
            for s in r["samples"]:
                buckets[sum(s["tokens"] >= c for c in cuts)].append(s["correct"])
            acc.bar([i + j * width for i in range(4)], [sum(b) / len(b) if b else 0 for b in buckets], width,
                    label=r["model"])
        hist.set(title=f"response length ({mode})", xlabel="tokens", ylabel="samples")
        hist.legend()
        acc.set_xticks([i + width * (len(runs) - 1) / 2 for i in range(4)], labels)
        acc.set(title=f"accuracy by length bucket ({mode}; base quartiles)", xlabel="tokens", ylabel="accuracy")
        acc.legend()
        fig.tight_layout()
        path = out / f"lengths_{mode}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(results: dict, raw_runs: list[dict], out: Path) -> str:
    (out / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (out / "results.md").write_text(table + "\n")
    plot(raw_runs, out)
    return table
