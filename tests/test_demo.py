"""pruner.demo: stages built as configurations, their environment, the timing table, and a tiny run."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pruner import demo
from pruner.cli import parse_config, to_argv

ROOT = Path(__file__).resolve().parent.parent


def test_demo_stages_are_configs_that_chain_and_round_trip():
    cfg = parse_config(demo.DemoConfig, ["--run", "r", "--train-problems", "8", "--nproc", "2", "--lr", "1e-5",
                                         "--lam", "5", "--test-problems", "4"])
    presample, trainset, train, bench = demo.stages(cfg)
    assert [s.module for s in (presample, trainset, train, bench)] == ["pruner.presample", "pruner.dataset",
                                                                      "pruner.train", "bench.speed"]
    # each stage reads what the one before wrote
    assert trainset.config.samples == presample.config.out == "r/samples.jsonl"
    assert train.config.data == trainset.config.out and bench.config.models[1] == f"pruned={train.config.out}/export"
    assert (presample.config.limit, trainset.config.lam, train.config.lr, bench.config.limit) == (8, 5.0, 1e-5, 4)
    # the embedded test split and the real sets in one benchmark, the real ones cut to --real-problems
    assert bench.config.data == ["embedded:test", "math500", "gsm8k"]
    assert bench.config.set_limit == ["math500=100", "gsm8k=100"]
    assert train.config.resume and bench.config.overwrite and presample.config.chunk_problems == 128
    assert train.launcher == ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    assert presample.launcher == trainset.launcher == bench.launcher == ()
    for stage in (presample, trainset, train, bench):
        # the printed command is the configuration: parsing it back gives the same object
        assert parse_config(type(stage.config), to_argv(stage.config)) == stage.config
    assert "--resume" in to_argv(train.config) and "--lr=1e-05" in to_argv(train.config)


def test_demo_defaults_are_the_documented_ones():
    cfg = demo.DemoConfig()
    assert (cfg.run, cfg.train_problems, cfg.lr, cfg.k, cfg.nproc, cfg.ckpt_every) == ("runs/demo", 600, 4e-5, 8, 1, 100)
    assert dataclasses.replace(cfg) == parse_config(demo.DemoConfig, [])


def test_demo_benchmarks_the_real_sets_it_finds_and_names_the_missing(tmp_path, monkeypatch, capsys):
    cfg = parse_config(demo.DemoConfig, ["--real-sets", "math500", "aime24", "--real-problems", "7"])
    assert demo.available_real_sets(cfg).real_sets == ["math500", "aime24"]  # ../shared/data holds both
    monkeypatch.setenv("O1PRUNER_DATA", str(tmp_path))  # a clone without the shared data
    (tmp_path / "math500.jsonl").write_text("")
    kept = demo.available_real_sets(cfg)
    assert kept.real_sets == ["math500"] and kept.real_problems == 7
    assert "benchmarking without aime24" in capsys.readouterr().out
    assert demo.stages(kept)[3].config.data == ["embedded:test", "math500"]
    assert demo.stages(parse_config(demo.DemoConfig, ["--real-sets"]))[3].config.data == ["embedded:test"]
    with pytest.raises(SystemExit, match=r"--real-sets \['math5000'\] are not known sets"):
        demo.available_real_sets(parse_config(demo.DemoConfig, ["--real-sets", "math5000"]))
    with pytest.raises(SystemExit, match="--real-problems must be >= 1, got 0"):
        demo.available_real_sets(parse_config(demo.DemoConfig, ["--real-problems", "0"]))


def test_demo_stage_env_and_timing_table(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 8)
    assert demo.stage_env(1)["OMP_NUM_THREADS"] == "8" and demo.stage_env(3)["OMP_NUM_THREADS"] == "2"
    assert demo.stage_env(2)["PYTHONSAFEPATH"] == "1" and demo.stage_env(2)["OMP_WAIT_POLICY"] == "PASSIVE"
    assert demo.stage_env(1)["PYTHONPATH"].split(":")[0] == str(ROOT)
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert demo.stage_env(2)["OMP_NUM_THREADS"] == "5"  # the user's choice wins
    table = demo.timing_table([{"stage": "pre-sampling", "wall_s": 30.0}, {"stage": "training (torchrun)", "wall_s": 90.0}],
                              120.0)
    assert "| pre-sampling | 30.0 | 25% |" in table and "| total | 120.0 (2.0 min) | |" in table


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tiny_demo_with_two_training_processes_writes_its_stage_times(tmp_path):
    # The whole chain on a few problems, training with 2 processes (the demo's default is 1).
    pytest.importorskip("vllm")
    run = tmp_path / "demo"
    out = subprocess.run([sys.executable, "-m", "pruner.demo", "--run", str(run), "--train-problems", "8",
                          "--test-problems", "4", "--real-problems", "3", "--nproc", "2", "--ckpt-every", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=850)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    timing = json.loads((run / "demo_timing.json").read_text())
    assert [s["stage"] for s in timing["stages"]] == ["pre-sampling", "training set", "training (torchrun)",
                                                      "benchmark (bench/speed.py)"]
    assert timing["nproc"] == 2 and abs(sum(s["wall_s"] for s in timing["stages"]) - timing["total_s"]) < 5
    # the recorded commands are the printed ones, and the torchrun one runs the trainer as a module
    assert all(f"$ {s['command']}" in out.stdout for s in timing["stages"])
    assert "--nproc_per_node=2 -m pruner.train" in timing["stages"][2]["command"]
    assert "| total |" in out.stdout and (run / "bench" / "results.json").is_file()
    results = json.loads((run / "bench" / "results.json").read_text())
    assert {(r["dataset"], r["problems"]) for r in results["runs"]} == {("embedded:test", 4), ("math500", 3),
                                                                         ("gsm8k", 3)}
    assert list((run / "train" / "checkpoints").iterdir())


def test_demo_imports_configs_not_stages():
    # The demo builds configurations; the stages (and torch, vLLM, the bench scripts) load in their own processes.
    code = ("import sys, pruner.demo; print(sorted(m for m in sys.modules if m.split('.')[0] in ('bench', 'torch', "
            "'vllm') or m in ('pruner.presample', 'pruner.dataset', 'pruner.train')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
