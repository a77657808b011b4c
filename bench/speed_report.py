"""Summaries, comparisons, the Markdown table and the PNG plots of `bench/speed.py`."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench.speed_sets import safe_filename
from bench.speed_stats import REPLICATES, bootstrap, includes, pair
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
    thinking = [s["thinking_tokens"] for s in samples if s.get("thinking_tokens") is not None]
    row = {
        "model": run["model"], "model_path": run["model_path"], "dataset": run["dataset"], "mode": run["mode"],
        "samples": len(samples), "problems": len({s["problem_id"] for s in samples}), "n": run["n"],
        "accuracy": sum(s["correct"] for s in samples) / len(samples),
        "mean_tokens": statistics.fmean(tokens), "median_tokens": statistics.median(tokens),
        "wall_time_s": run["wall_time_s"], "tokens_per_s": sum(tokens) / run["wall_time_s"],
        "latency_p50_s": _percentile(latencies, 0.5), "latency_p90_s": _percentile(latencies, 0.9),
        "truncation_rate": sum(s["truncated"] for s in samples) / len(samples),
        "mean_min_tokens": statistics.fmean(mins) if len(mins) == len(samples) else None,
    }
    if "dataset_source" in run:
        row["dataset_source"] = run["dataset_source"]
    if thinking and len(thinking) == len(samples):  # a <think> model: where the length goes
        row["mean_thinking_tokens"] = statistics.fmean(thinking)
        row["mean_answer_tokens"] = row["mean_tokens"] - row["mean_thinking_tokens"]
    return row


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def compare(base: dict, run: dict) -> dict:
    row = {"base": base["model"], "model": run["model"], "dataset": run["dataset"], "mode": run["mode"],
           "token_ratio": run["mean_tokens"] / base["mean_tokens"],
           "time_ratio": run["wall_time_s"] / base["wall_time_s"],
           "accuracy_delta": run["accuracy"] - base["accuracy"],
           "aes": accuracy_efficiency_score(base["mean_tokens"], base["accuracy"], run["mean_tokens"], run["accuracy"])
           if base["accuracy"] > 0 else None}
    if base.get("mean_min_tokens") is not None:
        row["waste_removed"] = waste_removed(base["mean_tokens"], run["mean_tokens"], base["mean_min_tokens"])
    if "mean_thinking_tokens" in base and "mean_thinking_tokens" in run:
        row["thinking_ratio"] = _ratio(run["mean_thinking_tokens"], base["mean_thinking_tokens"])
        row["answer_ratio"] = _ratio(run["mean_answer_tokens"], base["mean_answer_tokens"])
    return row


def _with_intervals(row: dict, pairs: list) -> dict:
    """The comparison's paired bootstrap intervals (bench/speed_stats.py), point estimates unchanged."""
    boot = bootstrap(pairs)
    row["accuracy_delta_ci"], row["token_ratio_ci"] = boot["accuracy_delta_ci"], boot["token_ratio_ci"]
    row["ci"] = {k: boot[k] for k in ("ci_level", "replicates", "problems")}
    return row


def _average(runs: list[dict]) -> dict:
    """One model's row averaged over the sets (each set weighs the same, as the paper's Avg column)."""
    first = runs[0]
    row = {"model": first["model"], "dataset": "average", "mode": first["mode"],
           "sets": [r["dataset"] for r in runs], "problems": sum(r["problems"] for r in runs),
           "accuracy": statistics.fmean(r["accuracy"] for r in runs),
           "mean_tokens": statistics.fmean(r["mean_tokens"] for r in runs),
           "wall_time_s": sum(r["wall_time_s"] for r in runs),
           "truncation_rate": statistics.fmean(r["truncation_rate"] for r in runs)}
    if all("mean_thinking_tokens" in r for r in runs):
        row["mean_thinking_tokens"] = statistics.fmean(r["mean_thinking_tokens"] for r in runs)
        row["mean_answer_tokens"] = row["mean_tokens"] - row["mean_thinking_tokens"]
    return row


def summarize(raw_runs: list[dict]) -> dict:
    """Per-run summaries; each model against the first on the same set and mode, with paired intervals;
    with several sets, each model's average over them (and its comparison, intervals stratified by set)."""
    runs = [summarize_run(r) for r in raw_runs]
    key = {id(r): (s["dataset"], s["mode"]) for r, s in zip(raw_runs, runs)}
    base_raw = {}
    for raw in raw_runs:
        base_raw.setdefault(key[id(raw)], raw)
    comparisons = []
    for raw, run in zip(raw_runs, runs):
        base = base_raw[key[id(raw)]]
        if base is not raw:
            base_run = runs[raw_runs.index(base)]
            comparisons.append(_with_intervals(compare(base_run, run), [pair(base["samples"], raw["samples"])]))
    sets = list(dict.fromkeys(r["dataset"] for r in runs))
    averages, average_comparisons = [], []
    if len(sets) > 1:
        for model, mode in dict.fromkeys((r["model"], r["mode"]) for r in runs):
            mine = [r for r in runs if r["model"] == model and r["mode"] == mode]
            if len(mine) == len(sets):
                averages.append(_average(mine))
        for avg in averages:
            base_avg = next(a for a in averages if a["mode"] == avg["mode"])
            if base_avg is avg:
                continue
            pairs = [pair(base_raw[(d, avg["mode"])]["samples"],
                          next(r for r, s in zip(raw_runs, runs) if s["model"] == avg["model"]
                               and key[id(r)] == (d, avg["mode"]))["samples"]) for d in sets]
            average_comparisons.append(_with_intervals(compare(base_avg, avg), pairs))
    return {"aes_formula": AES_FORMULA, "runs": runs, "comparisons": comparisons, "averages": averages,
            "average_comparisons": average_comparisons}


