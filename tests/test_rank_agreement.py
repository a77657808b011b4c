"""Ranks never decide differently from what each sees on disk, and never raise alone (issue 21, finding 4).

A real 2-process gloo group, each process with its own folders to stand in for a cluster without a
shared filesystem (or with NFS lag): only one rank sees the old-log-prob cache, only one rank sees
a checkpoint, the newest checkpoint is damaged on one rank only, only one rank gets NaN log-probs.
Every scenario must end with the same decision or the same clear error on both ranks; a hang fails
the test at its timeout instead of waiting out the 30-minute collective timeout.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

WORKER = r'''
import json, sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from pruner import distributed
from pruner.checkpoint import resume_checkpoint
from pruner.model_files import model_fingerprint
from pruner.old_logps import cache_path, compute_response_logprobs, content_key, old_logprobs
from test_run_folder_safety import ToyPolicy, toy_data

base = Path(sys.argv[1])
d = distributed.init("cpu")
mine = base / f"rank{d.rank}"          # what this rank sees; the other rank's folder is invisible to it
outcomes = {}


def attempt(name, fn):
    try:
        outcomes[name] = {"result": fn()}
    except Exception as exc:
        outcomes[name] = {"error": type(exc).__name__, "message": str(exc)}


def cache_case(seen_by):
    data, trainset = toy_data(), mine / f"set-{seen_by}"
    trainset.mkdir(parents=True)
    if d.rank == seen_by:  # this rank alone finds a cache: a table of -7s, unlike anything computed
        keys = {"model_key": model_fingerprint("toy"), "data_key": content_key(data)}
        save_file({"logps": torch.full((int(data["response_offsets"][-1]),), -7.0)},
                  str(cache_path(trainset, keys["model_key"], 1.0, keys["data_key"])), metadata=keys)
    flat, _, hit = old_logprobs(ToyPolicy(), data, trainset, "toy", d, temperature=1.0, micro_batch=2, pad_id=0)
    return {"hit": hit, "sum": round(float(flat.sum()), 4)}


def nan_case():
    flat = compute_response_logprobs(ToyPolicy(nan=d.rank == 1), toy_data(), d, micro_batch=2, pad_id=0,
                                     show_progress=False)
    return round(float(flat.sum()), 4)


def checkpoint_case(name):
    chosen = resume_checkpoint(mine / name / "checkpoints", d)
    return None if chosen is None else chosen.name


attempt("cache_seen_by_rank1_only", lambda: cache_case(1))
attempt("cache_seen_by_rank0_only", lambda: cache_case(0))
attempt("nan_on_rank1_only", nan_case)
for case in ("ckpt_seen_by_rank1_only", "ckpt_seen_by_rank0_only", "newest_ckpt_damaged_on_rank1_only"):
    attempt(case, lambda: checkpoint_case(case))
attempt("after", lambda: float(distributed.all_reduce_sum(torch.ones(1)).item()))  # the group still works
(base / f"outcome{d.rank}.json").write_text(json.dumps(outcomes))
distributed.shutdown()
'''


def _two_process_checkpoints(base: Path) -> None:
    """Checkpoints as a 2-process run leaves them (one trainer state per rank), placed per rank folder."""
    from pruner import distributed
    from pruner.checkpoint import save_checkpoint

    d = distributed.init("cpu")
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    made = base / "made" / "checkpoints"
    for step in (2, 4):
        ckpt = save_checkpoint(made, step, model, optimizer, scheduler, {}, d)
        shutil.copy(ckpt / "trainer-rank0.json", ckpt / "trainer-rank1.json")
    layout = {"ckpt_seen_by_rank1_only": {1: [2]}, "ckpt_seen_by_rank0_only": {0: [2]},
              "newest_ckpt_damaged_on_rank1_only": {0: [2, 4], 1: [2, 4]}}
    for case, ranks in layout.items():
        for rank, steps in ranks.items():
            for step in steps:
                shutil.copytree(made / f"step-{step:07d}", base / f"rank{rank}" / case / "checkpoints" / f"step-{step:07d}")
    torn = base / "rank1" / "newest_ckpt_damaged_on_rank1_only" / "checkpoints" / "step-0000004" / "trainer-rank1.json"
    torn.write_bytes(torn.read_bytes()[:30])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> list[dict]:
    base = tmp_path_factory.mktemp("ranks")
    _two_process_checkpoints(base)
    script = base / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(base)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(2)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=300)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail("the ranks hung (no result within 300 s)")
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    return [json.loads((base / f"outcome{r}.json").read_text()) for r in range(2)]


pytestmark = pytest.mark.slow


def test_a_cache_only_rank_1_sees_is_ignored_by_both(outcomes):
    a, b = (o["cache_seen_by_rank1_only"] for o in outcomes)
    assert a == b and a["result"]["hit"] is False  # rank 0 decided: computed on both, the same table


def test_a_cache_only_rank_0_sees_is_used_by_both(outcomes):
    a, b = (o["cache_seen_by_rank0_only"] for o in outcomes)
    assert a == b and a["result"]["hit"] is True and a["result"]["sum"] < 0
    n = a["result"]["sum"] / -7.0
    assert abs(n - round(n)) < 1e-6  # rank 0's table (all -7) reached rank 1


def test_nan_on_one_rank_raises_the_same_error_on_both(outcomes):
    a, b = (o["nan_on_rank1_only"] for o in outcomes)
    assert a == b and a["error"] == "FloatingPointError" and a["message"].startswith("rank 1: old log-probs:")


def test_a_checkpoint_only_rank_1_sees_starts_both_from_step_0(outcomes):
    a, b = (o["ckpt_seen_by_rank1_only"] for o in outcomes)
    assert a == b == {"result": None}


def test_a_checkpoint_only_rank_0_sees_stops_both_with_the_same_error(outcomes):
    a, b = (o["ckpt_seen_by_rank0_only"] for o in outcomes)
    assert a == b and a["error"] == "DamagedFileError"
    assert "rank 1:" in a["message"] and "every process sees" in a["message"]


def test_a_checkpoint_damaged_on_one_rank_falls_back_on_both(outcomes):
    a, b = (o["newest_ckpt_damaged_on_rank1_only"] for o in outcomes)
    assert a == b == {"result": "step-0000002"}


def test_the_group_still_works_after_every_scenario(outcomes):
    assert [o["after"] for o in outcomes] == [{"result": 2.0}] * 2
