"""The benchmark suite's contracts: AES, the comparisons of bench/speed.py, its files, bench/kernel_ops.py's CSV."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.speed_report import summarize, write_report
from pruner.aes import accuracy_efficiency_score, waste_removed

ROOT = Path(__file__).resolve().parent.parent


def test_aes_penalises_accuracy_drops():
    # shorter by 40% and 10% more accurate: 0.4 + 3 * 0.1
    assert accuracy_efficiency_score(100, 0.5, 60, 0.55) == pytest.approx(0.7)
    # shorter by 40% but 10% less accurate: 0.4 - 5 * 0.1 (the paper's first Table 2 would say 0.7)
    assert accuracy_efficiency_score(100, 0.5, 60, 0.45) == pytest.approx(-0.1)
    assert accuracy_efficiency_score(100, 0.5, 120, 0.5) == pytest.approx(-0.2)
    with pytest.raises(ValueError, match="base accuracy"):
        accuracy_efficiency_score(100, 0.0, 60, 0.5)
    assert waste_removed(200, 120, 100) == pytest.approx(0.8)
    assert waste_removed(100, 90, 100) is None  # nothing removable


def _raw(model: str, mode: str, wall: float, samples: list[tuple[int, bool, bool, float]], min_tokens=None,
         dataset: str = "d") -> dict:
    return {"model": model, "model_path": f"/m/{model}", "dataset": dataset, "mode": mode, "n": 1, "wall_time_s": wall,
            "samples": [{"problem_id": str(i), "tokens": t, "correct": c, "truncated": tr, "latency_s": lat,
                         "min_tokens": min_tokens} for i, (t, c, tr, lat) in enumerate(samples)]}


def test_summary_and_comparisons_from_per_sample_records(tmp_path):
    base = _raw("base", "greedy", 10.0, [(200, True, False, 1.0), (100, True, False, 2.0), (300, False, True, 3.0),
                                         (200, True, False, 4.0)], min_tokens=80)
    pruned = _raw("pruned", "greedy", 5.0, [(100, True, False, 0.5), (80, True, False, 1.0), (120, True, False, 1.5),
                                            (100, True, False, 2.0)], min_tokens=80)
    results = summarize([base, pruned])
    b, p = results["runs"]
    assert (b["accuracy"], b["mean_tokens"], b["median_tokens"], b["truncation_rate"]) == (0.75, 200, 200, 0.25)
    assert b["tokens_per_s"] == pytest.approx(80.0) and p["latency_p90_s"] == 2.0 and b["latency_p50_s"] == 3.0
    (c,) = results["comparisons"]
    assert (c["base"], c["model"], c["mode"]) == ("base", "pruned", "greedy")
    assert c["token_ratio"] == pytest.approx(0.5) and c["time_ratio"] == pytest.approx(0.5)
    assert c["accuracy_delta"] == pytest.approx(0.25)
    assert c["aes"] == pytest.approx(0.5 + 3 * (0.25 / 0.75))
    assert c["waste_removed"] == pytest.approx((200 - 100) / (200 - 80))
    table = write_report(results, [base, pruned], tmp_path)
    assert "| d | pruned | 1.000 | +0.250 [" in table and "| 100.0 | 0.500 [" in table and "| 0.500 |" in table
    assert json.loads((tmp_path / "results.json").read_text())["comparisons"][0]["model"] == "pruned"
    assert (tmp_path / "lengths_greedy.png").stat().st_size > 1000


def test_waste_removed_only_where_records_carry_min_tokens():
    base = _raw("base", "sampled", 1.0, [(10, True, False, None)])
    other = _raw("other", "sampled", 1.0, [(5, False, False, None)])
    (c,) = summarize([base, other])["comparisons"]
    assert "waste_removed" not in c and c["aes"] == pytest.approx(0.5 - 5 * 1.0)


@pytest.mark.slow
def test_speed_runs_vllm_on_each_model_and_compares_with_the_first(tmp_path):
    # The same model twice: greedy decoding must give identical lengths (token ratio exactly 1).
    out = tmp_path / "bench"
    cmd = [sys.executable, "bench/speed.py", "--models", "base=embedded", "twin=embedded", "--limit", "3",
           "--modes", "greedy", "--warmup", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    keys = {"model", "dataset", "mode", "accuracy", "mean_tokens", "median_tokens", "wall_time_s", "tokens_per_s",
            "latency_p50_s", "latency_p90_s", "truncation_rate"}
    assert [r["model"] for r in results["runs"]] == ["base", "twin"]
    assert all(keys <= r.keys() and r["samples"] == 3 and r["mean_tokens"] > 0 for r in results["runs"])
    (c,) = results["comparisons"]
    assert c["token_ratio"] == 1.0 and c["accuracy_delta"] == 0.0 and c["waste_removed"] == 0.0
    assert (out / "results.md").exists() and (out / "lengths_greedy.png").exists()
    assert all((out / f"vllm-{name}.log").stat().st_size > 0 for name in ("base", "twin"))  # not on the console


@pytest.mark.slow
def test_kernel_benchmark_writes_a_row_per_provider_and_shape(tmp_path):
    out = tmp_path / "k.csv"
    cmd = [sys.executable, "bench/kernel_ops.py", "--ops", "logprobs", "ratio_loss", "--n", "64", "96", "--v", "97",
           "--providers", "eager", "kernels-torch", "--reps", "1", "--warmup", "0", "--skip-memory-ratio",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert {(r["op"], r["provider"], r["N"]) for r in rows} == {
        (op, prov, n) for op in ("logprobs", "ratio_loss") for prov in ("eager", "kernels-torch") for n in ("64", "96")}
    for r in rows:
        assert r["status"] == "ok" and r["device"] == "cpu"
        fwd, bwd, total = float(r["fwd_ms"]), float(r["bwd_ms"]), float(r["total_ms"])
        assert fwd > 0 and bwd > 0 and total >= max(fwd, bwd)


@pytest.mark.parametrize("args, message", [
    (["--models", "base=embedded", "pruned=/no/such/export"], "--models pruned= /no/such/export: no such folder"),
    (["--models", "base=embedded", "twin=embedded", "--limit", "0"], "--limit must be a positive number"),
    (["--models", "base=embedded", "twin=embedded", "--n", "0"], "--n must be >= 1"),
])
def test_speed_checks_every_model_and_flag_before_the_first_benchmark(tmp_path, args, message):
    # A missing second model used to be found only after the first had been benchmarked in full.
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "bench/speed.py", *args, "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert "generating with" not in proc.stdout and not out.exists()


def test_speed_refuses_an_out_folder_of_another_comparison(tmp_path):
    from bench.speed import apply_preset, claim_out
    from pruner.configs import SpeedConfig
    from pruner import default_model_path
    from pruner.manifest import RunStateError

    models = [("base", str(default_model_path())), ("twin", str(default_model_path()))]

    def cfg(**kw):
        return apply_preset(SpeedConfig(limit=3, modes=["greedy"], max_new_tokens=64, warmup=1,
                                        out=str(tmp_path / "b"), **kw))[0]

    with claim_out(cfg(), models):
        (tmp_path / "b" / "results.json").write_text("{}")
    with pytest.raises(RunStateError, match=r"config\.limit: was 3, now 5"):
        claim_out(dataclasses.replace(cfg(), limit=5), models)
    with claim_out(dataclasses.replace(cfg(), limit=5, overwrite=True), models):
        assert not (tmp_path / "b" / "results.json").exists()


def test_speed_modes_are_the_configs_choices():
    import typing

    from bench.speed_worker import MODES
    from pruner.configs import SPEED_PRESETS, SpeedConfig

    (choices,) = typing.get_args(typing.get_type_hints(SpeedConfig)["modes"])[:1]
    (choices,) = typing.get_args(choices)
    assert set(typing.get_args(choices)) == set(MODES) == set(SPEED_PRESETS["embedded"]["modes"])


def test_speed_worker_is_the_benchmark_narrowed_to_one_model(tmp_path, monkeypatch):
    # The per-model worker is run from a SpeedConfig, not from hand-built flags: its command parses back
    # into the same configuration, with the one model, its fast-prompt choice and the file it writes.
    from bench import speed, speed_procs
    from pruner.cli import parse_config

    calls = []

    def fake_run_worker(cmd, **kw):
        assert cmd[1:3] == ["-m", "bench.speed"]
        cfg = parse_config(speed.SpeedConfig, cmd[3:])
        calls.append(cfg)
        Path(cfg.worker_out).write_text(json.dumps({"runs": [_raw(cfg.models[0].split("=")[0], "greedy", 1.0,
                                                                   [(10, True, False, 0.1)])],
                                                    "engine_start_s": 1.0, "worker_s": 2.0}))
        return 0

    monkeypatch.setattr(speed_procs, "run_worker", fake_run_worker)
    cfg, _ = speed.apply_preset(speed.SpeedConfig(models=["base=/m/a", "fast=/m/b"], fast_prompt=["fast"], limit=2,
                                                  modes=["greedy"], out=str(tmp_path), overwrite=True))
    speed.benchmark(cfg, speed.parse_models(cfg.models))
    base, fast = calls
    assert (base.models, base.fast_prompt, fast.models, fast.fast_prompt) == (["base=/m/a"], [], ["fast=/m/b"], ["fast"])
    assert fast.worker_out == str(tmp_path / "raw_fast.json") and not fast.overwrite and fast.limit == 2
    assert fast == dataclasses.replace(cfg, models=["fast=/m/b"], fast_prompt=["fast"], overwrite=False,
                                       worker_out=fast.worker_out)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["comparisons"][0]["model"] == "fast" and results["timing"]["fast"]["engine_start_s"] == 1.0


def test_every_bench_config_writes_under_runs_by_default():
    # Benchmarks and profiles leave the source tree alone: their default output lies under runs/ (ignored).
    from bench.paper_comparisons import PaperConfig
    from bench.presample_vs_hf import PresampleVsHfConfig
    from bench.profile_default import ProfileConfig
    from pruner.configs import SpeedConfig
    from pruner.demo import DemoConfig

    outs = [SpeedConfig().out, PaperConfig().run, PresampleVsHfConfig().out, ProfileConfig().out, DemoConfig().run]
    for out in outs:
        rel = Path(out).relative_to(ROOT) if Path(out).is_absolute() else Path(out)
        assert rel.parts[0] == "runs", out
    assert "runs/" in (ROOT / ".gitignore").read_text().splitlines()


def test_paper_comparisons_build_each_row_as_configs():
    from bench.paper_comparisons import PaperConfig, fine_tunes
    from pruner.cli import parse_config, to_argv

    cfg = parse_config(PaperConfig, ["--run", "r", "--lams", "0", "5", "--train-args", "--lr 1e-5 --max-steps 7"])
    rows = fine_tunes(cfg, "r/samples.jsonl")
    assert list(rows) == ["o1-pruner-lam0", "o1-pruner-lam5", "sft-shortest", "dpo"]
    for name, (data, train) in rows.items():
        assert data.samples == "r/samples.jsonl" and train.data == data.out == f"r/set-{name}"
        assert (train.out, train.resume, train.lr, train.max_steps) == (f"r/train-{name}", True, 1e-5, 7)
        assert parse_config(type(train), to_argv(train)) == train
    assert [(d.kind, d.lam) for d, _ in rows.values()][1:] == [("lh", 5.0), ("sft", 2.0), ("dpo", 2.0)]
    with pytest.raises(SystemExit):  # a wrong trainer flag fails before any stage runs
        fine_tunes(parse_config(PaperConfig, ["--train-args", "--no-such-flag 1"]), "s")
