"""`make demo`: the whole method end to end on the embedded default, on a laptop CPU.

pre-sampling (vLLM) -> training set (length-harmonizing reward) -> `torchrun` training (FSDP2)
-> `bench/speed.py` (base vs pruned, same prompts) -> the before/after table.

Each stage is the same command a user runs by hand (printed before it runs), and each resumes or
reuses its output, so an interrupted demo continues where it stopped; a stage whose folder holds
another configuration's output refuses (run manifests), and the benchmark, a new measurement each
time, replaces its folder (`--overwrite`). At the end it prints each stage's wall time and writes
them to <run>/demo_timing.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The stage each script is, for the timing table.
_STAGE_NAMES = {"pruner/presample.py": "pre-sampling", "pruner/dataset.py": "training set",
                "pruner/train.py": "training (torchrun)", "bench/speed.py": "benchmark (bench/speed.py)"}
# {"stage", "wall_s", "command"} of every stage run by this process's last `main`: `_run`
# records them so that the stage calls in `main` stay plain commands.
_TIMINGS: list[dict] = []


def _stage_name(cmd: list[str]) -> str:
    return next((name for script, name in _STAGE_NAMES.items() if script in cmd), cmd[1])


def _run(cmd: list[str], env: dict) -> None:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    _TIMINGS.append({"stage": _stage_name(cmd), "wall_s": round(time.perf_counter() - start, 2),
                     "command": shlex.join(cmd)})


def _stage_env(nproc: int) -> dict:
    """The stages' environment: this checkout's modules, and the cores shared by the processes.

    PYTHONSAFEPATH keeps a script's own folder off sys.path, so `python bench/speed.py` imports
    nothing by accident from bench/ (PYTHONPATH gives it the repository root).
    OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning. With the vLLM engine
    in-process and 2 threads on 2 cores, any other busy process made the spinning threads wait on
    a descheduled partner: pre-sampling fell to ~7 samples/s (vs ~60 passive) on a loaded machine.
    """
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": threads,
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY") or "PASSIVE"}


def timing_table(stages: list[dict], total_s: float) -> str:
    """The per-stage wall times ({"stage", "wall_s"} each) as a Markdown table."""
    rows = ["| stage | wall s | share |", "|---|---:|---:|"]
    rows += [f"| {s['stage']} | {s['wall_s']:.1f} | {s['wall_s'] / total_s:.0%} |" for s in stages]
    rows.append(f"| total | {total_s:.1f} ({total_s / 60:.1f} min) | |")
    return "\n".join(rows)


def _write_timing(run: Path, args: argparse.Namespace, env: dict, total_s: float) -> Path:
    path = run / "demo_timing.json"
    record = {"total_s": round(total_s, 2), "cpus": os.cpu_count(), "nproc": args.nproc,
              "omp_num_threads": env["OMP_NUM_THREADS"], "omp_wait_policy": env["OMP_WAIT_POLICY"],
              "ckpt_every": args.ckpt_every,
              "stages": _TIMINGS,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/demo", help="folder for every stage's output")
    p.add_argument("--k", type=int, default=8, help="samples per training problem")
    # 600 problems (150 steps of 32) at twice the trainer's embedded learning rate reach what 1,200 problems
    # (300 steps) at 2e-5 did -- sampled: token ratio 0.518 vs 0.515, waste removed 0.972 vs 0.979, accuracy
    # 0.990 vs 0.998 against the base's 0.959; greedy identical -- in 4.0 instead of 8.1 minutes (issue 16).
    p.add_argument("--train-problems", type=int, default=600, help="training problems to pre-sample (of 1,200)")
    p.add_argument("--lr", type=float, default=4e-5, help="the trainer's peak learning rate for this run")
    p.add_argument("--test-problems", type=int, default=400, help="test problems in the benchmark")
    # One process with every core beats two with one each on this 0.5M-parameter model: the
    # collectives cost more than the halved work saves (2 processes: 0.85-0.91x the tokens/s on
    # 2 quiet cores, issue 16; 0.8-1.0x on a loaded machine). tests/test_demo.py runs 2.
    p.add_argument("--nproc", type=int, default=1, help="torchrun processes (each gets cores/nproc threads)")
    p.add_argument("--ckpt-every", type=int, default=100, help="training steps between resumable checkpoints")
    p.add_argument("--lam", type=float, default=2.0, help="the accuracy weight of the reward (the paper's lambda)")
    args = p.parse_args(argv)
    run = Path(args.run)
    py = sys.executable
    env = _stage_env(args.nproc)
    _TIMINGS.clear()
    start = time.perf_counter()
    # 128 problems x K = 1,024 sequences per vLLM call fill open_llm's CPU max_num_seqs; 64 left half of
    # it idle and drained the batch twice as often (1.32x samples/s measured, issue 16 notes).
    _run([py, "pruner/presample.py", "--out", str(run / "samples.jsonl"), "--k", str(args.k),
          "--limit", str(args.train_problems), "--chunk-problems", "128"], env)
    _run([py, "pruner/dataset.py", "--samples", str(run / "samples.jsonl"), "--out", str(run / "trainset"),
          "--lam", str(args.lam)], env)
    _run([py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", "pruner/train.py",
          "--data", str(run / "trainset"), "--out", str(run / "train"), "--resume",
          "--ckpt-every", str(args.ckpt_every), "--lr", str(args.lr)], env)
    _run([py, "bench/speed.py", "--models", "base=embedded", f"pruned={run / 'train' / 'export'}",
          "--limit", str(args.test_problems), "--out", str(run / "bench"), "--overwrite"], env)
    total = time.perf_counter() - start
    timing = _write_timing(run, args, env, total)
    print(f"\n{timing_table(_TIMINGS, total)}\n\nstage times in {timing}")
    print(f"\ndemo finished in {total / 60:.1f} min; results in {run / 'bench'}")


if __name__ == "__main__":
    main()
