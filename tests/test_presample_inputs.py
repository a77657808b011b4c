"""Pre-sampling's inputs (issue 25): the summary and meta describe the file, a re-pathed model
continues, and bad problem files are refused early and clearly."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
from test_presample import FakeLLM, _cfg


def _problems_file(tmp: Path, rows: list[dict]) -> Path:
    """Not test_presample's: `_cfg` rewrites that file name."""
    path = tmp / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path

from pruner.presample import run
from pruner.problems import MAX_PROBLEM_CHARS, ProblemFormatError, load_problems
from pruner.samples import meta_path, summary_path


def test_a_narrowed_limit_on_resume_keeps_summary_and_meta_describing_the_file(tmp_path: Path,
                                                                               tiny_model_dir: Path) -> None:
    cfg = _cfg(tmp_path, tiny_model_dir)
    run(cfg, llm=FakeLLM())
    fake = FakeLLM()
    summary = run(dataclasses.replace(cfg, limit=1), llm=fake)
    assert fake.requests == 0
    assert summary["problems"] == 3 and summary["samples"] == 9   # the file's, not this run's 1 problem
    assert json.loads(summary_path(Path(cfg.out)).read_text())["problems"] == 3
    assert json.loads(meta_path(Path(cfg.out)).read_text())["contents"] == {"problems": 3, "samples": 9}


def test_the_same_model_named_by_a_relative_path_continues(tmp_path: Path, tiny_model_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(tmp_path, tiny_model_dir.resolve())
    run(cfg, llm=FakeLLM())
    monkeypatch.chdir(tiny_model_dir.resolve().parent)
    fake = FakeLLM()
    summary = run(dataclasses.replace(cfg, model=tiny_model_dir.resolve().name), llm=fake)
    assert fake.requests == 0 and summary["samples"] == 9


def test_a_problem_file_with_no_usable_answer_is_refused_naming_its_fields(tmp_path: Path,
                                                                          tiny_model_dir: Path) -> None:
    path = _problems_file(tmp_path, [{"question": "1 + 1?", "solution": "2", "idx": 1},
                                     {"question": "2 + 2?", "solution": "4", "idx": 2}])
    with pytest.raises(ProblemFormatError, match=r"none of its 2 record\(s\) has a usable answer.*"
                                                 r"\['idx', 'question', 'solution'\].*--answer-field"):
        load_problems(path)
    with pytest.raises(ProblemFormatError, match="usable answer"):
        run(dataclasses.replace(_cfg(tmp_path, tiny_model_dir), problems=str(path)), llm=FakeLLM())
    assert not (tmp_path / "s.jsonl").exists() and not meta_path(tmp_path / "s.jsonl").exists()
    assert load_problems(path, answer_field="solution")[1]["answer"] == "4"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ProblemFormatError, match="no problems in the file"):
        load_problems(empty)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_utf8_bom_is_accepted(tmp_path: Path, suffix: str) -> None:
    rows = [{"id": "a", "problem": "1 + 1?", "answer": "2"}, {"id": "b", "problem": "2 + 2?", "answer": "4"}]
    text = "".join(json.dumps(r) + "\n" for r in rows) if suffix == ".jsonl" else json.dumps(rows)
    path = tmp_path / f"p{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert [p["id"] for p in load_problems(path)] == ["a", "b"]


def test_a_huge_problem_is_refused_before_any_tokenizer_work(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = _problems_file(tmp_path, [{"id": "ok", "problem": "1 + 1?", "answer": "2"},
                                     {"id": "big", "problem": "x" * 10_000_000, "answer": "1"}])
    t0 = time.perf_counter()
    with pytest.raises(ProblemFormatError, match=rf"bad.jsonl:2: field 'problem' holds 10000000 characters.*"
                                                 rf"{MAX_PROBLEM_CHARS}"):
        run(dataclasses.replace(_cfg(tmp_path, tiny_model_dir), problems=str(path)), llm=FakeLLM())
    assert time.perf_counter() - t0 < 5.0


def test_a_model_folder_without_tokenizer_files_names_them(tmp_path: Path, tiny_model_dir: Path) -> None:
    import shutil

    from pruner.model_files import TOKENIZER_FILES, load_tokenizer

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare, ignore=shutil.ignore_patterns("tokenizer*", "vocab*", "merges*",
                                                                         "special_tokens*", "added_tokens*"))
    with pytest.raises(FileNotFoundError, match=rf"{bare}: no tokenizer files \(looked for {TOKENIZER_FILES[0]}"):
        load_tokenizer(bare)
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        run(_cfg(tmp_path, bare), llm=FakeLLM())


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused_before_the_engine(tmp_path: Path,
                                                                                  tiny_model_dir: Path) -> None:
    import shutil

    small = tmp_path / "small-vocab"
    shutil.copytree(tiny_model_dir, small)
    config = json.loads((small / "config.json").read_text())
    config["vocab_size"] = 16
    (small / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tokenizer has \d+ tokens, more than the 16 rows of .*vocab_size"):
        run(_cfg(tmp_path, small), llm=None)   # no engine given: the refusal comes before one would start
