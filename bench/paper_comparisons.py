"""The paper's comparisons on the embedded default, in one table through bench/speed.py.

    python bench/paper_comparisons.py --run runs/paper

Models: the base; the base with the paper's fast-solving prompt; SFT on the shortest correct sample
per problem; DPO (shortest correct chosen, longest rejected); O1-Pruner at lambda = 0, 1, 2, 5 (the
ablation; lambda = 2 is the method's main row). Every fine-tune is the same trainer
(`pruner/train.py`) with another loss (`--loss sft|dpo|lh`) on a set from `pruner/dataset.py --kind`.

The training pool is pre-sampled first (resumed if present) at temperature 1.0, top-p 1.0: at the
paper's 0.5 / 0.8 the embedded default answers every training problem right in all K samples, the
accuracy term of the reward is then zero everywhere, and lambda could not matter.

Every stage is a configuration (`pruner.configs`) run in a fresh process
by `pruner.cli.run_stage`, which prints its command first.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `python bench/<this>.py` from a checkout: `bench.*` and `pruner`

from pruner.cli import parse_config, run_stage  # noqa: E402
from pruner.configs import DatasetConfig, PresampleConfig, SpeedConfig, TrainConfig  # noqa: E402


@dataclass
class PaperConfig:
    """The paper's comparisons (baselines and the lambda ablation) on the embedded default."""

    samples: str = field(default="", metadata={"help": "pre-sampled responses of the base model (default <run>/samples.jsonl, sampled first if missing)"})
    k: int = field(default=8, metadata={"help": "samples per training problem when pre-sampling"})
    train_problems: int = field(default=1200, metadata={"help": "training problems to pre-sample"})
    temperature: float = field(default=1.0, metadata={"help": "pre-sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "pre-sampling top-p"})
    run: str = field(default="runs/paper", metadata={"help": "output folder"})
    lams: list[float] = field(default_factory=lambda: [0.0, 1.0, 2.0, 5.0], metadata={"help": "the O1-Pruner rows: one training set and fine-tune per accuracy weight lambda"})
    nproc: int = field(default=2, metadata={"help": "torchrun processes per fine-tune"})
    test_problems: int = field(default=400, metadata={"help": "test problems in the benchmark"})
    modes: list[Literal["greedy", "sampled"]] = field(default_factory=lambda: ["greedy", "sampled"], metadata={"help": "the benchmark's decoding modes"})
    train_args: str = field(default="", metadata={"help": "extra pruner/train.py flags for every fine-tune, e.g. '--lr 1e-5 --max-steps 100'"})


def fine_tunes(cfg: PaperConfig, samples: str) -> dict[str, tuple[DatasetConfig, TrainConfig]]:
    """Each fine-tuned row's training set and training run, by the row's name."""
    run = Path(cfg.run)
    # --train-args are trainer flags: parsed once, so a wrong one fails before any stage runs
    base = parse_config(TrainConfig, shlex.split(cfg.train_args), prog="--train-args")
    kinds = {f"o1-pruner-lam{lam:g}": DatasetConfig(kind="lh", lam=lam) for lam in cfg.lams}
    kinds.update({"sft-shortest": DatasetConfig(kind="sft"), "dpo": DatasetConfig(kind="dpo")})
    return {name: (dataclasses.replace(data, samples=samples, out=str(run / f"set-{name}")),
                   dataclasses.replace(base, data=str(run / f"set-{name}"), out=str(run / f"train-{name}"),
                                       resume=True))
            for name, data in kinds.items()}


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(PaperConfig, argv, prog="bench/paper_comparisons.py")
    run = Path(cfg.run)
    rows = fine_tunes(cfg, cfg.samples or str(run / "samples.jsonl"))
    stage = dict(cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if not cfg.samples:  # resumes to nothing when complete
        run_stage("pruner.presample", PresampleConfig(out=str(run / "samples.jsonl"), k=cfg.k, limit=cfg.train_problems,
                                                      temperature=cfg.temperature, top_p=cfg.top_p), **stage)
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.nproc}"]
    models = ["base=embedded", "fast-prompt=embedded"]
    for name, (data, train) in rows.items():
        if not (Path(data.out) / "meta.json").exists():
            run_stage("pruner.dataset", data, **stage)
        if not (Path(train.out) / "export" / "config.json").exists():
            run_stage("pruner.train", train, launcher=torchrun, **stage)
        models.append(f"{name}={Path(train.out) / 'export'}")
    run_stage("bench.speed", SpeedConfig(models=models, fast_prompt=["fast-prompt"], limit=cfg.test_problems,
                                         modes=cfg.modes, out=str(run / "bench"), overwrite=True), **stage)


if __name__ == "__main__":
    main()
