"""The on-policy round driver (`python -m pruner.rounds`, issue 21): sampling runs between torchrun launches in
a clean environment, never inside the training group; on the CPU it gives the run `--rounds` gives in-process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_children_get_an_environment_without_torchruns_variables():
    from pruner.onpolicy import clean_env

    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.1",
           "MASTER_PORT": "29500", "GROUP_RANK": "0", "TORCHELASTIC_RUN_ID": "x", "PATH": "/bin",
           "PYTHONPATH": "/repo", "CUDA_VISIBLE_DEVICES": "0,1", "NCCL_DEBUG": "INFO"}
    assert clean_env(env) == {"PATH": "/bin", "PYTHONPATH": "/repo", "CUDA_VISIBLE_DEVICES": "0,1",
                              "NCCL_DEBUG": "INFO"}


def test_driver_flags_launchers_and_checks():
    from pruner.cli import parse_config
    from pruner.rounds import RoundsConfig, launcher, main

    cfg = parse_config(RoundsConfig, ["--nproc-per-node", "8", "--", "--rounds", "3", "--lr", "1e-6"])
    assert (cfg.nproc_per_node, cfg.train_args) == (8, ["--rounds", "3", "--lr", "1e-6"])
    with pytest.raises(SystemExit):  # the trainer's flags go after `--`
        parse_config(RoundsConfig, ["--nproc-per-node", "8", "--rounds", "3"])
    with pytest.raises(SystemExit, match="--rounds R with R >= 2"):
        main(["--", "--rounds", "1"])
    assert "--standalone" in launcher(RoundsConfig(nproc_per_node=8))
    two = launcher(RoundsConfig(nproc_per_node=8, nnodes=2, node_rank=1, rdzv_endpoint="node0:29500"))
    assert {"--nnodes=2", "--node_rank=1", "--rdzv_endpoint=node0:29500"} <= set(two) and "--standalone" not in two
    for bad in (RoundsConfig(nnodes=2), RoundsConfig(nnodes=2, node_rank=2, rdzv_endpoint="h:1")):
        with pytest.raises(ValueError):
            bad.validate()


def test_the_trainer_never_samples_a_round_on_gpus():
    from pruner.configs import TrainConfig
    from pruner.distributed import Dist
    from pruner.train import check_round_placement

    gpu = Dist(rank=0, local_rank=0, world_size=8, device=torch.device("cuda", 0))
    with pytest.raises(ValueError, match="python -m pruner.rounds"):
        check_round_placement(TrainConfig(rounds=2), gpu)
    check_round_placement(TrainConfig(rounds=2, until_round=1), gpu)  # the driver's launch
    check_round_placement(TrainConfig(rounds=2), Dist(0, 0, 2, torch.device("cpu")))  # the CPU samples in-process
    with pytest.raises(ValueError, match="--until-round 3"):
        TrainConfig(rounds=2, until_round=3).validate()


def test_a_round_sampled_on_other_gpus_is_still_this_runs_round(tmp_path):
    from pruner.onpolicy import _comparable

    record = {"presample": {"model": "m", "k": 4, "tensor_parallel_size": 1, "data_parallel_size": 1,
                            "chunk_problems": 64}, "dataset": {"lam": 2.0}}
    sampled = json.loads(json.dumps(record))
    sampled["presample"].update(tensor_parallel_size=2, data_parallel_size=4, chunk_problems=128)
    assert _comparable(sampled) == _comparable(record)
    sampled["presample"]["k"] = 8  # what it samples: another round
    assert _comparable(sampled) != _comparable(record)


def _first_set(tiny_model_dir: Path, folder: Path) -> Path:
    from pruner.dataset import build_trainset

    problems = folder / "problems.jsonl"
    problems.write_text("".join(json.dumps({"id": f"q{i}", "problem": f"What is {i} + 1?", "answer": str(i + 1)})
                                + "\n" for i in range(4)))
    samples = folder / "samples.jsonl"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'kernels'}"}
    subprocess.run([sys.executable, "-m", "pruner.presample", "--model", str(tiny_model_dir), "--problems",
                    str(problems), "--out", str(samples), "--k", "3", "--max-new-tokens", "10"],
                   check=True, env=env, cwd=ROOT, capture_output=True, timeout=600)
    return build_trainset(samples, folder / "trainset", lam=2.0, tokenizer=str(tiny_model_dir))


@pytest.mark.slow
def test_the_driver_gives_the_in_process_rounds_run(tiny_model_dir, tmp_path):
    """Two rounds through the driver (torchrun, hand-over, vLLM between launches, resume) against the same two
    rounds sampled from inside one trainer process: the same round-1 set, the same losses, an export."""
    first = _first_set(tiny_model_dir, tmp_path)
    flags = ["--model", str(tiny_model_dir), "--data", str(first), "--global-batch-size", "4",
             "--micro-batch-size", "2", "--rounds", "2", "--lr", "1e-3", "--ckpt-every", "100", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'kernels'}", "OMP_NUM_THREADS": "1",
           # as if the driver itself ran under a launcher: none of it may reach the stages it starts
           "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    driven = subprocess.run([sys.executable, "-m", "pruner.rounds", "--nproc-per-node", "1", "--", *flags,
                             "--out", str(tmp_path / "driven")], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=1200)
    assert driven.returncode == 0, driven.stdout[-3000:] + driven.stderr[-5000:]
    assert "--until-round=1" in driven.stdout and "--until-round=2" in driven.stdout
    clean = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    inproc = subprocess.run([sys.executable, "-m", "pruner.train", *flags, "--out", str(tmp_path / "inproc")],
                            capture_output=True, text=True, env=clean, cwd=ROOT, timeout=1200)
    assert inproc.returncode == 0, inproc.stdout[-3000:] + inproc.stderr[-5000:]
    runs = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("driven", "inproc")}
    assert [r["round"] for r in runs["driven"]] == [r["round"] for r in runs["inproc"]] and runs["driven"][-1]["round"] == 1
    for a, b in zip(runs["driven"], runs["inproc"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6) and a["step"] == b["step"]
    from pruner.trainset import load_trainset

    sets = [load_trainset(tmp_path / name / "round-1" / "trainset") for name in ("driven", "inproc")]
    assert torch.equal(sets[0]["input_ids"], sets[1]["input_ids"])  # the same policy sampled the same round
    assert (tmp_path / "driven" / "export" / "config.json").exists()
    assert sorted(p.name for p in (tmp_path / "driven" / "checkpoints").iterdir())  # resumable at the end
