"""The training set: rewards computed by hand for every edge case, baselines, format contract."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pruner.dataset import build_trainset, load_trainset
from pruner.model_files import load_tokenizer
from conftest import write_samples_meta

LAM = 2.0


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path):
    return load_tokenizer(tiny_model_dir)


def _sample(pid: str, i: int, n_tokens: int, correct: bool, eos: int, *, finish: str = "stop",
            prompt: str | None = None, with_eos: bool = True) -> dict:
    """A response of `n_tokens` tokens in total (EOS included when `with_eos`)."""
    body = [5 + (i % 7)] * (n_tokens - 1 if with_eos and n_tokens else n_tokens)
    ids = body + ([eos] if with_eos and n_tokens else [])
    return {"problem_id": pid, "sample_index": i, "prompt": prompt or f"prompt of {pid}",
            "prompt_token_ids": [1, 2, 3], "response": "x", "response_token_ids": ids,
            "response_tokens": len(ids), "finish_reason": finish, "extracted_answer": None,
            "correct": correct, "answer": "1"}


def _write(tmp: Path, samples: list[dict], tok=None) -> Path:
    path = tmp / "samples.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    if tok is not None:
        write_samples_meta(path, tok)
    return path


def _build(tmp: Path, samples: list[dict], tok, **kw) -> dict:
    out = build_trainset(_write(tmp, samples, tok), tmp / "ts", tokenizer=tok, report=kw.pop("report", False),
                         overwrite=True, **kw)
    return load_trainset(out)


def _r(ref_len: float, length: int, a: float, ref_acc: float) -> float:
    """The paper's reward by hand: Lbar / L - 1 + lam (A - Abar), clipped to [-2, 4]."""
    return min(4.0, max(-2.0, ref_len / length - 1 + LAM * (a - ref_acc)))


def test_rewards_by_hand_and_standardised(tmp_path: Path, tok) -> None:
    eos = tok.eos_token_id
    # P: lengths 2,4,4,6, correct 1,1,0,0 -> Lbar 4, Abar 0.5
    # W (all wrong): lengths 1,3 -> Lbar 2, Abar 0;  R (all right): lengths 10,30 -> Lbar 20, Abar 1
    samples = [_sample("P", i, n, c, eos) for i, (n, c) in enumerate([(2, 1), (4, 1), (4, 0), (6, 0)])]
    samples += [_sample("W", 0, 1, False, eos), _sample("W", 1, 3, False, eos)]
    samples += [_sample("R", 0, 10, True, eos), _sample("R", 1, 30, True, eos)]
    ts = _build(tmp_path, samples, tok)
    expected = [_r(4, 2, 1, .5), _r(4, 4, 1, .5), _r(4, 4, 0, .5), _r(4, 6, 0, .5),
                _r(2, 1, 0, 0), _r(2, 3, 0, 0), _r(20, 10, 1, 1), _r(20, 30, 1, 1)]
    assert expected[:4] == [2.0, 1.0, -1.0, pytest.approx(4 / 6 - 2)]
    t = ts
    assert t["rewards"].tolist() == pytest.approx(expected, abs=1e-6)
    e = torch.tensor(expected, dtype=torch.float64)
    assert t["advantages"].tolist() == pytest.approx(((e - e.mean()) / e.std(unbiased=False)).tolist(), abs=1e-5)
    assert ts["meta"]["reward_std"] == pytest.approx(float(e.std(unbiased=False)), abs=1e-6)
    stats = {s["id"]: s for s in ts["stats"]}
    assert (stats["P"]["ref_mean_length"], stats["P"]["ref_mean_accuracy"], stats["P"]["k"]) == (4.0, 0.5, 4)
    assert t["problem_index"].tolist() == [0, 0, 0, 0, 1, 1, 2, 2]


