"""The on-policy round driver: `python -m pruner.rounds [driver flags] -- [trainer flags, with --rounds R]`.

On GPUs a round cannot be sampled from inside the trainer: rank 0's vLLM would share its GPU with the FSDP
shards, AdamW state and the allocator's cache while every other rank waits in a collective past its timeout.
This driver runs outside torchrun and alternates, for r = 1 .. R-1:

  1. `torchrun ... -m pruner.train <flags> --until-round r [--resume]`: trains up to the start of round r,
     saves a checkpoint there, exports the policy to `<out>/round-r/model` and exits (every GPU is free);
  2. on node 0, round r's pre-sampling (`pruner.presample` over the node's GPUs: --tensor-parallel-size x
     --data-parallel-size) and training set (`pruner.dataset`), each in a fresh process without torchrun's
     variables, and `round.json` last (pruner/onpolicy.py); the other nodes wait for that round.json;

then the last launch (`--until-round R`) resumes and trains to the end and exports. Every launch after the
first resumes from the checkpoint the previous one left at the round boundary, so the run is the one that
`--rounds R` gives in a single process on the CPU, where the driver works the same way (gloo, vLLM on CPU).
Run the same command on every node (`--nnodes`, `--node-rank`, `--rdzv-endpoint`); `<out>` must be on a
filesystem every node sees, as it already must for the rounds' training sets.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

if __package__ in (None, ""):  # `python pruner/rounds.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pruner.cli import parse_config, run_stage
from pruner.configs import TrainConfig
from pruner.onpolicy import clean_env, expected_record, is_built, round_dir, sample_round


@dataclass
class RoundsConfig:
    """On-policy rounds on GPUs: torchrun trains each round, this driver samples between them."""

    nproc_per_node: int = field(default=1, metadata={"help": "training processes per node (GPUs per node)"})
    nnodes: int = field(default=1, metadata={"help": "nodes; run this same command on each"})
    node_rank: int = field(default=0, metadata={"help": "this node's index; node 0 samples every round"})
    rdzv_endpoint: str = field(default="", metadata={"help": "host:port of torchrun's rendezvous (needed with --nnodes > 1)"})
    tensor_parallel_size: int = field(default=1, metadata={"help": "round pre-sampling: GPUs per vLLM replica"})
    data_parallel_size: int = field(default=0, metadata={"help": "round pre-sampling: vLLM replicas (0 = the node's GPUs / --tensor-parallel-size; 1 on a CPU)"})
    wait_timeout: float = field(default=6 * 3600.0, metadata={"help": "seconds a node other than 0 waits for a round's samples"})
    train_args: list[str] = field(default_factory=list, metadata={"positional": True, "help": "after `--`: the flags of pruner/train.py, with --rounds R (R >= 2)"})

    def validate(self) -> None:
        if min(self.nproc_per_node, self.nnodes, self.tensor_parallel_size) < 1 or self.data_parallel_size < 0:
            raise ValueError("--nproc-per-node, --nnodes and --tensor-parallel-size must be >= 1, "
                             "--data-parallel-size >= 0")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank {self.node_rank} is not one of the {self.nnodes} nodes")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")


def launcher(cfg: RoundsConfig) -> list[str]:
    """torchrun as `python -m torch.distributed.run`, standalone on one node, by rendezvous on several."""
    base = ["-m", "torch.distributed.run", f"--nproc_per_node={cfg.nproc_per_node}"]
    if cfg.nnodes == 1:
        return base + ["--standalone"]
    return base + [f"--nnodes={cfg.nnodes}", f"--node_rank={cfg.node_rank}", "--rdzv_backend=c10d",
                   f"--rdzv_endpoint={cfg.rdzv_endpoint}"]


def sampling_options(cfg: RoundsConfig, gpus: int) -> dict:
    """How round pre-sampling spreads over the node: every GPU the trainer used, freed by now."""
    replicas = cfg.data_parallel_size or max(1, gpus // cfg.tensor_parallel_size)
    return {"tensor_parallel_size": cfg.tensor_parallel_size if gpus else 1, "data_parallel_size": replicas if gpus else 1}


def wait_for_round(train: TrainConfig, round_index: int, timeout: float, poll: float = 10.0) -> None:
    """A node other than 0: until node 0 has written the round (round.json matching this run's configs)."""
    folder = round_dir(Path(train.out), round_index)
    expected = expected_record(Path(train.data), Path(train.out), round_index, train.round_samples)
    deadline = time.monotonic() + timeout
    while not is_built(folder, expected):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{folder}: node 0 did not finish round {round_index} within {timeout:.0f} s")
        time.sleep(poll)


def drive(cfg: RoundsConfig, train: TrainConfig, env: dict[str, str] | None = None) -> None:
    """Train, hand over, sample, resume, round after round (module docstring)."""
    env = clean_env(env)  # the driver may itself run under a scheduler's torchrun-like variables
    gpus = cfg.nproc_per_node if train.device != "cpu" and _has_cuda() else 0
    for r in range(1, train.rounds + 1):
        leg = replace(train, until_round=r, resume=train.resume or r > 1)
        run_stage("pruner.train", leg, launcher=launcher(cfg), env=env)
        if r == train.rounds:
            break
        if not (round_dir(Path(train.out), r) / "model" / "config.json").exists():
            print(f"the run ended before round {r} (--max-steps or --stop-after): no more rounds", flush=True)
            return
        if cfg.node_rank == 0:
            built = is_built(round_dir(Path(train.out), r),
                             expected_record(Path(train.data), Path(train.out), r, train.round_samples))
            if not built:
                sample_round(Path(train.data), Path(train.out), r, train.round_samples,
                             run_options=sampling_options(cfg, gpus), env=env)
        else:
            wait_for_round(train, r, cfg.wait_timeout)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(RoundsConfig, argv, prog="python -m pruner.rounds")
    cfg.validate()
    train = parse_config(TrainConfig, cfg.train_args, prog="python -m pruner.rounds ... --")
    train.validate()
    if train.rounds < 2:
        raise SystemExit("python -m pruner.rounds: give the trainer --rounds R with R >= 2 after `--` "
                         "(one round needs no driver)")
    if train.until_round:
        raise SystemExit("python -m pruner.rounds: --until-round is the driver's to set, not a trainer flag here")
    drive(cfg, train, dict(os.environ))


if __name__ == "__main__":
    main()
