"""The trainer, run for real: torchrun + FSDP2 on gloo, a tiny Qwen2 model, a small training set."""
from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _write_samples(path: Path, model_dir: Path, problems: int = 12, k: int = 4, seed: int = 0,
                   words_in=lambda rng, s: rng.randint(3, 24)) -> Path:
    """Samples in pre-sampling's format: prompts through the chat template, responses of varied length
    (`words_in(rng, sample_index)` words each)."""
    from conftest import write_samples_meta
    from transformers import AutoTokenizer

    from pruner.prompting import build_prompt

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rng = random.Random(seed)
    words = [w for w in tok.get_vocab() if w.isalnum()][:50] or ["a", "b"]
    with path.open("w") as f:
        for p in range(problems):
            prompt = build_prompt(tok, f"problem {p}")
            prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            for s in range(k):
                text = " ".join(rng.choice(words) for _ in range(words_in(rng, s)))
                ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                correct = rng.random() < 0.5
                f.write(json.dumps({
                    "problem_id": f"p{p}", "sample_index": s, "prompt": prompt, "prompt_token_ids": prompt_ids,
                    "response": text, "response_token_ids": ids, "response_tokens": len(ids),
                    "finish_reason": "stop", "extracted_answer": "1" if correct else "2", "correct": correct,
                    "answer": "1"}) + "\n")
    write_samples_meta(path, tok, model=model_dir, k=k)
    return path


@pytest.fixture(scope="module")
def trainset(tiny_model_dir, tmp_path_factory) -> Path:
    from pruner.dataset import build_trainset

    root = tmp_path_factory.mktemp("trainset")
    samples = _write_samples(root / "samples.jsonl", tiny_model_dir)
    return build_trainset(samples, root / "lh", lam=2.0, tokenizer=str(tiny_model_dir))


def _torchrun(nproc: int, out: Path, model: Path, data: Path, *extra: str) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "pruner" / "train.py"), "--model", str(model), "--data", str(data), "--out", str(out),
           "--global-batch-size", "8", "--micro-batch-size", "2", "--lr", "1e-3", "--warmup-ratio", "0",
           "--no-export", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_proc_run(tiny_model_dir, trainset, tmp_path_factory):
    out = tmp_path_factory.mktemp("run2")
    return out, _torchrun(2, out, tiny_model_dir, trainset, "--max-steps", "4", "--ckpt-every", "2")


@pytest.mark.slow
def test_two_process_run_is_finite_and_matches_one_process(two_proc_run, tiny_model_dir, trainset, tmp_path):
    _, rows2 = two_proc_run
    assert [r["step"] for r in rows2] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in rows2)
    # The same global batches on one process with 4 accumulation steps: the same gradient.
    rows1 = _torchrun(1, tmp_path / "run1", tiny_model_dir, trainset, "--max-steps", "4", "--ckpt-every", "100")
    for a, b in zip(rows1, rows2):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["mean_ratio"] == pytest.approx(b["mean_ratio"], rel=1e-5)