def test_format_contract(tmp_path: Path, tok) -> None:
    eos = tok.eos_token_id
    samples = [_sample("A", 0, 3, True, eos), _sample("A", 1, 5, False, eos)]
    ts = _build(tmp_path, samples, tok, report=True)
    t, meta = {k: v for k, v in ts.items() if k not in ("meta", "stats")}, ts["meta"]
    dtypes = {"input_ids": torch.int32, "offsets": torch.int64, "prompt_lengths": torch.int32,
              "response_lengths": torch.int32, "rewards": torch.float32, "advantages": torch.float32,
              "correct": torch.uint8, "problem_index": torch.int64}
    assert {k: v.dtype for k, v in t.items()} == dtypes
    assert t["offsets"].tolist() == [0, 6, 14] and t["input_ids"].numel() == 14
    seq1 = t["input_ids"][6:14].tolist()
    assert seq1[:3] == [1, 2, 3] and seq1[-1] == eos and t["prompt_lengths"].tolist() == [3, 3]
    for key in ("format", "kind", "model", "tokenizer_fingerprint", "lam", "clip", "reward_mean", "reward_std",
                "num_samples", "num_problems", "samples_file", "keep_per_problem", "eos_appended"):
        assert key in meta
    assert meta["format"] == "o1-pruner-trainset/1" and meta["num_samples"] == 2
    # the samples' sampling settings travel on: the trainer takes its log-prob temperature from them
    samples_meta = json.loads((tmp_path / "samples.jsonl.meta.json").read_text())
    assert meta["sampling"] == samples_meta["sampling"] is not None
    report = tmp_path / "ts" / "report"
    assert {p.name for p in report.iterdir()} >= {"summary.json", "report.md", "accuracy_vs_length.png", "length_hist.png"}


def test_k1_all_zero_reward_std0(tmp_path: Path, tok) -> None:
    eos = tok.eos_token_id
    ts = _build(tmp_path, [_sample("A", 0, 3, True, eos), _sample("B", 0, 7, False, eos)], tok)
    assert ts["rewards"].tolist() == [0.0, 0.0]
    assert ts["advantages"].tolist() == [0.0, 0.0] and ts["meta"]["reward_std"] == 0.0


def test_truncated_empty_and_missing_eos(tmp_path: Path, tok) -> None:
    eos = tok.eos_token_id
    samples = [
        _sample("A", 0, 4, True, eos, finish="length", with_eos=False),  # truncated: wrong, no EOS added
        _sample("A", 1, 0, False, eos, with_eos=False),                  # empty stop -> [EOS], L = 1
        _sample("A", 2, 2, True, eos, with_eos=False),                   # stopped, EOS missing -> appended, L = 3
    ]
    ts = _build(tmp_path, samples, tok)
    t = ts
    assert t["response_lengths"].tolist() == [4, 1, 3] and t["correct"].tolist() == [0, 0, 1]
    ref_len, ref_acc = (4 + 1 + 3) / 3, 1 / 3
    assert t["rewards"].tolist() == pytest.approx([_r(ref_len, 4, 0, ref_acc), _r(ref_len, 1, 0, ref_acc),
                                                   _r(ref_len, 3, 1, ref_acc)], abs=1e-6)
    ends = [t["input_ids"][int(t["offsets"][i + 1]) - 1].item() for i in range(3)]
    assert ends[0] != eos and ends[1] == eos and ends[2] == eos
    assert ts["meta"]["eos_appended"]["count"] == 2


def test_clip_at_both_ends(tmp_path: Path, tok) -> None:
    eos = tok.eos_token_id
    # nine right of length 1 and one wrong of length 991: Lbar = 100, Abar = 0.9
    # right: 100/1 - 1 + 2 * 0.1 = 99.2 -> 4; wrong: 100/991 - 1 - 2 * 0.9 = -2.70 -> -2
    samples = [_sample("A", i, 1, True, eos) for i in range(9)] + [_sample("A", 9, 991, False, eos)]
    ts = _build(tmp_path, samples, tok)
    assert ts["rewards"].tolist() == [4.0] * 9 + [-2.0]


def test_duplicate_problems_merge(tmp_path: Path, tok) -> None:
    eos = tok.eos_token_id
    samples = [_sample("A", 0, 2, True, eos, prompt="same"), _sample("B", 0, 6, False, eos, prompt="same")]
    ts = _build(tmp_path, samples, tok)
    assert ts["meta"]["num_problems"] == 1 and ts["stats"][0]["ids"] == ["A", "B"]
    assert ts["rewards"].tolist() == pytest.approx([_r(4, 2, 1, .5), _r(4, 6, 0, .5)])


