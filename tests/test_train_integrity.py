"""The trainer's run folder: fresh runs never land on another run's checkpoints, --resume only
continues an identical configuration, metrics never mix runs, one writer at a time, and the
old log-prob cache is keyed by the exact tokens it was computed for (issue 12, cases 1-3)."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pruner.manifest import RunStateError

ROOT = Path(__file__).resolve().parent.parent


def _samples(path: Path, model_dir: Path, *, problems: int = 6, k: int = 4, order_seed: int | None = None) -> Path:
    """Samples in pre-sampling's format plus their meta; `order_seed` shuffles the problem order."""
    from conftest import write_samples_meta
    from transformers import AutoTokenizer

    from pruner.prompting import build_prompt

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rng = random.Random(0)
    rows = []
    for p in range(problems):
        prompt = build_prompt(tok, f"problem {p}")
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        for s in range(k):
            ids = [rng.randrange(10, 300) for _ in range(rng.randint(3, 12))] + [tok.eos_token_id]
            rows.append({"problem_id": f"p{p}", "sample_index": s, "prompt": prompt, "prompt_token_ids": prompt_ids,
                         "response": "x", "response_token_ids": ids, "response_tokens": len(ids),
                         "finish_reason": "stop", "correct": (p + s) % 2 == 0, "answer": "1"})
    if order_seed is not None:
        blocks = [rows[i:i + k] for i in range(0, len(rows), k)]
        random.Random(order_seed).shuffle(blocks)
        rows = [r for b in blocks for r in b]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_samples_meta(path, tok, model=model_dir, k=k)
    return path


@pytest.fixture(scope="module")
def trainset(tiny_model_dir, tmp_path_factory) -> Path:
    from pruner.dataset import build_trainset

    root = tmp_path_factory.mktemp("integrity_set")
    return build_trainset(_samples(root / "samples.jsonl", tiny_model_dir), root / "lh", tokenizer=str(tiny_model_dir),
                          report=False)


def _train(model: Path, data: Path, out: Path, *extra: str) -> list[dict]:
    from pruner.train import main

    main(["--model", str(model), "--data", str(data), "--out", str(out), "--global-batch-size", "4",
          "--micro-batch-size", "2", "--lr", "1e-3", "--warmup-ratio", "0", "--no-export", "--ckpt-every", "1", *extra])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


@pytest.mark.slow
def test_fresh_run_refuses_another_runs_folder_and_overwrite_starts_clean(tiny_model_dir, trainset, tmp_path):
    out = tmp_path / "run"
    first = _train(tiny_model_dir, trainset, out, "--max-steps", "3")
    assert [r["step"] for r in first] == [1, 2, 3] and _checkpoints(out) == ["step-0000002", "step-0000003"]
    # case 1: a fresh run with other flags in that folder used to rotate away its own checkpoints
    with pytest.raises(RunStateError, match=r"config\.lr: was 0\.001, now 0\.002"):
        _train(tiny_model_dir, trainset, out, "--max-steps", "1", "--lr", "2e-3")
    with pytest.raises(RunStateError, match="pass --resume"):  # same flags, still not a continuation
        _train(tiny_model_dir, trainset, out, "--max-steps", "3")
    assert _checkpoints(out) == ["step-0000002", "step-0000003"]  # the refusals touched nothing
    second = _train(tiny_model_dir, trainset, out, "--max-steps", "1", "--lr", "2e-3", "--overwrite")
    assert [r["step"] for r in second] == [1] and second[0]["lr"] == pytest.approx(2e-3)
    assert _checkpoints(out) == ["step-0000001"]  # the old run's checkpoints are gone, not mixed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["lr"] == 2e-3 and manifest["inputs"]["data"].startswith("sha256:")


