"""The memory planner against real trainer runs: plan total vs measured peak, 1 and 2 processes.

On a GPU the measured peak is torch.cuda.max_memory_allocated; on the CPU it is the peak RSS of
rank 0 minus its RSS just before the model was loaded (the libraries, tokenizer and data set are
not in the plan). Models: the embedded default and a Qwen2.5-0.5B-shaped small model (its real
vocabulary and tied head, fewer and narrower layers: `qwen2.5-0.5b-tiny`).

    python bench/plan_vs_measured.py [--response-tokens 512] [--out runs/plan_vs_measured]

Writes <out>/plan_vs_measured.json (one object per model and process count) and the runs it measured.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT), str(ROOT / "bench")] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

from pruner.cli import parse_config, run_stage  # noqa: E402
from pruner.configs import TrainConfig  # noqa: E402
from trainer_fixture import build_model_folder, write_samples  # noqa: E402


@dataclass
class PlanVsMeasuredConfig:
    """The memory planner's per-rank total against the measured peak of real 1- and 2-process trainer runs."""

    response_tokens: int = field(default=512, metadata={"help": "tokens per synthetic response"})
    micro_batch_size: int = field(default=2, metadata={"help": "sequences per forward/backward on one process"})
    out: str = field(default="runs/plan_vs_measured", metadata={"help": "folder for the runs and plan_vs_measured.json"})


def run(model: Path, trainset: Path, out: Path, nproc: int, micro: int) -> dict:
    cfg = TrainConfig(model=str(model), data=str(trainset), out=str(out), global_batch_size=2 * micro * nproc,
                      micro_batch_size=micro, max_steps=2, ckpt_every=100, export=False, lr=1e-6)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'kernels'}"}
    run_stage("pruner.train", cfg, launcher=["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"],
              env=env, cwd=ROOT)
    plan = json.loads((out / "memory_plan.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    peak = max(r["peak_memory_gib"] for r in rows) * 2**30
    measured = peak - (plan["rss_before_model_bytes"] if plan["device"] != "cuda" else 0)
    total = plan["per_rank"]["total"]
    return {"processes": nproc, "tokens_per_micro_batch": plan["micro_batch_tokens"], "plan_bytes": total,
            "measured_bytes": measured, "error": total / measured - 1, "per_rank": plan["per_rank"]}


def main(argv: list[str] | None = None) -> None:
    args = parse_config(PlanVsMeasuredConfig, argv, prog="bench/plan_vs_measured.py")
    if min(args.response_tokens, args.micro_batch_size) < 1:
        raise SystemExit("plan_vs_measured.py: --response-tokens and --micro-batch-size must be >= 1")
    from pruner.dataset import build_trainset
    from pruner.embedded import default_model_path

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
    print(f"wrote {out / 'plan_vs_measured.json'}")


if __name__ == "__main__":
    main()