def test_keep_per_problem_uses_all_k_for_stats(tmp_path: Path, tok) -> None:
    eos = tok.eos_token_id
    samples = [_sample("A", i, 2 + i, i % 2 == 0, eos) for i in range(8)]
    a = _build(tmp_path, samples, tok, keep_per_problem=2, seed=3)
    b = _build(tmp_path, samples, tok, keep_per_problem=2, seed=3)
    assert a["meta"]["num_samples"] == 2 and torch.equal(a["input_ids"], b["input_ids"])
    assert a["stats"][0]["ref_mean_length"] == pytest.approx(sum(2 + i for i in range(8)) / 8)


def test_sft_and_dpo_selection(tmp_path: Path, tok) -> None:
    eos = tok.eos_token_id
    samples = [_sample("A", i, n, c, eos) for i, (n, c) in enumerate([(9, 1), (5, 1), (7, 0), (3, 0), (5, 1)])]
    samples += [_sample("B", i, n, False, eos) for i, n in enumerate([4, 6])]  # no correct: skipped
    samples += [_sample("C", i, n, True, eos) for i, n in enumerate([4, 8])]   # all right: longest rejected
    sft = _build(tmp_path, samples, tok, kind="sft")
    assert sft["response_lengths"].tolist() == [5, 4] and sft["advantages"].tolist() == [1.0, 1.0]
    dpo = _build(tmp_path, samples, tok, kind="dpo")
    assert dpo["response_lengths"].tolist() == [5, 7, 4, 8]  # A: shortest right vs longest wrong
    assert dpo["pair_index"].tolist() == [0, 0, 1, 1] and dpo["chosen"].tolist() == [1, 0, 1, 0]
    assert dpo["advantages"].tolist() == [1.0, -1.0, 1.0, -1.0]


def test_ref_stats_override(tmp_path: Path, tok) -> None:
    eos = tok.eos_token_id
    first = build_trainset(_write(tmp_path, [_sample("A", 0, 10, True, eos), _sample("A", 1, 30, False, eos)], tok),
                           tmp_path / "orig", tokenizer=tok, report=False)
    new = tmp_path / "round1"
    new.mkdir()
    ts = load_trainset(build_trainset(_write(new, [_sample("A", 0, 5, True, eos)], tok), new / "ts",
                                      tokenizer=tok, ref_stats=first, report=False))
    assert ts["rewards"].tolist() == pytest.approx([_r(20, 5, 1, 0.5)])


def test_other_tokenizer_is_detected(tmp_path: Path, tok, tiny_model_dir: Path) -> None:
    eos = tok.eos_token_id
    path = _write(tmp_path, [_sample("A", 0, 3, True, eos)])
    Path(str(path) + ".meta.json").write_text(json.dumps({"model": str(tiny_model_dir), "tokenizer_fingerprint": "sha256:other"}))
    with pytest.raises(ValueError, match="fingerprint"):
        build_trainset(path, tmp_path / "ts", tokenizer=tok, report=False)


def test_tokenizer_given_as_folder(tmp_path: Path, tok, tiny_model_dir: Path) -> None:
    path = _write(tmp_path, [_sample("A", 0, 3, True, tok.eos_token_id)], tok)
    ts = load_trainset(build_trainset(path, tmp_path / "ts", tokenizer=str(tiny_model_dir), report=False))
    assert ts["meta"]["model"] == str(tiny_model_dir) and ts["meta"]["num_samples"] == 1


def test_ids_past_the_tokenizer_are_kept_up_to_the_models_vocabulary(tmp_path: Path, tok, tiny_model_dir: Path) -> None:
    # Embedding rows padded past the tokenizer can be sampled at temperature 1: they are the model's
    # own outputs. Ids past the model's rows are corrupt data and name the file.
    import shutil

    model = tmp_path / "padded"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["vocab_size"] = len(tok) + 64
    (model / "config.json").write_text(json.dumps(config))
    eos = tok.eos_token_id
    ok = _sample("A", 0, 3, True, eos)
    ok["response_token_ids"] = [len(tok) + 5, 6, eos]
    ts = load_trainset(build_trainset(_write(tmp_path, [ok], tok), tmp_path / "ts", tokenizer=str(model), report=False))
    assert ts["meta"]["num_samples"] == 1 and len(tok) + 5 in ts["input_ids"].tolist()
    bad = dict(ok, response_token_ids=[len(tok) + 64, 6, eos])
    path = _write(tmp_path, [bad], tok)
    with pytest.raises(ValueError, match="outside the model's vocabulary") as err:
        build_trainset(path, tmp_path / "ts2", tokenizer=str(model), report=False)
    assert str(path) in str(err.value)