@pytest.mark.slow
def test_resume_refuses_other_data_lr_or_batch_and_continues_the_same(tiny_model_dir, trainset, tmp_path):
    from pruner.dataset import build_trainset

    out = tmp_path / "run"
    _train(tiny_model_dir, trainset, out, "--max-steps", "3", "--stop-after", "1")
    other = build_trainset(_samples(tmp_path / "other.jsonl", tiny_model_dir, problems=5), tmp_path / "other",
                           tokenizer=str(tiny_model_dir), report=False)
    # case 2: each used to be accepted, overwriting config.json and mixing metrics.jsonl
    for flags, field in ((["--lr", "5e-4"], "config.lr"), (["--global-batch-size", "2"], "config.global_batch_size"),
                         (["--data", str(other)], "inputs.data")):
        with pytest.raises(RunStateError, match=field):
            _train(tiny_model_dir, trainset, out, "--max-steps", "3", "--resume", *flags)
    # the volatile flags (--stop-after, --ckpt-every) may differ: the run continues where it stopped
    rows = _train(tiny_model_dir, trainset, out, "--max-steps", "3", "--resume", "--ckpt-every", "5")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["lr"] <= 1e-3 for r in rows)


@pytest.mark.slow
def test_second_writer_is_refused_while_the_first_holds_the_folder(tiny_model_dir, trainset, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from pruner.manifest import OutputLock; "
        f"lock = OutputLock(Path({str(out / '.lock')!r}), 'x').acquire(); print('held', flush=True); time.sleep(120)")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunStateError, match=f"pid={holder.pid}"):
            _train(tiny_model_dir, trainset, out, "--max-steps", "1")
        assert not (out / "manifest.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # the owner died without releasing: the OS dropped its flock, so the folder is free again
    assert [r["step"] for r in _train(tiny_model_dir, trainset, out, "--max-steps", "1")] == [1]
    assert not (out / ".lock").exists()  # released on exit


@pytest.mark.slow
def test_old_logps_cache_is_keyed_by_the_exact_tokens(tiny_model_dir, tmp_path):
    """case 3: the same samples in another problem order have the same token count; the old cache
    (keyed by that count only) was reused with every row misaligned."""
    from pruner import distributed
    from pruner.dataset import build_trainset, load_trainset
    from pruner.modeling import prepare_model
    from pruner.old_logps import attach_response_offsets, content_key, old_logprobs

    d = distributed.init("cpu")
    policy = prepare_model(str(tiny_model_dir), d, liger=False, mixed_precision=False)
    folder = tmp_path / "set"
    tables = []
    for seed in (None, 1):
        samples = _samples(tmp_path / f"s{seed}.jsonl", tiny_model_dir, order_seed=seed)
        build_trainset(samples, folder, tokenizer=str(tiny_model_dir), report=False, overwrite=True)
        data = attach_response_offsets(load_trainset(folder))
        (folder / f"old_logps-stale-{seed}.safetensors").touch()
        flat, path, hit = old_logprobs(policy, data, folder, str(tiny_model_dir), d, temperature=1.0,
                                             micro_batch=4, pad_id=0)
        assert not hit and content_key(data) in path.name
        again, _, hit = old_logprobs(policy, data, folder, str(tiny_model_dir), d, temperature=1.0,
                                           micro_batch=4, pad_id=0)
        assert hit and torch.equal(again, flat)
        tables.append((data, flat))
    (a, flat_a), (b, flat_b) = tables
    assert flat_a.numel() == flat_b.numel() and not torch.equal(flat_a, flat_b)
    assert content_key(a) != content_key(b)
    assert not (folder / "old_logps-stale-None.safetensors").exists()  # --overwrite cleared the old set's cache


def test_an_out_folder_holding_the_training_set_is_refused(tiny_model_dir, trainset):
    # --overwrite would otherwise delete the very training set the run is about to read
    with pytest.raises(RunStateError, match="lies inside the output"):
        _train(tiny_model_dir, trainset, trainset.parent, "--overwrite", "--max-steps", "1")
    assert (trainset / "trainset.safetensors").exists() and not (trainset.parent / "manifest.json").exists()
