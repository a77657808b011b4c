"""The rehearsal (`make rehearsal`): the four stages on a random-weight 2-layer Qwen2 of each model family,
with Qwen's real vocabulary (151,643 ranks, 151,936 rows), each stage in its own process as a user runs it.

Per family: pre-sampling (vLLM), the training set, one training step (torchrun) with the export, and the
speed benchmark of base against export. Checked: the prompt ids (one path, one BOS), EOS handling (every
stop is on an EOS id, generation_config's included; no EOS appended twice), decode equal to the text,
ids from the padded rows (sampled, kept through the set), and that the export reloads and records how it
was sampled. Results and times per family and stage: runs/rehearsal/results.json. Minutes on a CPU; left
out of `make test` (tests/conftest.py deselects the `rehearsal` marker unless `-m` names it).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.family_fixtures import FAMILIES, VOCAB_ROWS, model_folder

pytestmark = pytest.mark.rehearsal
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "runs" / "rehearsal"
K, PROBLEMS, MAX_NEW = 4, 4, 48


def _stage(log: Path, module: str, cfg, launcher: tuple[str, ...] = ()) -> str:
    """Run a stage from its config in a fresh process (as pruner.cli.run_stage does); its output goes to `log`."""
    from pruner.cli import to_argv

    cmd = [sys.executable, *launcher, "-m", module, *to_argv(cfg)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'kernels'}", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    log.write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    assert proc.returncode == 0, f"{module} failed (log {log}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def _record(family: str, stage: str, seconds: float, checks: dict) -> None:
    path = OUT / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results.setdefault(family, {})[stage] = {"passed": True, "seconds": round(seconds, 1), **checks}
    path.write_text(json.dumps(results, indent=2) + "\n")


def _held_back(tok, ids: list[int], text: str) -> int | None:
    """How many final tokens the text lacks: 0 when decode(ids) == text. vLLM's streaming detokenizer holds
    back a token that ends inside a character (a full decode shows U+FFFD) and drops it when the sample
    ends; that is the one difference allowed. None: the text differs otherwise."""
    for held in range(0, min(4, len(ids)) + 1):
        if tok.decode(ids[:len(ids) - held], skip_special_tokens=True) == text:
            return held if held == 0 or "\ufffd" in tok.decode(ids[len(ids) - held:]) else None
    return None


def _check_samples(family: str, model: Path, records: list[dict], tok) -> dict:
    from pruner.embedded import default_problems
    from pruner.families import resolve_prompt
    from pruner.model_files import eos_token_ids
    from pruner.prompting import encode_prompt

    problems = {str(p["id"]): p["problem"] for p in default_problems("test")}
    settings = resolve_prompt(tok, model=model)
    for rec in records:  # the ids vLLM got are the ones the prompt path makes (generate() refuses others)
        assert rec["prompt"] == settings.render(tok, problems[str(rec["problem_id"])])
        assert rec["prompt_token_ids"] == encode_prompt(tok, rec["prompt"])
    first = records[0]["prompt_token_ids"]
    if FAMILIES[family]["bos"]:
        assert first[0] == FAMILIES[family]["bos_id"] and first[1] != first[0], first[:3]  # one BOS
    eos = eos_token_ids(tok, model)
    stops = [r for r in records if r["finish_reason"] == "stop"]
    assert stops, "no sample stopped: EOS never sampled"
    partial = 0
    for r in records:
        ids = r["response_token_ids"]
        assert not set(ids[:-1]) & set(eos), "an EOS inside a response: the engine did not stop on it"
        assert r["finish_reason"] != "stop" or ids[-1] in eos, (ids[-3:], eos)
        held = _held_back(tok, [t for t in ids if t not in eos], r["response"])
        assert held is not None, (tok.decode(ids, skip_special_tokens=True)[-30:], r["response"][-30:])
        partial += held > 0
    padded = sum(1 for r in records for t in r["response_token_ids"] if t >= len(tok))
    assert padded, "no id from the padded rows was sampled"
    return {"samples": len(records), "stopped_on": sorted({r["response_token_ids"][-1] for r in stops}),
            "truncated": len(records) - len(stops), "padded_row_ids": padded, "first_prompt_ids": first[:4],
            "decode_equals_text": len(records) - partial, "text_lacks_trailing_partial_utf8": partial}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_rehearsal(family: str) -> None:
    from transformers import AutoModelForCausalLM

    from pruner.configs import DatasetConfig, PresampleConfig, SpeedConfig, TrainConfig
    from pruner.families import SAMPLING_FILE
    from pruner.model_files import load_tokenizer, tokenizer_fingerprint
    from pruner.samples import meta_path, read_samples
    from pruner.trainset import load_trainset

    root = OUT / family
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    model = model_folder(family, root / "model")
    tok = load_tokenizer(model)

    t = time.perf_counter()
    samples = root / "samples.jsonl"
    log = _stage(root / "presample.log", "pruner.presample", PresampleConfig(
        model=str(model), problems="embedded:test", out=str(samples), k=K, limit=PROBLEMS, temperature=1.0,
        top_p=1.0, max_new_tokens=MAX_NEW, dtype="float32"))
    assert "prompt: family " in log and "first prompt" in log
    records = read_samples(samples)
    _record(family, "presample", time.perf_counter() - t, _check_samples(family, model, records, tok))

    t = time.perf_counter()
    _stage(root / "dataset.log", "pruner.dataset", DatasetConfig(samples=str(samples), out=str(root / "trainset"),
                                                                 report=False))
    ts = load_trainset(root / "trainset")
    by_problem = {r["prompt"]: r["prompt_token_ids"] for r in records}
    starts, lens = ts["offsets"].tolist(), ts["prompt_lengths"].tolist()
    prompts = [ts["input_ids"][s:s + n].tolist() for s, n in zip(starts, lens)]
    assert all(p in by_problem.values() for p in prompts)  # the trainer's prompt ids are pre-sampling's
    assert int(ts["input_ids"].max()) >= len(tok)  # padded-row ids kept (below the model's 151,936 rows)
    assert int(ts["input_ids"].max()) < VOCAB_ROWS
    assert ts["meta"]["eos_appended"]["count"] == 0  # every stop ended on an EOS already
    _record(family, "dataset", time.perf_counter() - t, {"rows": len(prompts)})

    t = time.perf_counter()
    train_out = root / "train"
    _stage(root / "train.log", "pruner.train", TrainConfig(
        model=str(model), data=str(root / "trainset"), out=str(train_out), global_batch_size=8, micro_batch_size=4,
        max_steps=1, lr=1e-4, device="cpu", plan_check=False),
        launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"))
    export = train_out / "export"
    reloaded = AutoModelForCausalLM.from_pretrained(export)
    assert reloaded.config.vocab_size == VOCAB_ROWS
    assert tokenizer_fingerprint(load_tokenizer(export)) == tokenizer_fingerprint(tok)
    assert json.loads((export / "generation_config.json").read_text())["eos_token_id"] == \
        FAMILIES[family]["generation_eos"]
    recorded = json.loads((export / SAMPLING_FILE).read_text())
    assert recorded == json.loads(meta_path(samples).read_text())["sampling"]  # the export says how it was sampled
    _record(family, "train", time.perf_counter() - t, {"export_reloads": True, "sampling_record": recorded})

    t = time.perf_counter()
    log = _stage(root / "speed.log", "bench.speed", SpeedConfig(
        models=[f"base={model}", f"pruned={export}"], data=["embedded:test"], limit=PROBLEMS, n=2,
        max_new_tokens=16, warmup=1, out=str(root / "bench"), overwrite=True))
    shown = re.findall(r"first prompt, (\d+) tokens, ids \[([\d, ]+)\]", log)
    first = records[0]["prompt_token_ids"]
    assert shown and all(int(n) == len(first) and [int(x) for x in ids.split(",")] == first[:4] for n, ids in shown), \
        (shown, first[:4])  # both workers rendered the first problem as pre-sampling did
    assert (root / "bench" / "results.json").exists()
    _record(family, "speed", time.perf_counter() - t, {"workers_first_prompt": len(shown)})
