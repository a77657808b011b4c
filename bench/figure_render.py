"""Markdown for bench/readme_figures.py: one renderer per figure, and the marked-region rewrite.

Each renderer reads only the files its figure's command wrote into the figure's folder, so a
results folder can be re-rendered without measuring anything again.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from pruner.demo import timing_table
from pruner.samples import summary_path


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def demo(folder: Path) -> str:
    run = folder / "run"
    timing = _json(run / "demo_timing.json")
    lines = []
    summary = summary_path(run / "samples.jsonl")  # the demo's pre-sampling output
    if summary.is_file():
        s = _json(summary)
        rate = s.get("generation_samples_per_s")
        lines += [f"Pre-sampling: {s['samples']:,} samples of {s['problems']:,} problems, accuracy {s['accuracy']:.3f}, "
                  f"mean {s['mean_length']:.1f} tokens; {rate if rate is not None else 'n/a'} samples/s while "
                  f"generating, {s.get('samples_per_s') or 'n/a'} over the stage (engine start included).", ""]
    lines += [(run / "bench" / "results.md").read_text().strip(), ""]
    note = out_of_depth_note(_json(run / "bench" / "results.json"))
    if note:
        lines += [note, ""]
    lines += [f"Wall time per stage (`{run.name}/demo_timing.json`; {timing['nproc']} training process(es) x "
              f"{timing['omp_num_threads']} threads, checkpoint every {timing['ckpt_every']} steps):", ""]
    lines.append(timing_table(timing["stages"], timing["total_s"]))
    return "\n".join(lines)


def out_of_depth_note(results: dict) -> str:
    """What the real sets' rows of a demo benchmark mean: the embedded model is out of its depth there
    (figures from the run's own results.json); empty for a run on the embedded sets alone."""
    runs = results.get("runs", [])
    base = runs[0]["model"] if runs else None
    real = [r for r in runs if not r["dataset"].startswith("embedded:")]
    if not real:
        return ""
    sets = list(dict.fromkeys(r["dataset"] for r in real))
    base_acc = [r["accuracy"] for r in real if r["model"] == base]
    truncated = [r["truncation_rate"] for r in real if r["model"] != base]
    sizes = ", ".join(f"{name} {next(r['problems'] for r in real if r['dataset'] == name)}" for name in sets)
    return (f"The embedded model was made for its arithmetic chains only: on the real sets ({sizes} problems) it is "
            f"out of its depth, base accuracy {min(base_acc):.3f} to {max(base_acc):.3f}. Their rows (and so the "
            f"average) say how the pruned model behaves off its training distribution (truncated "
            f"{min(truncated):.1%} to {max(truncated):.1%} of its samples there), not what pruning keeps; "
            "`embedded:test` is the measure of the method.")


def profile(folder: Path) -> str:
    r = _json(folder / "default_profile.json")
    cells = [f"{r['greedy_accuracy']:.3f}", f"{r['greedy_mean_tokens']:.1f}"]
    head = ["greedy accuracy", "greedy mean tokens"]
    if "plain_chat_greedy_accuracy" in r:
        head.append("greedy accuracy, user turn only (`LLM.chat`)")
        cells.append(f"{r['plain_chat_greedy_accuracy']:.3f}")
    if "concise_greedy_accuracy" in r:
        head.append("greedy accuracy, optional steps forbidden (tokens)")
        cells.append(f"{r['concise_greedy_accuracy']:.3f} ({r['concise_greedy_mean_tokens']:.1f})")
    head += ["sampled accuracy", "sampled mean tokens", "per-problem CV of length", "mean min_tokens / mean tokens"]
    cells += [f"{r['sampled_accuracy']:.3f}", f"{r['sampled_mean_tokens']:.1f}", f"{r['mean_length_cv']:.3f}",
              f"{r['min_over_mean']:.3f} (sampled), {r['greedy_min_over_mean']:.3f} (greedy)"]
    s = r["settings"]
    quartiles = " / ".join(f"{a:.3f}" for a in r["quartile_accuracy"])
    return "\n".join([
        f"{r['problems']} test problems, {s['samples']} samples per problem at temperature {s['temperature']}, "
        f"top-p {s['top_p']}, vLLM {s['vllm']} ({r['wall_s']:.0f} s):", "",
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(cells) + " |", "",
        f"Accuracy by length quartile of each problem's samples, shortest to longest: {quartiles}.",
    ])


def presample(folder: Path) -> str:
    r = _json(folder / "presample_vs_hf.json")
    s = r["settings"]
    rows = ["| generator | load s | generate s | samples | samples/s | tokens/s |", "|---|---:|---:|---:|---:|---:|"]
    for name, label in (("vllm", "vLLM (`pruner.generation`)"), ("hf", "HF `generate`, batched")):
        if name in r:
            x = r[name]
            rows.append(f"| {label} | {x['load_s']:.1f} | {x['generate_s']:.1f} | {x['samples']} | "
                        f"{x['samples_per_s']:.1f} | {x['tokens_per_s']:.0f} |")
    engine = r["vllm"].get("engine")
    text = [f"{s['num_problems']} problems x K={s['k']}, temperature {s['temperature']}, top-p {s['top_p']}, "
            f"{r['machine']['cpus']} CPUs:", "", *rows]
    if "speedup_samples_per_s" in r:
        text += ["", f"vLLM / HF: **{r['speedup_samples_per_s']:.2f}x** samples/s."]
    if engine:
        text.append(f"vLLM engine: {'in-process' if engine['in_process'] else 'engine-core process'}, "
                    f"max_num_seqs {engine['max_num_seqs']}, max_num_batched_tokens {engine['max_num_batched_tokens']}.")
    return "\n".join(text)


def kernels(folder: Path) -> str:
    with (folder / "kernels_cpu.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "ok"]
    timed = [r for r in rows if r["device"] == "cpu" and r["total_ms"]]
    providers = list(dict.fromkeys(r["provider"] for r in timed))
    cases = list(dict.fromkeys((r["op"], r["N"], r["D"], r["V"]) for r in timed))
    out = ["| op | " + " | ".join(f"{p} fwd+bwd ms" for p in providers) + " |", "|---|" + "---:|" * len(providers)]
    for op, n, d, v in cases:
        cell = {r["provider"]: float(r["total_ms"]) for r in timed if (r["op"], r["N"], r["D"], r["V"]) == (op, n, d, v)}
        shape = ", ".join(f"{k}={x}" for k, x in (("N", n), ("D", d), ("V", v)) if x)
        out.append(f"| {op} ({shape}) | " + " | ".join(f"{cell[p]:.2f}" if p in cell else "—" for p in providers) + " |")
    rss = {r["provider"]: float(r["peak_mem_mib"]) for r in rows if r["device"] == "cpu-rss"}
    if {"kernels-torch", "eager"} <= set(rss):
        shape = next(r for r in rows if r["device"] == "cpu-rss")
        out += ["", f"Peak RSS, forward + backward of fused_linear at N={shape['N']}, D={shape['D']}, V={shape['V']}: "
                f"kernels' torch path +{rss['kernels-torch']:,.0f} MiB, eager `log_softmax(h @ W.T).gather` "
                f"+{rss['eager']:,.0f} MiB (ratio {rss['kernels-torch'] / rss['eager']:.3f})."]
    return "\n".join(out)


def train_step(folder: Path) -> str:
    found = sorted(folder.glob("train_step_*.md"))
    if not found:
        raise FileNotFoundError(f"{folder}: no train_step_*.md (bench/train_step.py writes one)")
    return found[0].read_text().strip()


_PAPER_LABELS = {"base": "base", "fast-prompt": "fast-solving prompt", "sft-shortest": "SFT, shortest correct",
                 "dpo": "DPO, shortest vs longest"}
_PAPER_MAIN = "o1-pruner-lam2"  # the method's main row (lambda = 2), in bold


def _paper_label(model: str) -> str:
    if model.startswith("o1-pruner-lam"):
        label = f"O1-Pruner, lambda = {model.removeprefix('o1-pruner-lam')}"
        return f"**{label}**" if model == _PAPER_MAIN else label
    return _PAPER_LABELS.get(model, model)


def paper(folder: Path) -> str:
    """bench/paper_comparisons.py's benchmark as one row per model: greedy and sampled side by side."""
    r = _json(folder / "run" / "bench" / "results.json")
    runs = {(x["model"], x["mode"]): x for x in r["runs"]}
    cmp = {(c["model"], c["mode"]): c for c in r["comparisons"]}
    models = list(dict.fromkeys(x["model"] for x in r["runs"]))
    order = [m for m in (*_PAPER_LABELS, _PAPER_MAIN) if m in models] + \
        [m for m in models if m not in _PAPER_LABELS and m != _PAPER_MAIN]
    rows = ["| model | greedy acc. | greedy tokens (ratio) | sampled acc. | sampled tokens (ratio) | sampled time ratio "
            "| AES greedy / sampled | waste removed greedy / sampled |", "|---|---|---|---|---|---|---|---|"]
    for m in order:
        cells = [_paper_label(m)]
        for mode in ("greedy", "sampled"):
            run, c = runs.get((m, mode)), cmp.get((m, mode))
            ratio = f" ({c['token_ratio']:.3f})" if c else ""
            cells += [f"{run['accuracy']:.3f}", f"{run['mean_tokens']:.1f}{ratio}"] if run else ["—", "—"]
        c_greedy, c_sampled = cmp.get((m, "greedy")), cmp.get((m, "sampled"))
        cells.append(f"{c_sampled['time_ratio']:.3f}" if c_sampled else "1")
        both = (c_greedy or {}, c_sampled or {})
        for key in ("aes", "waste_removed"):
            values = [_fmt3(c.get(key)) for c in both]
            cells.append("—" if set(values) == {"—"} else " / ".join(values))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _fmt3(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def marker(name: str, closing: bool = False) -> str:
    return f"<!-- {'/' if closing else ''}figures:{name} -->"


def replace_regions(text: str, bodies: dict[str, str], *, append_missing: bool = False, source: str = "text") -> str:
    """Put each body between its figure's markers. A marker missing, repeated or out of order is an
    error naming `source` and the line, unless `append_missing` adds the whole region at the end."""
    for name, body in bodies.items():
        opening, closing = marker(name), marker(name, closing=True)
        starts, ends = [m.start() for m in re.finditer(re.escape(opening), text)], \
            [m.start() for m in re.finditer(re.escape(closing), text)]
        region = f"{opening}\n{body.strip()}\n{closing}" if body.strip() else f"{opening}\n{closing}"
        if not starts and not ends and append_missing:
            text = f"{text.rstrip()}\n\n{region}\n" if text.strip() else f"{region}\n"
            continue
        if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
            where = ", ".join(f"line {text.count(chr(10), 0, i) + 1}" for i in starts + ends) or "nowhere"
            raise ValueError(f"{source}: need exactly one {opening} before one {closing} (found at {where})")
        text = text[: starts[0]] + region + text[ends[0] + len(closing):]
    return text
