"""Pre-sampling: K graded records per problem through real vLLM, and crash-safe resume."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from pruner.manifest import RunStateError
from pruner.configs import PresampleConfig
from pruner.presample import run
from pruner.samples import read_samples

ROOT = Path(__file__).resolve().parents[1]
PROBLEMS = [
    {"id": "p0", "problem": "What is 1 + 1?", "answer": "2", "min_tokens": 5},
    {"id": "p1", "problem": "What is 2 + 3?", "answer": "5", "min_tokens": 6},
    {"id": "p2", "problem": "What is 7 - 4?", "answer": "3", "min_tokens": 7},
]
FIELDS = {"problem_id", "sample_index", "prompt", "prompt_token_ids", "response", "response_token_ids",
          "response_tokens", "finish_reason", "extracted_answer", "correct", "answer", "min_tokens"}


def _problems_file(tmp: Path, problems: list[dict] = PROBLEMS) -> Path:
    path = tmp / "problems.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in problems))
    return path


def _keys(records: list[dict]) -> list[tuple[str, int]]:
    return [(r["problem_id"], r["sample_index"]) for r in records]


@pytest.fixture(scope="module")
def vllm_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real vLLM pre-sampling run (engine start dominates: ~30-60 s on 2 shared cores)."""
    tmp = tmp_path_factory.mktemp("presample")
    out = tmp / "samples.jsonl"
    cmd = [sys.executable, "-m", "pruner.presample", "--model", str(tiny_model_dir),
           "--problems", str(_problems_file(tmp)), "--out", str(out), "--k", "3",
           "--max-new-tokens", "12", "--chunk-problems", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.mark.slow
def test_vllm_writes_k_records_per_problem(vllm_run: Path, tiny_model_dir: Path) -> None:
    records = read_samples(vllm_run)
    assert sorted(_keys(records)) == [(p["id"], i) for p in PROBLEMS for i in range(3)]
    for rec in records:
        assert set(rec) == FIELDS
        assert rec["response_tokens"] == len(rec["response_token_ids"]) <= 12
        assert rec["finish_reason"] in ("stop", "length")
        assert rec["prompt"].endswith("<|im_start|>assistant\n")
        if rec["finish_reason"] == "length":
            assert rec["correct"] is False
    meta = json.loads(vllm_run.with_name("samples.jsonl.meta.json").read_text())
    assert meta["model"] == str(tiny_model_dir.resolve()) and meta["tokenizer_fingerprint"].startswith("sha256:")
    summary = json.loads(vllm_run.with_name("samples.summary.json").read_text())
    assert summary["samples"] == 9 and summary["problems"] == 3 and summary["samples_per_s"] > 0
    log = vllm_run.with_name("vllm.log")  # vLLM's start-up output went here, not to the console
    assert summary["vllm_log"] == str(log) and "vllm" in log.read_text().lower()


class FakeLLM:
    """Stands in for vllm.LLM: deterministic per-request samples, no engine start."""

    def __init__(self) -> None:
        self.requests = 0

    def generate(self, inputs: list, sampling: list, use_tqdm: bool = False) -> list:
        outs = []
        for params in sampling if isinstance(sampling, list) else [sampling] * len(inputs):
            self.requests += 1
            completions = []
            for j in range(params.n):
                base = sum(inputs[len(outs)]["prompt_token_ids"])  # deterministic per prompt
                ids = [(base + j) % 300 + 1] * (j + 1)
                text = rf"so \boxed{{{j + 1}}}"
                completions.append(SimpleNamespace(text=text, token_ids=ids, finish_reason="stop"))
            outs.append(SimpleNamespace(outputs=completions, metrics=None))
        return outs


def _cfg(tmp: Path, model: Path, **kw) -> PresampleConfig:
    return PresampleConfig(model=str(model), problems=str(_problems_file(tmp)), out=str(tmp / "s.jsonl"),
                           k=3, max_new_tokens=8, chunk_problems=1, **kw)


def test_resume_after_torn_line_and_partial_problem(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = _cfg(tmp_path, tiny_model_dir)
    run(cfg, llm=FakeLLM())
    out = Path(cfg.out)
    full = out.read_text().splitlines(keepends=True)
    assert len(full) == 9
    # a kill -9 mid-write: problem p2 has one whole sample and one torn line
    out.write_text("".join(full[:7]) + full[7][: len(full[7]) // 2])
    fake = FakeLLM()
    summary = run(cfg, llm=fake)
    assert fake.requests == 1  # only the incomplete problem is sampled again
    records = read_samples(out)
    assert sorted(_keys(records)) == sorted(_keys([json.loads(x) for x in full]))  # no gaps, no duplicates
    assert [json.loads(x) for x in full] == records  # same order and content as the uninterrupted run
    assert summary["samples"] == 9 and summary["new_samples_this_run"] == 3
    # p1's answer is 5 but the fake boxes 1..3: all wrong; p0 (answer 2): sample 1 right
    assert [r["correct"] for r in records if r["problem_id"] == "p0"] == [False, True, False]


def test_complete_file_resumes_to_nothing_and_bad_middle_line_is_an_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = _cfg(tmp_path, tiny_model_dir)
    run(cfg, llm=FakeLLM())
    fake = FakeLLM()
    run(cfg, llm=fake)
    assert fake.requests == 0
    out = Path(cfg.out)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + "{broken\n" + "".join(lines[1:]))
    with pytest.raises(ValueError, match=r"s.jsonl:2"):
        read_samples(out)


def test_refuses_resume_with_other_settings(tmp_path: Path, tiny_model_dir: Path) -> None:
    run(_cfg(tmp_path, tiny_model_dir), llm=FakeLLM())
    with pytest.raises(RunStateError, match="config.temperature: was 0.5, now 0.9"):
        run(_cfg(tmp_path, tiny_model_dir, temperature=0.9), llm=FakeLLM())


def test_shards_partition_the_problems(tmp_path: Path, tiny_model_dir: Path) -> None:
    ids = []
    for i in range(2):
        summary = run(_cfg(tmp_path, tiny_model_dir, shard=f"{i}/2"), llm=FakeLLM())
        ids += [r["problem_id"] for r in read_samples(Path(summary["out"]))]
    assert sorted(set(ids)) == ["p0", "p1", "p2"] and len(ids) == 9
