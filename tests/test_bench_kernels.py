"""The kernel benchmarks' and GPU check's command lines: one config dataclass each, parsed by
pruner.cli; default outputs under runs/, none in the source tree; the GPU wheels pinned, not vendored."""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_summary, kernel_ops, trl_memory
from pruner.cli import build_parser, parse_config, to_argv

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["kernel_ops.py", "kernel_resources.py", "trl_memory.py", "plan_vs_measured.py", "gpu_summary.py"]
CONFIGS = [kernel_ops.KernelOpsConfig, trl_memory.TrlMemoryConfig, gpu_summary.GpuSummaryConfig]


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'kernels'}"}
    env.pop("TRITON_INTERPRET", None)  # kernel_resources compiles real kernels
    return subprocess.run([sys.executable, str(ROOT / "bench" / name), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", SCRIPTS)
def test_each_script_parses_one_config_dataclass_and_no_argparse_of_its_own(name):
    source = (ROOT / "bench" / name).read_text()
    assert "argparse" not in source
    assert source.count("parse_config(") == 1, "one configuration dataclass, parsed once"


@pytest.mark.parametrize("name, flag", [("kernel_resources.py", "--arch"), ("plan_vs_measured.py", "--response-tokens")])
def test_help_of_the_scripts_not_imported_here(name, flag):
    # kernel_resources drops TRITON_INTERPRET at import and plan_vs_measured rewrites sys.path:
    # both only in a process of their own.
    proc = _script(name, "--help")
    assert proc.returncode == 0 and flag in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("cls", CONFIGS)
def test_every_flag_has_help_and_a_non_default_config_round_trips(cls):
    build_parser(cls)  # refuses a field without help
    changed = {"ops": ["logprobs"], "n": [64, 96], "providers": ["eager", "liger"], "dtype": "float16",
               "skip_memory_ratio": True, "variants": ["trl", "logits"], "device": "cpu", "tokens": 64,
               "results": "x/y", "out": "z.csv"}
    names = {f.name for f in dataclasses.fields(cls)}
    cfg = cls(**{k: v for k, v in changed.items() if k in names})
    assert parse_config(cls, to_argv(cfg)) == cfg


@pytest.mark.parametrize("argv", [["--ops", "nope"], ["--providers", "eager,liger"], ["--dtype", "fp8"]])
def test_kernel_ops_refuses_unknown_choices(argv, capsys):
    with pytest.raises(SystemExit):
        parse_config(kernel_ops.KernelOpsConfig, argv)
    assert "invalid choice" in capsys.readouterr().err


def test_impossible_sizes_are_refused_before_any_work():
    with pytest.raises(SystemExit, match="--n must be >= 1"):
        kernel_ops.KernelOpsConfig(n=[64, 0]).check()
    with pytest.raises(SystemExit, match="multiple of --batch"):
        trl_memory.TrlMemoryConfig(tokens=100, batch=3).check()


def test_default_outputs_are_under_runs():
    assert kernel_ops.output_path(kernel_ops.KernelOpsConfig(), "cpu") == Path("runs/kernels/kernels_cpu.csv")
    assert kernel_ops.output_path(kernel_ops.KernelOpsConfig(out="a.csv"), "cpu") == Path("a.csv")
    assert trl_memory.TrlMemoryConfig().out.startswith("runs/")
    assert gpu_summary.GpuSummaryConfig().results.startswith("runs/")
    proc = _script("plan_vs_measured.py", "--help")
    assert "(default: runs/plan_vs_measured)" in " ".join(proc.stdout.split())
    check = (ROOT / "bench" / "gpu_check.sh").read_text()
    assert 'OUT="${OUT:-runs/gpu_check}"' in check and "bench/results" not in check


def test_gpu_summary_of_an_empty_run_says_what_did_not_run(tmp_path):
    gpu_summary.main(["--results", str(tmp_path)])
    text = (tmp_path / "gpu_summary.md").read_text()
    assert "CPU (dry mode)" in text and "| kernel tests | not run |" in text
    with pytest.raises(SystemExit, match="no such folder"):
        gpu_summary.main(["--results", str(tmp_path / "missing")])


def test_gpu_wheels_are_pinned_by_hash_and_fetched_into_an_ignored_folder():
    assert not list((ROOT / "bench").glob("**/*.whl")), "no vendored wheels in the source tree"
    pins = [line for line in (ROOT / "bench" / "gpu-wheels.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert {line.split("==")[0] for line in pins} == {"liger-kernel", "cut-cross-entropy"}
    assert all(re.search(r"==[\d.]+ --hash=sha256:[0-9a-f]{64}$", line) for line in pins), pins
    assert ".cache/gpu-wheels/" in (ROOT / ".gitignore").read_text().split()
    make = (ROOT / "Makefile").read_text()
    assert "gpu-wheels:" in make and "-r bench/gpu-wheels.txt -d $(GPU_WHEELS)" in make
    assert 'GPU_WHEELS="${GPU_WHEELS:-.cache/gpu-wheels}"' in (ROOT / "bench" / "gpu_check.sh").read_text()
