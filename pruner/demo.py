"""`make demo`: the whole method end to end on the embedded default, on a laptop CPU.

pre-sampling (vLLM) -> training set (length-harmonizing reward) -> `torchrun` training (FSDP2)
-> `bench/speed.py` (base vs pruned, same prompts; the embedded test split plus real math sets, on
which the embedded model is out of its depth) -> the before/after table.

Each stage is built as its own configuration (`pruner.configs`) and run
in a fresh process by `pruner.cli.run_stage`, which prints the command first: the same command a
user runs by hand. Each stage resumes or reuses its output, so an interrupted demo continues where
it stopped; a stage whose folder holds another configuration's output refuses (run manifests), and
the benchmark, a new measurement each time, replaces its folder (`--overwrite`). At the end it
prints each stage's wall time and writes them to <run>/demo_timing.json.

The demo runs from a checkout: the benchmark is a script of `bench/`, which is not installed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pruner.cli import parse_config, run_stage
from pruner.configs import DatasetConfig, PresampleConfig, SpeedConfig, TrainConfig

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class DemoConfig:
    """`make demo`: pre-sample, build the training set, train with torchrun, benchmark base vs pruned."""

    run: str = field(default="runs/demo", metadata={"help": "folder for every stage's output"})
    k: int = field(default=8, metadata={"help": "samples per training problem"})
    # 600 problems (150 steps of 32) at twice the trainer's embedded learning rate reach what 1,200 problems
    # (300 steps) at 2e-5 did -- sampled: token ratio 0.518 vs 0.515, waste removed 0.972 vs 0.979, accuracy
    # 0.990 vs 0.998 against the base's 0.959; greedy identical -- in 4.0 instead of 8.1 minutes (issue 16).
    train_problems: int = field(default=600, metadata={"help": "training problems to pre-sample (of 1,200)"})
    lr: float = field(default=4e-5, metadata={"help": "the trainer's peak learning rate for this run"})
    test_problems: int = field(default=400, metadata={"help": "test problems of the embedded set in the benchmark"})
    # The embedded model only knows its arithmetic chains: on real sets it is out of its depth (accuracy near 0), so
    # their rows show how pruning behaves off its training distribution (length, truncation), not what it keeps.
    real_sets: list[str] = field(default_factory=lambda: ["math500", "gsm8k"], metadata={"help": "real math sets benchmarked beside the embedded test split (bench/speed.py --data names; ../shared/data); skipped with a note when their files are missing; none: --real-sets with no value"})
    real_problems: int = field(default=100, metadata={"help": "problems of each real set in the benchmark"})
    # One process with every core beats two with one each on this 0.5M-parameter model: the
    # collectives cost more than the halved work saves (2 processes: 0.85-0.91x the tokens/s on
    # 2 quiet cores, issue 16; 0.8-1.0x on a loaded machine). tests/test_demo.py runs 2.
    nproc: int = field(default=1, metadata={"help": "torchrun processes (each gets cores/nproc threads)"})
    ckpt_every: int = field(default=100, metadata={"help": "training steps between resumable checkpoints"})
    lam: float = field(default=2.0, metadata={"help": "the accuracy weight of the reward (the paper's lambda)"})
    micro_batch_tokens: int = field(default=0, metadata={"help": "train on packed rows of at most N tokens (the trainer's --micro-batch-tokens); 0 = its padded micro-batches, faster on the demo's short sequences (docs/trainer.md#packing)"})


@dataclass(frozen=True)
class Stage:
    """One stage of the demo: its name in the timing table, the module it runs, its configuration."""

    name: str
    module: str
    config: Any
    launcher: tuple[str, ...] = ()


def stages(cfg: DemoConfig) -> list[Stage]:
    """The demo's four stages, each a configuration of the stage it runs."""
    run = Path(cfg.run)
    # 128 problems x K = 1,024 sequences per vLLM call fill open_llm's CPU max_num_seqs; 64 left half of
    # it idle and drained the batch twice as often (1.32x samples/s measured, issue 16 notes).
    presample = PresampleConfig(out=str(run / "samples.jsonl"), k=cfg.k, limit=cfg.train_problems, chunk_problems=128)
    trainset = DatasetConfig(samples=presample.out, out=str(run / "trainset"), lam=cfg.lam)
    train = TrainConfig(data=trainset.out, out=str(run / "train"), resume=True, ckpt_every=cfg.ckpt_every, lr=cfg.lr,
                        micro_batch_tokens=cfg.micro_batch_tokens)
    bench = SpeedConfig(models=["base=embedded", f"pruned={Path(train.out) / 'export'}"],
                        data=["embedded:test", *cfg.real_sets], limit=cfg.test_problems,
                        set_limit=[f"{name}={cfg.real_problems}" for name in cfg.real_sets],
                        out=str(run / "bench"), overwrite=True)
    torchrun = ("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.nproc}")
    return [Stage("pre-sampling", "pruner.presample", presample), Stage("training set", "pruner.dataset", trainset),
            Stage("training (torchrun)", "pruner.train", train, torchrun),
            Stage("benchmark (bench/speed.py)", "bench.speed", bench)]


