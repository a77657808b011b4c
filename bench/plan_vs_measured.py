"""The memory planner against real trainer runs: plan total vs measured peak, 1 and 2 processes.

On a GPU the measured peak is torch.cuda.max_memory_allocated; on the CPU it is the peak RSS of
rank 0 minus its RSS just before the model was loaded (the libraries, tokenizer and data set are
not in the plan). Models: the embedded default and a Qwen2.5-0.5B-shaped small model (its real
vocabulary and tied head, fewer and narrower layers: `qwen2.5-0.5b-tiny`).

    python bench/plan_vs_measured.py [--response-tokens 512] [--out runs/plan_vs_measured]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT), str(ROOT / "bench")] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

from trainer_fixture import build_model_folder, write_samples  # noqa: E402


def run(model: Path, trainset: Path, out: Path, nproc: int, micro: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "pruner" / "train.py"), "--model", str(model), "--data", str(trainset), "--out", str(out),
           "--global-batch-size", str(2 * micro * nproc), "--micro-batch-size", str(micro), "--max-steps", "2",
           "--ckpt-every", "100", "--no-export", "--lr", "1e-6"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'kernels'}"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    if proc.returncode:
        sys.exit(f"{cmd}\n{proc.stderr[-3000:]}")
    plan = json.loads((out / "memory_plan.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    peak = max(r["peak_memory_gib"] for r in rows) * 2**30
    measured = peak - (plan["rss_before_model_bytes"] if plan["device"] != "cuda" else 0)
    total = plan["per_rank"]["total"]
    return {"processes": nproc, "tokens_per_micro_batch": plan["micro_batch_tokens"], "plan_bytes": total,
            "measured_bytes": measured, "error": total / measured - 1, "per_rank": plan["per_rank"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--response-tokens", type=int, default=512)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "runs" / "plan_vs_measured"))
    args = ap.parse_args()
    from pruner import default_model_path
    from pruner.dataset import build_trainset

    out = Path(args.out)
    models = {"embedded default": default_model_path(),
              "qwen2.5-0.5b-tiny": build_model_folder("qwen2.5-0.5b-tiny", out / "qwen05_tiny", "cpu")}
    results = []
    for name, model in models.items():
        tag = name.replace(" ", "_")
        samples = write_samples(out / tag / "samples.jsonl", model, problems=4, k=4, response_tokens=args.response_tokens)
        trainset = build_trainset(samples, out / tag / "trainset", lam=2.0, tokenizer=str(model), report=False)
        for nproc in (1, 2):
            r = {"model": name, **run(model, trainset, out / tag / f"run{nproc}", nproc, args.micro_batch_size)}
            results.append(r)
            print(f"{name}, {nproc} process(es), {r['tokens_per_micro_batch']} tokens/micro-batch: plan "
                  f"{r['plan_bytes'] / 2**20:.0f} MiB, measured {r['measured_bytes'] / 2**20:.0f} MiB, "
                  f"error {r['error']:+.0%}", flush=True)
    (out / "plan_vs_measured.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
