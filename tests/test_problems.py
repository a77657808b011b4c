"""Problem loading: every shared data format, error messages, skipped records."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import shared_data

from pruner.problems import ProblemFormatError, load_problems

DATA = shared_data("")  # the shared data folder ($O1PRUNER_DATA or the nearest shared/data above the checkout)
needs_data = pytest.mark.skipif(not DATA.exists(), reason="shared data sets not present")

# file -> (problems kept, first id, first answer)
EXPECTED = {
    "math500.jsonl": (500, "test/precalculus/807.json", r"\left( 3, \frac{\pi}{2} \right)"),
    "gsm8k_test.jsonl": (1319, "0", "18"),
    "aime24.jsonl": (30, "60", "204"),
    "amc23.jsonl": (40, "0", "27"),
    "o1pruner/math_test.json": (458, "math_test-0", "28800"),
    "o1pruner/gsm8k.json": (1319, "gsm8k-0", "18"),
    "o1pruner/gaokao.json": (383, "gaokao-0", r"$\{x|-2\leq x < 1\}$"),
    "o1pruner/math_train_hard.json": (408, "math_train_hard-0", r"40^\circ"),
}


@needs_data
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_shared_file_loads(name: str) -> None:
    count, first_id, first_answer = EXPECTED[name]
    problems = load_problems(DATA / name)
    assert len(problems) == count
    assert problems[0]["id"] == first_id and problems[0]["answer"] == first_answer
    assert len({p["id"] for p in problems}) == count
    assert all(isinstance(p["problem"], str) and p["problem"] and p["answer"] for p in problems)


@needs_data
def test_skipped_records_are_counted_and_named(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pruner.problems"):
        load_problems(DATA / "o1pruner" / "math_train_hard.json")
    text = caplog.text
    assert "skipped 3 record(s)" in text and "math_train_hard-223" in text


@needs_data
def test_extra_fields_kept_and_limit() -> None:
    problems = load_problems(DATA / "math500.jsonl", limit=3)
    assert len(problems) == 3 and problems[0]["level"] == 2 and "solution" in problems[0]


def test_gsm8k_worked_answer_reduced(tmp_path: Path) -> None:
    path = tmp_path / "g.jsonl"
    rows = [{"question": "q1", "answer": "3 + 4 = <<3+4=7>>7\n#### 1,007"}, {"question": "q2", "answer": 2.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems = load_problems(path)
    assert [p["answer"] for p in problems] == ["1007", "2"]
    assert [p["id"] for p in problems] == ["g-0", "g-1"]


def test_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"problem": "a", "answer": "1"}\n{"problem": "b", "answer": \n')
    with pytest.raises(ProblemFormatError, match=rf"{path}:2"):
        load_problems(path)


def test_missing_problem_field_names_field(tmp_path: Path) -> None:
    path = tmp_path / "odd.jsonl"
    path.write_text('{"text": "a", "answer": "1"}\n')
    with pytest.raises(ProblemFormatError, match=r"odd.jsonl:1.*problem"):
        load_problems(path)
    problems = load_problems(path, problem_field="text")
    assert problems[0]["problem"] == "a"


def test_field_flags_and_json_list(tmp_path: Path) -> None:
    path = tmp_path / "custom.json"
    path.write_text(json.dumps([{"q": "x?", "sol": "5", "key": "k1"}, {"q": "y?", "sol": None, "key": "k2"}]))
    problems = load_problems(path, problem_field="q", answer_field="sol", id_field="key")
    assert problems == [{"id": "k1", "problem": "x?", "answer": "5", "key": "k1"}]


def test_unknown_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ProblemFormatError, match="unsupported file type"):
        (tmp_path / "p.csv").write_text("a,b\n")
        load_problems(tmp_path / "p.csv")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="datasets"):
            load_problems("no-such-org/no-such-dataset")


def test_a_missing_problems_file_is_named_not_looked_up_on_the_hub(tmp_path: Path, monkeypatch) -> None:
    # A fresh clone without ../shared/data: the README's command must say the file is missing, not
    # hand the path to `datasets` as a hub id (which failed deep in datasets' loader, or tried the network).
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"problems file ../shared/data/o1pruner/math_train_hard.json does not exist"):
        load_problems("../shared/data/o1pruner/math_train_hard.json")


def test_embedded_task_when_present() -> None:
    pruner = pytest.importorskip("pruner")
    if not hasattr(pruner, "default_problems"):
        pytest.skip("embedded task not landed yet")
    problems = load_problems("embedded:test", limit=5)
    assert len(problems) == 5 and all(p["answer"] and isinstance(p["id"], str) for p in problems)


@pytest.mark.parametrize("limit", [0, -1, -5])
def test_limit_zero_or_negative_is_an_error_everywhere(tmp_path: Path, limit: int) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"problem": f"q{i}", "answer": str(i)}) + "\n" for i in range(3)))
    for source in (path, "embedded:train"):
        with pytest.raises(ValueError, match=f"limit must be a positive number of problems or None for all, got {limit}"):
            load_problems(source, limit=limit)
    assert len(load_problems(path, limit=2)) == 2 and len(load_problems(path)) == 3
    assert len(load_problems("embedded:train", limit=2)) == 2


def test_invalid_utf8_names_file_and_line(tmp_path: Path) -> None:
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_bytes(b'{"problem": "q", "answer": "1"}\n{"problem": "\xff", "answer": "2"}\n')
    with pytest.raises(ProblemFormatError, match=r"p\.jsonl:2: invalid UTF-8"):
        load_problems(jsonl)
    whole = tmp_path / "p.json"
    whole.write_bytes(b'[{"problem": "q", "answer": "1"},\n {"problem": "\xff", "answer": "2"}]')
    with pytest.raises(ProblemFormatError, match=r"p\.json:2: invalid UTF-8"):
        load_problems(whole)