def available_real_sets(cfg: DemoConfig) -> DemoConfig:
    """`cfg` with the real sets whose files are here (a clone without ../shared/data has none), each
    missing one named on the console; an unknown name is an error before any stage starts."""
    if str(ROOT) not in sys.path:  # the demo runs from a checkout; bench/ is not installed
        sys.path.insert(0, str(ROOT))
    from bench.speed_sets import KNOWN_SETS, resolve_set

    if cfg.real_problems < 1:
        raise SystemExit(f"python -m pruner.demo: error: --real-problems must be >= 1, got {cfg.real_problems}")
    unknown = [name for name in cfg.real_sets if name not in KNOWN_SETS]
    if unknown:
        raise SystemExit(f"python -m pruner.demo: error: --real-sets {unknown} are not known sets "
                         f"({', '.join(KNOWN_SETS)})")
    present = []
    for name in cfg.real_sets:
        try:
            resolve_set(name)
            present.append(name)
        except FileNotFoundError as exc:
            print(f"demo: benchmarking without {name}: {exc}", flush=True)
    return dataclasses.replace(cfg, real_sets=present)


def stage_env(nproc: int) -> dict[str, str]:
    """The stages' environment: this checkout's modules, and the cores shared by the processes.

    PYTHONSAFEPATH keeps the working folder off sys.path, so a stage imports nothing by accident
    from where it was started (PYTHONPATH gives it the repository root).
    OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning. With the vLLM engine
    in-process and 2 threads on 2 cores, any other busy process made the spinning threads wait on
    a descheduled partner: pre-sampling fell to ~7 samples/s (vs ~60 passive) on a loaded machine.
    """
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // nproc))
    path = os.pathsep.join([str(ROOT), str(ROOT / "kernels")])  # kernels/: this checkout's o1pruner_kernels
    return {**os.environ, "PYTHONPATH": path, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": threads,
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY") or "PASSIVE"}


def run_timed(stage: Stage, env: dict[str, str]) -> dict:
    """Run one stage in a fresh process; its {"stage", "wall_s", "command"} for the timing table."""
    start = time.perf_counter()
    command = run_stage(stage.module, stage.config, launcher=stage.launcher, env=env, cwd=ROOT)
    return {"stage": stage.name, "wall_s": round(time.perf_counter() - start, 2), "command": command}


def timing_table(stages: list[dict], total_s: float) -> str:
    """The per-stage wall times ({"stage", "wall_s"} each) as a Markdown table."""
    rows = ["| stage | wall s | share |", "|---|---:|---:|"]
    rows += [f"| {s['stage']} | {s['wall_s']:.1f} | {s['wall_s'] / total_s:.0%} |" for s in stages]
    rows.append(f"| total | {total_s:.1f} ({total_s / 60:.1f} min) | |")
    return "\n".join(rows)


def write_timing(cfg: DemoConfig, timings: list[dict], env: dict[str, str], total_s: float) -> Path:
    path = Path(cfg.run) / "demo_timing.json"
    record = {"total_s": round(total_s, 2), "cpus": os.cpu_count(), "nproc": cfg.nproc,
              "omp_num_threads": env["OMP_NUM_THREADS"], "omp_wait_policy": env["OMP_WAIT_POLICY"],
              "ckpt_every": cfg.ckpt_every, "config": asdict(cfg), "stages": timings,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> None:
    cfg = available_real_sets(parse_config(DemoConfig, argv, prog="python -m pruner.demo"))
    env = stage_env(cfg.nproc)
    start = time.perf_counter()
    timings = [run_timed(stage, env) for stage in stages(cfg)]
    total = time.perf_counter() - start
    path = write_timing(cfg, timings, env, total)
    print(f"\n{timing_table(timings, total)}\n\nstage times in {path}")
    print(f"\ndemo finished in {total / 60:.1f} min; results in {Path(cfg.run) / 'bench'}")


if __name__ == "__main__":
    main()
