"""The samples file format (pruner/samples.py): records, torn-line repair, errors, rewrites, meta, summary."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pruner.configs import PresampleConfig
from pruner.manifest import diff_manifests
from pruner.samples import (append_records, complete_problems, make_record, meta_path, read_meta, read_samples,
                            rewrite_samples, samples_manifest, samples_output, samples_per_problem, short_problems,
                            summarize, summary_path)


def _rec(pid: str, index: int, n_tokens: int = 3, *, correct: bool = True, finish: str = "stop") -> dict:
    return make_record(problem_id=pid, sample_index=index, prompt=f"p {pid}", prompt_token_ids=[1, 2],
                       response="r\nwith a newline", response_token_ids=list(range(n_tokens)), finish_reason=finish,
                       extracted_answer="1", correct=correct, answer="1")


def test_record_fields_in_file_order_and_min_tokens_only_when_known() -> None:
    rec = _rec("7", 0, 4)
    assert list(rec) == ["problem_id", "sample_index", "prompt", "prompt_token_ids", "response", "response_token_ids",
                         "response_tokens", "finish_reason", "extracted_answer", "correct", "answer"]
    assert rec["response_tokens"] == 4 and "min_tokens" not in rec
    with_min = make_record(**{**{k: v for k, v in rec.items() if k != "response_tokens"}, "min_tokens": 9})
    assert list(with_min)[-1] == "min_tokens" and with_min["min_tokens"] == 9
    assert make_record(**{**{k: v for k, v in rec.items() if k != "response_tokens"}, "problem_id": 7})["problem_id"] == "7"


def test_appended_chunks_read_back_and_a_torn_last_line_is_dropped_then_repaired(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    with path.open("a", encoding="utf-8") as fh:
        assert append_records(fh, [_rec("A", 0), _rec("A", 1)]) == 2
        append_records(fh, [_rec("B", 0)])
    whole = path.read_bytes()
    assert read_samples(path) == [_rec("A", 0), _rec("A", 1), _rec("B", 0)]  # newlines inside strings survive
    path.write_bytes(whole + b'{"problem_id": "B", "sample_')  # a kill mid-write
    assert len(read_samples(path)) == 3 and path.read_bytes() != whole  # read-only: the file is untouched
    assert len(read_samples(path, repair=True)) == 3 and path.read_bytes() == whole  # repair cuts the tail


@pytest.mark.parametrize("line, message", [
    (b"not json", r"samples\.jsonl:2: corrupt sample record \(not valid JSON\)"),
    (b"[1, 2]", r"samples\.jsonl:2: a sample record must be a JSON object, got list"),
    (b'{"problem_id": "A"}', r"samples\.jsonl:2: sample record has no field 'sample_index'"),
    (b'{"problem_id": "\xff"}', r"samples\.jsonl:2: invalid UTF-8 at byte 16 of the line"),
])
def test_a_bad_line_before_the_last_names_file_line_and_field(tmp_path: Path, line: bytes, message: str) -> None:
    path = tmp_path / "samples.jsonl"
    good = (json.dumps(_rec("A", 0)) + "\n").encode()
    path.write_bytes(good + line + b"\n" + good)
    with pytest.raises(ValueError, match=message):
        read_samples(path, repair=True)
    assert path.read_bytes() == good + line + b"\n" + good  # an error is not "repaired" away


def test_required_fields_are_the_callers(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    rec = {k: v for k, v in _rec("A", 0).items() if k != "correct"}
    path.write_text(json.dumps(rec) + "\n")
    assert read_samples(path) == [rec]
    with pytest.raises(ValueError, match=r":1: sample record has no field 'correct'"):
        read_samples(path, required=("problem_id", "correct"))
    assert read_samples(tmp_path / "missing.jsonl") == []


def test_rewrite_replaces_the_content_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    rewrite_samples(path, [_rec("A", 0), _rec("B", 0)])
    rewrite_samples(path, [_rec("B", 0)])
    assert read_samples(path) == [_rec("B", 0)] and [p.name for p in tmp_path.iterdir()] == ["samples.jsonl"]


def test_complete_problems_and_short_problems() -> None:
    records = [_rec("A", i) for i in range(3)] + [_rec("B", 0), _rec("B", 2)] + [_rec("C", i) for i in (0, 1, 2, 3)]
    done, extra = complete_problems(records, 3)
    assert list(done) == ["A"] and [r["sample_index"] for r in done["A"]] == [0, 1, 2] and extra
    assert complete_problems(records[:3], 3) == ({"A": records[:3]}, False)
    assert short_problems(records, 3) == ["B (2)"]  # C has 4: not short (duplicates are the builder's check)


def test_summarize_by_hand() -> None:
    records = [_rec("A", 0, 2), _rec("A", 1, 4, correct=False), _rec("B", 0, 9, finish="length")]
    s = summarize(records, wall_s=2.0, new_samples=3)
    assert (s["samples"], s["problems"], s["accuracy"], s["mean_length"], s["median_length"]) == (3, 2, 2 / 3, 5.0, 4)
    assert s["truncated_fraction"] == pytest.approx(1 / 3) and (s["wall_s"], s["samples_per_s"]) == (2.0, 1.5)
    assert summarize([])["accuracy"] == 0.0 and "wall_s" not in summarize([])


def test_paths_beside_the_samples_file() -> None:
    out = Path("runs/x/samples.jsonl")
    assert meta_path(out).name == "samples.jsonl.meta.json" and summary_path(out).name == "samples.summary.json"
    output = samples_output(out)
    assert output.manifest == meta_path(out) and output.lock.name == "samples.jsonl.lock"
    assert output.paths == [out, summary_path(out)]  # what --overwrite deletes


def test_manifest_compares_what_changes_a_sample_only(tiny_model_dir: Path) -> None:
    from pruner.model_files import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    cfg = PresampleConfig(model=str(tiny_model_dir), problems="embedded:train", k=4)
    base = samples_manifest(cfg, str(tiny_model_dir), tok)
    assert base["sampling"]["temperature"] == 0.5 and base["tokenizer_fingerprint"] == base["inputs"]["tokenizer"]
    assert base["samples_format"] == "o1-pruner-samples/1" and base["inputs"]["problems"] == "embedded:train"
    resumed = PresampleConfig(model=str(tiny_model_dir), problems="embedded:train", k=4, limit=3, chunk_problems=1,
                              out="elsewhere.jsonl")
    assert diff_manifests(base, samples_manifest(resumed, str(tiny_model_dir), tok)) == []
    hotter = PresampleConfig(model=str(tiny_model_dir), problems="embedded:train", k=4, temperature=1.0)
    assert diff_manifests(base, samples_manifest(hotter, str(tiny_model_dir), tok)) == [
        "config.temperature: was 0.5, now 1.0"]


def test_read_meta_needs_one_per_file_and_one_tokenizer(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    with pytest.raises(ValueError, match=r"a\.jsonl has no a\.jsonl\.meta\.json: .* --merge OUT SHARD"):
        read_meta([a])
    meta_path(a).write_text(json.dumps({"tokenizer_fingerprint": "x", "config": {"k": 4}, "sampling": {"k": 2}}))
    meta_path(b).write_text(json.dumps({"tokenizer_fingerprint": "y", "sampling": {"k": 2}}))
    assert samples_per_problem(read_meta([a])) == 4 and samples_per_problem(read_meta([b])) == 2
    with pytest.raises(ValueError, match="different tokenizers"):
        read_meta([a, b])
