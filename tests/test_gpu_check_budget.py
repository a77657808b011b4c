"""bench/gpu_check.sh's budget (issue 21): every stage fits its limit with margin, the whole run fits one
10-minute device command, every timeout can kill, prerequisites come first, one DCP checkpoint at a time."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"
COMMAND_LIMIT_S = 600   # the longest one command may run on the device machine
TRITON_COMPILES = 60    # the kernel tests' compiles on a cold cache, about 2 s each on an H100


def _budget(*flags: str) -> dict[str, tuple[int, int]]:
    proc = subprocess.run(["bash", str(SCRIPT), "--budget", *flags], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[2].isdigit():
            rows[cells[0].strip("*")] = (int(cells[1] or 0), int(cells[2]))
    return rows


def test_every_stage_has_margin_and_the_whole_run_fits_one_command():
    rows = _budget()
    whole = rows.pop("whole run")
    stages = {k: v for k, v in rows.items() if not k.startswith(("set-up", "timeout"))}
    for name, (expected, limit) in stages.items():
        assert limit >= 1.5 * expected, f"{name}: limit {limit} s leaves no margin over {expected} s"
    assert stages["kernel_tests"][1] >= TRITON_COMPILES * 2 + 60  # compiles plus the tests themselves
    assert whole[1] == sum(limit for _, limit in rows.values())
    assert whole[1] <= COMMAND_LIMIT_S * 0.95


def test_every_stage_the_script_runs_has_a_budget_and_every_timeout_kills():
    text = SCRIPT.read_text()
    run = set(re.findall(r"^\s*(?:run_step|skip_step) (\w+)", text, flags=re.M))
    assert run == set(_budget()) - {"whole run"} - {k for k in _budget() if k.startswith(("set-up", "timeout"))}
    calls = [line.strip() for line in text.splitlines() if re.match(r"\s*(\S+=\S+\s+)*timeout\s", line)]
    assert calls and all(re.search(r"timeout -k \S+ \S+ ", c) for c in calls), calls


def test_prerequisites_run_first_and_dry_prints_the_budget_before_any_stage():
    text = SCRIPT.read_text()
    first_stage = text.index("run_step prerequisites")
    assert all(text.index(f"run_step {s}") > first_stage for s in ("kernel_bench", "train_step", "trainer_run"))
    assert "import pytest" in text and "skip_step kernel_tests" in text  # no pytest: the stage says so
    assert text.index("print_budget | tee") < first_stage
    assert "disk_usage" in text  # one checkpoint + model + export must fit before anything is written


def test_one_checkpoint_at_a_time_the_resume_writes_none():
    text = SCRIPT.read_text()
    resume = next(line for line in text.splitlines() if line.startswith("run_step trainer_resume"))
    assert "--no-final-checkpoint" in resume and "--keep-checkpoints 1" in text


@pytest.mark.slow
def test_no_final_checkpoint_leaves_only_the_checkpoint_the_run_resumed_from(tiny_model_dir, tmp_path):
    from test_train import _write_samples

    from pruner.dataset import build_trainset
    from pruner.train import main

    samples = _write_samples(tmp_path / "samples.jsonl", tiny_model_dir, problems=4, k=4)
    data = build_trainset(samples, tmp_path / "set", lam=2.0, tokenizer=str(tiny_model_dir))
    args = ["--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "run"), "--device", "cpu",
            "--global-batch-size", "4", "--micro-batch-size", "2", "--max-steps", "3", "--ckpt-every", "100",
            "--keep-checkpoints", "1", "--no-export"]
    main(args + ["--stop-after", "2"])
    main(args + ["--resume", "--no-final-checkpoint"])
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step-0000002"]
    steps = (tmp_path / "run" / "metrics.jsonl").read_text().count('"step"')
    assert steps == 3  # the resumed run did finish
