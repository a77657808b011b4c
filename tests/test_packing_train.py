"""The trainer with `--micro-batch-tokens`, run for real: 2 gloo processes with very uneven lengths
give 1 process's numbers and do not hang; bad budgets fail before any weight is read."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _uneven_samples(path: Path, model_dir: Path, problems: int = 8, k: int = 4) -> Path:
    """Responses from 2 to ~300 tokens: a few long ones among many short, as long-thought outputs are."""
    from test_train import _write_samples

    return _write_samples(path, model_dir, problems, k, seed=7,
                          words_in=lambda rng, s: rng.choice([1, 2, 3, 5, 8, 150]) if s else rng.choice([1, 120]))


@pytest.fixture(scope="module")
def uneven_set(tiny_model_dir, tmp_path_factory) -> Path:
    from pruner.dataset import build_trainset

    root = tmp_path_factory.mktemp("uneven")
    samples = _uneven_samples(root / "samples.jsonl", tiny_model_dir)
    return build_trainset(samples, root / "lh", lam=2.0, tokenizer=str(tiny_model_dir), report=False)


def _budget(trainset: Path) -> int:
    from pruner.batching import sequence_lengths
    from pruner.trainset import load_trainset

    return int(sequence_lengths(load_trainset(trainset)).max()) + 40


def _torchrun(nproc: int, out: Path, model: Path, data: Path, *extra: str) -> tuple[list[dict], str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "pruner" / "train.py"), "--model", str(model), "--data", str(data), "--out", str(out),
           "--global-batch-size", "8", "--lr", "1e-3", "--warmup-ratio", "0", "--no-export", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], proc.stdout


@pytest.mark.slow
def test_two_processes_packed_equal_one_process_with_very_uneven_lengths(tiny_model_dir, uneven_set, tmp_path):
    budget = str(_budget(uneven_set))
    rows2, log2 = _torchrun(2, tmp_path / "run2", tiny_model_dir, uneven_set, "--micro-batch-tokens", budget,
                            "--max-steps", "4", "--ckpt-every", "100")
    rows1, log1 = _torchrun(1, tmp_path / "run1", tiny_model_dir, uneven_set, "--micro-batch-tokens", budget,
                            "--max-steps", "4", "--ckpt-every", "100")
    assert "packed attention: per-sequence SDPA (o1pruner_packed_sdpa)" in log1
    assert f"packed rows of <= {budget} tokens" in log2
    assert [r["step"] for r in rows2] == [r["step"] for r in rows1] == [1, 2, 3, 4]
    for a, b in zip(rows1, rows2):  # the same global steps, split over 1 or 2 processes: the same gradient
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["mean_response_tokens"] == b["mean_response_tokens"]
    # and the same as the padded trainer on one process (the loss normaliser is unchanged)
    padded, _ = _torchrun(1, tmp_path / "padded", tiny_model_dir, uneven_set, "--micro-batch-size", "2",
                          "--max-steps", "4", "--ckpt-every", "100")
    for a, b in zip(padded, rows1):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_a_budget_below_the_longest_sequence_fails_before_any_weight_is_read(tiny_model_dir, uneven_set, tmp_path,
                                                                             monkeypatch):
    import pruner.train as train

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were read before the budget was checked")
    monkeypatch.setattr(train, "prepare_model", no_weights)
    longest = _budget(uneven_set) - 40
    with pytest.raises(ValueError, match=rf"--micro-batch-tokens 64 is smaller than its longest sequence "
                                         rf"\(sample \d+\) of {longest} prompt\+response tokens"):
        train.main(["--model", str(tiny_model_dir), "--data", str(uneven_set), "--out", str(tmp_path / "o"),
                    "--micro-batch-tokens", "64"])
    assert not (tmp_path / "o").exists()  # not even the run folder


def test_the_rule_for_a_budget_with_a_micro_batch_size_is_in_help():
    from pruner.cli import build_parser
    from pruner.configs import TrainConfig

    text = "".join(build_parser(TrainConfig).format_help().split())  # argparse wraps lines at hyphens too
    assert "Rule:whenN>0itreplaces--micro-batch-size,whichisthenignored" in text
    TrainConfig(global_batch_size=6, micro_batch_size=4, micro_batch_tokens=512).validate()  # not divisible: unused
    with pytest.raises(ValueError, match="--micro-batch-tokens"):
        TrainConfig(micro_batch_tokens=-1).validate()