@pytest.mark.slow
def test_resumed_run_reproduces_the_uninterrupted_curve(two_proc_run, tiny_model_dir, trainset, tmp_path):
    _, full = two_proc_run
    out = tmp_path / "interrupted"
    first = _torchrun(2, out, tiny_model_dir, trainset, "--max-steps", "4", "--ckpt-every", "100", "--stop-after", "2")
    assert [r["step"] for r in first] == [1, 2]
    resumed = _torchrun(2, out, tiny_model_dir, trainset, "--max-steps", "4", "--ckpt-every", "100", "--resume")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(full, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["lr"] == pytest.approx(b["lr"])


@pytest.mark.slow
def test_loss_goes_down_on_a_fixed_batch(tiny_model_dir, trainset, tmp_path):
    from pruner.dataset import load_trainset

    n = len(load_trainset(trainset)["prompt_lengths"])
    rows = _torchrun(1, tmp_path / "fixed", tiny_model_dir, trainset, "--global-batch-size", str(n - n % 2),
                     "--micro-batch-size", "2", "--epochs", "6", "--ckpt-every", "100")
    losses = [r["loss"] for r in rows]
    assert len(losses) == 6
    # Off-policy start: the ratio is exactly 1, so the first loss is -mean(advantage) of the batch.
    assert rows[0]["mean_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert losses[-1] < losses[0] - 1e-3


@pytest.mark.slow
def test_export_loads_in_transformers_and_matches_the_trained_weights(tiny_model_dir, trainset, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "export_run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "pruner" / "train.py"), "--model", str(tiny_model_dir),
                           "--data", str(trainset), "--out", str(out), "--global-batch-size", "8",
                           "--micro-batch-size", "4", "--max-steps", "2", "--lr", "1e-2"],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # A quiet console: no weight-loading bar between the trainer's lines, no `torch_dtype` deprecation.
    assert "Loading weights" not in proc.stderr and "torch_dtype" not in proc.stderr, proc.stderr[-4000:]
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    tuned = AutoModelForCausalLM.from_pretrained(str(out / "export"))
    assert type(base) is type(tuned)
    moved = [n for (n, a), (_, b) in zip(base.named_parameters(), tuned.named_parameters()) if not torch.equal(a, b)]
    assert moved, "the export holds the initial weights"
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(tuned(ids).logits).all()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / "export" / name).exists(), name
    assert (out / "metrics.png").exists()


def _run_inline(*argv: str) -> None:
    from pruner.train import main

    main(list(argv))


def test_clear_errors_before_any_work(tiny_model_dir, trainset, tmp_path):
    with pytest.raises(FileNotFoundError, match="training set .* not found"):
        _run_inline("--model", str(tiny_model_dir), "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    with pytest.raises(ValueError, match="not divisible"):
        _run_inline("--model", str(tiny_model_dir), "--data", str(trainset), "--out", str(tmp_path / "o"),
                    "--global-batch-size", "6", "--micro-batch-size", "4")
    other = tmp_path / "other"
    meta = json.loads((trainset / "meta.json").read_text())
    other.mkdir()
    for f in trainset.iterdir():
        if f.is_file():
            (other / f.name).write_bytes(f.read_bytes())
    meta["tokenizer_fingerprint"] = "0" * 16
    (other / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="tokenizer_fingerprint"):
        _run_inline("--model", str(tiny_model_dir), "--data", str(other), "--out", str(tmp_path / "o"))


@pytest.mark.slow
def test_on_policy_round_samples_the_exported_policy_with_vllm(tiny_model_dir, tmp_path):
    """--rounds 2: the round-1 policy is exported, loaded by vLLM through pre-sampling, rewarded
    against the first training set's statistics, and trained on with its own old log-probs."""
    from pruner.dataset import build_trainset, load_trainset

    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"id": f"q{i}", "problem": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                                for i in range(4)))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    samples = tmp_path / "samples.jsonl"
    subprocess.run([sys.executable, "-m", "pruner.presample", "--model", str(tiny_model_dir), "--problems",
                    str(problems), "--out", str(samples), "--k", "3", "--max-new-tokens", "10"],
                   check=True, env=env, cwd=ROOT, capture_output=True, timeout=600)
    first = build_trainset(samples, tmp_path / "trainset", lam=2.0, tokenizer=str(tiny_model_dir))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "pruner" / "train.py"), "--model", str(tiny_model_dir),
                           "--data", str(first), "--out", str(out), "--global-batch-size", "4",
                           "--micro-batch-size", "2", "--rounds", "2", "--lr", "1e-3", "--ckpt-every", "100"],
                          capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    round_set = load_trainset(out / "round-1" / "trainset")
    first_stats = {s["id"]: s for s in load_trainset(first)["stats"]}
    for s in round_set["stats"]:  # the reward's reference is the first training set's, not the new samples'
        assert s["ref_mean_length"] == pytest.approx(first_stats[s["id"]]["ref_mean_length"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["round"] for r in rows} == {0, 1}
    assert (out / "round-1" / "model" / "config.json").exists() and (out / "export" / "config.json").exists()
    assert (out / "round-1" / "round.json").exists()  # written last: the round is complete
    # the round's old log-probs are the round model's (the sampling policy), cached next to its set
    assert len(list((out / "round-1" / "trainset").glob("old_logps-*.safetensors"))) == 1


@pytest.mark.slow
def test_nan_steps_are_skipped_then_the_run_stops(tiny_model_dir, trainset, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan_set"
    broken.mkdir()
    for f in trainset.iterdir():
        if f.is_file() and not f.name.startswith("old_logps"):
            (broken / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(broken / "trainset.safetensors"))
    tensors["advantages"] = torch.full_like(tensors["advantages"], float("nan"))
    save_file(tensors, str(broken / "trainset.safetensors"))
    out = tmp_path / "nan_run"
    with pytest.raises(FloatingPointError, match="2 steps in a row"):
        _run_inline("--model", str(tiny_model_dir), "--data", str(broken), "--out", str(out),
                    "--global-batch-size", "8", "--micro-batch-size", "4", "--max-bad-steps", "2", "--no-export")
    assert not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip()


def test_flags_are_checked_before_any_file_is_read():
    from pruner.configs import TrainConfig

    TrainConfig().validate()
    for kwargs, flag in [({"micro_batch_size": 0}, "--micro-batch-size"), ({"temperature": 0.0}, "--temperature"),
                         ({"warmup_ratio": 1.0}, "--warmup-ratio"), ({"lr": -1.0}, "--lr"), ({"rounds": 0}, "--rounds"),
                         ({"global_batch_size": 6, "micro_batch_size": 4}, "--global-batch-size")]:
        with pytest.raises(ValueError, match=flag):
            TrainConfig(**kwargs).validate()


def _copy_set(trainset: Path, dest: Path, sampling: dict) -> Path:
    dest.mkdir()
    for f in trainset.iterdir():
        if f.is_file() and not f.name.startswith("old_logps"):
            (dest / f.name).write_bytes(f.read_bytes())
    meta = json.loads((trainset / "meta.json").read_text())
    (dest / "meta.json").write_text(json.dumps({**meta, "sampling": sampling}))
    return dest


def test_log_probs_use_the_sets_sampling_temperature_unless_overridden(tiny_model_dir, trainset, tmp_path):
    from pruner.configs import TrainConfig
    from pruner.train import resolve_from_data

    assert resolve_from_data(TrainConfig(temperature=0.7), {"sampling": {"temperature": 0.5}}).temperature == 0.7
    unrecorded = resolve_from_data(TrainConfig(), {"kind": "sft", "sampling": {"k": 4}})
    assert (unrecorded.temperature, unrecorded.loss) == (1.0, "sft")
    # a real run: the model's log-probs, the cache and the run's config all take the set's 0.5
    sampled = _copy_set(trainset, tmp_path / "t05", {"k": 4, "temperature": 0.5})
    out = tmp_path / "run_t05"
    _run_inline("--model", str(tiny_model_dir), "--data", str(sampled), "--out", str(out), "--global-batch-size", "8",
                "--micro-batch-size", "4", "--max-steps", "1", "--no-export")
    assert json.loads((out / "config.json").read_text())["temperature"] == 0.5
    assert [p.name.split("-")[2] for p in sampled.glob("old_logps-*.safetensors")] == ["t0.5"]


def test_a_round_on_disk_is_reused_only_when_this_run_built_it(trainset, tmp_path):
    from pruner import distributed
    from pruner.manifest import manifest_digest
    from pruner.onpolicy import resample, round_configs, round_dir

    with pytest.raises(ValueError, match="sampling lacks problems"):
        round_configs(trainset, tmp_path / "r", 1)
    sampling = {"problems": "embedded:train", "k": 4, "temperature": 0.5, "top_p": 0.8, "max_new_tokens": 64,
                "seed": 3, "system_prompt": None, "suffix": "", "think": "auto"}
    first = _copy_set(trainset, tmp_path / "first", sampling)
    out = tmp_path / "run"
    presample, dataset = round_configs(first, round_dir(out, 2), 2, samples_per_problem=6)
    assert (presample.seed, presample.k, presample.temperature, presample.system_prompt) == (5, 6, 0.5, "")
    assert presample.limit == json.loads((first / "meta.json").read_text())["num_problems"]
    assert dataset.ref_stats == str(first / "problem_stats.jsonl") and dataset.samples == presample.out
    # a round built by these configs: its folder holds the model, the set and round.json
    folder = round_dir(out, 2)
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "config.json").write_text("{}")
    (folder / "trainset").mkdir()
    (folder / "trainset" / "manifest.json").write_bytes((trainset / "manifest.json").read_bytes())
    record = {"presample": dataclasses.asdict(presample), "dataset": dataclasses.asdict(dataset),
              "trainset_manifest": manifest_digest(folder / "trainset" / "manifest.json")}
    (folder / "round.json").write_text(json.dumps(record))
    d = distributed.init("cpu")
    args = (None, first, out, 2, "unused", d)
    assert resample(*args, samples_per_problem=6, at_round_start=False) == (folder / "model", folder / "trainset")
    # other settings (here: samples per problem), or no record: never trusted; past the round's start, an error
    with pytest.raises(RuntimeError, match="other settings"):
        resample(*args, samples_per_problem=4, at_round_start=False)
    (folder / "round.json").unlink()
    with pytest.raises(RuntimeError, match="incomplete"):
        resample(*args, samples_per_problem=6, at_round_start=False)


def test_rounds_need_the_sets_sampling_settings_before_any_work(tiny_model_dir, trainset, tmp_path):
    # the fixture's samples record only k: --rounds 2 is refused before the first round trains
    with pytest.raises(ValueError, match="sampling lacks problems"):
        _run_inline("--model", str(tiny_model_dir), "--data", str(trainset), "--out", str(tmp_path / "o"),
                    "--rounds", "2", "--global-batch-size", "8", "--micro-batch-size", "4")
    assert not (tmp_path / "o").exists()
