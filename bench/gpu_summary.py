"""The summary table of `bench/gpu_check.sh`: correctness, the fused kernel at N=16k, the trainer step.

Goals (issue: GPU check): fused log-prob kernel >= 1.3x faster than Liger's best equivalent, extra
memory <= 2% of eager's, >= 60% of matmul TFLOP/s; trainer step >= 1.5x faster than the paper
code's recipe at <= 50% of its peak memory. Plus the real trainer's runs (pruner/train.py under
torchrun): stage status, peak memory, tokens/s and the memory planner's estimate against the measured
peak (torch.cuda.max_memory_allocated on a GPU; peak RSS after start-up on the CPU). Reads the
results folder of one gpu_check.sh run and writes gpu_summary.md / gpu_summary.json into it.

    python bench/gpu_summary.py --results runs/gpu_check
"""
from __future__ import annotations

import csv
import json
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/gpu_summary.py` from a checkout
from pruner.cli import parse_config  # noqa: E402


@dataclass
class GpuSummaryConfig:
    """The summary table of one bench/gpu_check.sh run."""

    results: str = field(default="runs/gpu_check", metadata={
        "help": "gpu_check.sh's results folder ($OUT there); gpu_summary.md/.json are written into it"})


def kernel_tests(results: Path) -> str:
    path = results / "kernel_tests.xml"
    if not path.exists():
        return "not run"
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, failed = int(suite.get("tests", 0)), int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    return f"{total - failed - int(suite.get('skipped', 0))} passed, {failed} failed, {suite.get('skipped', 0)} skipped"


def fused_rows(results: Path) -> dict[str, dict]:
    path = results / "kernels.csv"
    if not path.exists():
        return {}
    rows = [r for r in csv.DictReader(path.open()) if r["op"] == "fused_linear" and r.get("status", "ok") == "ok"]
    if not rows:
        return {}
    n = max(int(r["N"]) for r in rows)
    return {r["provider"]: r for r in rows if int(r["N"]) == n}


def trainer_runs(results: Path) -> dict[str, dict]:
    """The real trainer's runs (bench/gpu_check.sh stage 4): peak memory, tokens/s, plan vs measured."""
    runs = {}
    status = (results / "gpu_check_status.txt").read_text() if (results / "gpu_check_status.txt").exists() else ""
    for name, label in (("run", "trainer (fused head; bf16 on a GPU)"), ("ac", "trainer --activation-checkpointing")):
        folder = results / "trainer" / name
        metrics = folder / "metrics.jsonl"
        if not metrics.exists():
            continue
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        warm = [r["tokens_per_s"] for r in rows[1:]] or [r["tokens_per_s"] for r in rows]
        run = {"label": label, "steps": len(rows), "peak_memory_gib": max(r["peak_memory_gib"] for r in rows),
               "tokens_per_s": sorted(warm)[len(warm) // 2]}
        if (folder / "memory_plan.json").exists():
            plan = json.loads((folder / "memory_plan.json").read_text())
            measured = run["peak_memory_gib"]
            if plan.get("device") != "cuda":  # CPU: peak RSS holds the libraries too; take what came after
                measured -= plan.get("rss_before_model_bytes", 0) / 2**30
            run["plan_gib"] = plan["per_rank"]["total"] / 2**30
            run["plan_vs_measured"] = run["plan_gib"] / measured if measured > 0 else None
        runs[name] = run
    log = results / "trainer_run.log"
    liger = [line for line in log.read_text().splitlines() if line.startswith("liger-kernel")] if log.exists() else []
    if runs:
        runs["stages"] = {line.split()[0]: line.split()[1] for line in status.splitlines() if line.startswith("trainer")}
        runs["liger"] = liger[0] if liger else "no liger line in trainer_run.log"
    return runs


def trainer_lines(runs: dict) -> list[str]:
    lines = []
    for name in ("run", "ac"):
        if name not in runs:
            continue
        r = runs[name]
        plan = (f"plan {r['plan_gib']:.2f} GiB = {r['plan_vs_measured']:.2f}x measured"
                if r.get("plan_vs_measured") else "no plan")
        lines.append(f"| {r['label']}: peak memory / tokens/s | {r['peak_memory_gib']:.2f} GiB, "
                     f"{r['tokens_per_s']:.0f} tok/s ({plan}) | report | — |")
    if "stages" in runs:
        ok = all(v == "rc=0" for v in runs["stages"].values())
        lines.append(f"| trainer stages (fixture, run, resume, export loads, AC) | "
                     f"{', '.join(f'{k} {v}' for k, v in runs['stages'].items())} | all rc=0 | {'yes' if ok else 'no'} |")
        lines.append(f"| Liger | {runs['liger']} | patched on GPU | — |")
    return lines


def main(argv: list[str] | None = None) -> None:
    results = Path(parse_config(GpuSummaryConfig, argv, prog="bench/gpu_summary.py").results)
    if not results.is_dir():
        raise SystemExit(f"gpu_summary.py: --results {results}: no such folder (run bench/gpu_check.sh first)")
    lines = ["| check | value | goal | met |", "|---|---|---|---|"]
    summary: dict = {"kernel_tests": kernel_tests(results)}
    lines.append(f"| kernel tests | {summary['kernel_tests']} | all pass | "
                 f"{'yes' if ' 0 failed' in summary['kernel_tests'] else 'no'} |")
    fused = fused_rows(results)
    ours = fused.get("kernels-triton") or fused.get("kernels-torch")
    if ours:
        n = ours["N"]
        liger, eager = fused.get("liger"), fused.get("eager")
        if liger:
            speed = float(liger["total_ms"]) / float(ours["total_ms"])
            lines.append(f"| fused log-probs vs Liger, N={n} (fwd+bwd) | {speed:.2f}x | >= 1.3x | {'yes' if speed >= 1.3 else 'no'} |")
            summary["speedup_vs_liger"] = speed
        if eager:
            mem = float(ours["peak_mem_mib"]) / float(eager["peak_mem_mib"])
            lines.append(f"| fused extra memory / eager's, N={n} | {mem:.1%} | <= 2% | {'yes' if mem <= 0.02 else 'no'} |")
            summary["memory_vs_eager"] = mem
        if ours.get("frac_of_matmul"):
            frac = float(ours["frac_of_matmul"])
            lines.append(f"| fused TFLOP/s / matmul's | {frac:.0%} ({ours['tflops']} TFLOP/s) | >= 60% | {'yes' if frac >= 0.6 else 'no'} |")
            summary["fraction_of_matmul"] = frac
    steps = sorted(results.glob("train_step_*.json"), key=lambda p: p.stat().st_mtime)
    if steps:
        step = json.loads(steps[-1].read_text())
        ours_run = step["runs"][0]
        lines.append(f"| trainer step vs paper recipe ({ours_run['preset']}, {ours_run['seq']} tokens) | "
                     f"{step['speedup']:.2f}x | >= 1.5x | {'yes' if step['speedup'] >= 1.5 else 'no'} |")
        lines.append(f"| trainer peak memory / paper recipe's | {step['peak_memory_ratio']:.0%} | <= 50% | "
                     f"{'yes' if step['peak_memory_ratio'] <= 0.5 else 'no'} |")
        if ours_run.get("mfu") is not None:
            lines.append(f"| trainer MFU ({ours_run['device']}) | {ours_run['mfu']:.1%} | report | — |")
        summary["train_step"] = step
    runs = trainer_runs(results)
    lines += trainer_lines(runs)
    summary["trainer"] = runs
    device = (results / "gpu_info.csv").read_text().splitlines()[1:2] if (results / "gpu_info.csv").exists() else []
    lines.insert(0, f"GPU check on {device[0] if device else 'CPU (dry mode)'}\n")
    (results / "gpu_summary.md").write_text("\n".join(lines) + "\n")
    (results / "gpu_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
