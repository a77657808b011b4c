"""pruner.demo: the stages' environment, the per-stage timing, and a tiny run with 2 training processes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_demo_stage_env_and_timing_table(monkeypatch):
    from pruner import demo

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 8)
    assert demo._stage_env(1)["OMP_NUM_THREADS"] == "8" and demo._stage_env(3)["OMP_NUM_THREADS"] == "2"
    assert demo._stage_env(2)["PYTHONSAFEPATH"] == "1" and demo._stage_env(2)["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert demo._stage_env(2)["OMP_NUM_THREADS"] == "5"  # the user's choice wins
    table = demo.timing_table([{"stage": "pre-sampling", "wall_s": 30.0}, {"stage": "training (torchrun)", "wall_s": 90.0}],
                              120.0)
    assert "| pre-sampling | 30.0 | 25% |" in table and "| total | 120.0 (2.0 min) | |" in table
    assert demo._stage_name(["py", "-m", "torch.distributed.run", "pruner/train.py"]) == "training (torchrun)"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tiny_demo_with_two_training_processes_writes_its_stage_times(tmp_path):
    # The whole chain on a few problems, training with 2 processes (the demo's default is 1).
    pytest.importorskip("vllm")
    run = tmp_path / "demo"
    out = subprocess.run([sys.executable, "-m", "pruner.demo", "--run", str(run), "--train-problems", "8",
                          "--test-problems", "4", "--nproc", "2", "--ckpt-every", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=850)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    timing = json.loads((run / "demo_timing.json").read_text())
    assert [s["stage"] for s in timing["stages"]] == ["pre-sampling", "training set", "training (torchrun)",
                                                      "benchmark (bench/speed.py)"]
    assert timing["nproc"] == 2 and abs(sum(s["wall_s"] for s in timing["stages"]) - timing["total_s"]) < 5
    assert "| total |" in out.stdout and (run / "bench" / "results.json").is_file()
    assert list((run / "train" / "checkpoints").iterdir())
