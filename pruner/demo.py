"""`make demo`: the whole method end to end on the embedded default, on a laptop CPU.

pre-sampling (vLLM) -> training set (length-harmonizing reward) -> `torchrun` training (FSDP2)
-> `bench/speed.py` (base vs pruned, same prompts) -> the before/after table.

Each stage is the same command a user runs by hand (printed before it runs), and each resumes or
reuses its output, so an interrupted demo continues where it stopped; a stage whose folder holds
another configuration's output refuses (run manifests), and the benchmark, a new measurement each
time, replaces its folder (`--overwrite`).
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], env: dict) -> None:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/demo", help="folder for every stage's output")
    p.add_argument("--k", type=int, default=8, help="samples per training problem")
    p.add_argument("--train-problems", type=int, default=1200, help="training problems to pre-sample")
    p.add_argument("--test-problems", type=int, default=400, help="test problems in the benchmark")
    p.add_argument("--nproc", type=int, default=2, help="torchrun processes")
    p.add_argument("--lam", type=float, default=2.0, help="the accuracy weight of the reward (the paper's lambda)")
    args = p.parse_args(argv)
    run = Path(args.run)
    py = sys.executable
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.perf_counter()
    _run([py, "pruner/presample.py", "--out", str(run / "samples.jsonl"), "--k", str(args.k),
          "--limit", str(args.train_problems)], env)
    _run([py, "pruner/dataset.py", "--samples", str(run / "samples.jsonl"), "--out", str(run / "trainset"),
          "--lam", str(args.lam)], env)
    _run([py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", "pruner/train.py",
          "--data", str(run / "trainset"), "--out", str(run / "train"), "--resume"], env)
    _run([py, "bench/speed.py", "--models", "base=embedded", f"pruned={run / 'train' / 'export'}",
          "--limit", str(args.test_problems), "--out", str(run / "bench"), "--overwrite"], env)
    print(f"\ndemo finished in {(time.perf_counter() - start) / 60:.1f} min; results in {run / 'bench'}")


if __name__ == "__main__":
    main()