def _fmt(value: object, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec) if isinstance(value, float) else str(value)


def _interval(value: float, ci: list[float] | None, spec: str, null: float) -> str:
    """`+0.010 [-0.020, +0.040] †`: the dagger marks an interval that holds `null` (not established)."""
    if ci is None:
        return format(value, spec)
    return f"{value:{spec}} [{ci[0]:{spec}}, {ci[1]:{spec}}]" + (" †" if includes(ci, null) else "")


def _main_table(results: dict, mode: str) -> list[str]:
    """The paper's Table 2 layout for one mode: a row per set and model, then each model's average."""
    sets = list(dict.fromkeys(r["dataset"] for r in results["runs"]))
    runs = sorted((r for r in results["runs"] if r["mode"] == mode), key=lambda r: sets.index(r["dataset"])) + \
        [a for a in results.get("averages", []) if a["mode"] == mode]  # set by set, each model under the base
    cmps = {(c["dataset"], c["model"]): c for c in results["comparisons"] + results.get("average_comparisons", [])
            if c["mode"] == mode}
    think = any("mean_thinking_tokens" in r for r in runs)
    waste = any("waste_removed" in c for c in cmps.values())
    head = ["data set", "model", "accuracy", "accuracy delta [95% CI]", "mean tokens", "token ratio [95% CI]",
            "time ratio", "AES", "truncated"] + (["thinking / answer tokens", "thinking / answer ratio"] if think
                                                 else []) + (["waste removed"] if waste else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        c = cmps.get((r["dataset"], r["model"]))
        label = "**average**" if r["dataset"] == "average" else r["dataset"]
        cells = [label, r["model"], f"{r['accuracy']:.3f}",
                 _interval(c["accuracy_delta"], c.get("accuracy_delta_ci"), "+.3f", 0.0) if c else "—",
                 f"{r['mean_tokens']:.1f}", _interval(c["token_ratio"], c.get("token_ratio_ci"), ".3f", 1.0) if c
                 else "1", _fmt(c["time_ratio"]) if c else "1", _fmt(c["aes"]) if c else "—",
                 f"{r['truncation_rate']:.3f}"]
        if think:
            cells += [f"{_fmt(r.get('mean_thinking_tokens'), '.1f')} / {_fmt(r.get('mean_answer_tokens'), '.1f')}",
                      f"{_fmt(c.get('thinking_ratio'))} / {_fmt(c.get('answer_ratio'))}" if c else "1 / 1"]
        if waste:
            cells.append(_fmt(c.get("waste_removed")) if c else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict) -> str:
    modes = list(dict.fromkeys(r["mode"] for r in results["runs"]))
    settings = results.get("settings", {}).get("used", {})
    lines = []
    for mode in modes:
        runs = [r for r in results["runs"] if r["mode"] == mode]
        how = (f"n = {runs[0]['n']}, temperature {settings.get('temperature')}, top-p {settings.get('top_p')}"
               if mode == "sampled" and settings else "one answer per problem" if mode == "greedy" else "")
        lines += [f"**{mode}**" + (f" ({how})" if how else "") + ":", "", *_main_table(results, mode), ""]
    lines += ["| model | data set | mode | accuracy | mean tokens | median tokens | wall time (s) | tokens/s | "
              "p50 / p90 latency (s) | truncated |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        lines.append(f"| {r['model']} | {r['dataset']} | {r['mode']} | {r['accuracy']:.3f} | {r['mean_tokens']:.1f} | "
                     f"{r['median_tokens']:.0f} | {r['wall_time_s']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{_fmt(r['latency_p50_s'], '.2f')} / {_fmt(r['latency_p90_s'], '.2f')} | "
                     f"{r['truncation_rate']:.3f} |")
    lines += ["", f"Accuracy is pass@1 (averaged over a problem's samples); ratios and deltas against the first "
              f"model on the same set and mode. [95% CI]: paired bootstrap over problems ({REPLICATES} resamples; "
              "the average row resamples within each set); † the interval holds 0 (a delta) or 1 (a ratio), so "
              f"that difference is not established. {results['aes_formula']}."]
    return "\n".join(lines)


def plot(raw_runs: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    sets = list(dict.fromkeys(r["dataset"] for r in raw_runs))
    for data_set, mode in [(d, m) for d in sets for m in sorted({r["mode"] for r in raw_runs})]:
        runs = [r for r in raw_runs if r["mode"] == mode and r["dataset"] == data_set]
        if not runs:
            continue
        # One set keeps the plain name; several put the set's (safe) file name in it.
        stem = f"lengths_{mode}" if len(sets) == 1 else f"lengths_{safe_filename(data_set)}_{mode}"
        mode_title = mode if len(sets) == 1 else f"{data_set}, {mode}"
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
        hist.set(title=f"response length ({mode_title})", xlabel="tokens", ylabel="samples")
        hist.legend()
        acc.set_xticks([i + width * (len(runs) - 1) / 2 for i in range(4)], labels)
        acc.set(title=f"accuracy by length bucket ({mode_title}; base quartiles)", xlabel="tokens", ylabel="accuracy")
        acc.legend()
        fig.tight_layout()
        path = out / f"{stem}.png"
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