# --- input integrity (issue 12): every bad input names file, line and field; nothing half-built ---

def _k_meta(path: Path, tok, k: int) -> None:
    write_samples_meta(path, tok, k=k)


def test_problems_with_fewer_than_k_samples_are_refused_by_id(tmp_path: Path, tok) -> None:
    eos = tok.eos_token_id
    samples = [_sample("A", i, 3, True, eos) for i in range(3)] + [_sample("B", 0, 3, False, eos)]
    path = _write(tmp_path, samples)
    _k_meta(path, tok, 3)
    with pytest.raises(ValueError, match=r"fewer than k=3 samples: B \(1\)"):
        build_trainset(path, tmp_path / "ts", tokenizer=tok, report=False)
    assert not (tmp_path / "ts").exists()


def test_all_wrong_set_warns_on_stdout(tmp_path: Path, tok, capsys: pytest.CaptureFixture) -> None:
    eos = tok.eos_token_id
    _build(tmp_path, [_sample("A", i, 3 + i, False, eos) for i in range(2)], tok)
    assert "every one of the 2 samples" in capsys.readouterr().out
    _build(tmp_path, [_sample("A", 0, 3, True, eos), _sample("A", 1, 4, False, eos)], tok)
    assert "WARNING" not in capsys.readouterr().out


def test_invalid_utf8_and_missing_fields_name_file_line_and_field(tmp_path: Path, tok) -> None:
    eos = tok.eos_token_id
    good = json.dumps(_sample("A", 0, 3, True, eos)) + "\n"
    path = tmp_path / "samples.jsonl"
    write_samples_meta(path, tok)
    path.write_bytes(good.encode() + b'{"problem_id": "A\xff\xfe"}\n' + good.encode())
    with pytest.raises(ValueError, match=r"samples\.jsonl:2: invalid UTF-8"):
        build_trainset(path, tmp_path / "ts", tokenizer=tok, report=False)
    broken = _sample("A", 1, 3, True, eos)
    del broken["prompt_token_ids"]
    path.write_text(good + json.dumps(broken) + "\n")
    with pytest.raises(ValueError, match=r"samples\.jsonl:2: sample record has no field 'prompt_token_ids'"):
        build_trainset(path, tmp_path / "ts", tokenizer=tok, report=False)
    assert not (tmp_path / "ts").exists()


def test_rebuild_into_a_folder_of_another_set_is_refused_unless_overwrite(tmp_path: Path, tok) -> None:
    """case 3's cause: the folder (and its old log-prob cache) belonged to another build."""
    eos = tok.eos_token_id
    samples = [_sample(p, i, 3 + i, i == 0, eos) for p in "AB" for i in range(2)]
    out = build_trainset(_write(tmp_path, samples, tok), tmp_path / "ts", tokenizer=tok, report=False)
    (out / "old_logps-model-t1-key.safetensors").write_bytes(b"stale")
    # identical inputs and settings: rebuilt in place (the result is the same set)
    build_trainset(_write(tmp_path, samples, tok), out, tokenizer=tok, report=False)
    reordered = samples[2:] + samples[:2]  # the same samples, other problem order, same token count
    with pytest.raises(RuntimeError, match=r"inputs\.samples"):
        build_trainset(_write(tmp_path, reordered, tok), out, tokenizer=tok, report=False)
    with pytest.raises(RuntimeError, match=r"config\.lam: was 2\.0, now 5\.0"):
        build_trainset(_write(tmp_path, samples, tok), out, tokenizer=tok, report=False, lam=5.0)
    assert (out / "old_logps-model-t1-key.safetensors").exists()  # refusals delete nothing
    ts = load_trainset(build_trainset(_write(tmp_path, reordered, tok), out, tokenizer=tok, report=False,
                                      overwrite=True))
    assert not (out / "old_logps-model-t1-key.safetensors").exists()
    assert [s["id"] for s in ts["stats"]] == ["B", "A"]
