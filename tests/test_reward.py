"""The length-harmonizing recipe (pruner/reward.py): length policy, statistics, selections, reward, advantages."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import pruner.reward as reward

EOS = [9, 10]


def _s(index: int, correct: bool, finish: str = "stop", ids: list[int] | None = None) -> dict:
    return {"sample_index": index, "correct": correct, "finish_reason": finish, "response_token_ids": ids or [1]}


def test_truncated_is_wrong_and_unterminated_stopped_gets_one_eos() -> None:
    assert reward.is_correct(_s(0, True)) and not reward.is_correct(_s(0, True, "length"))
    assert reward.response_ids(_s(0, True, ids=[4, 5]), EOS) == ([4, 5, 9], True)       # stopped, no EOS: appended
    assert reward.response_ids(_s(0, True, ids=[4, 10]), EOS) == ([4, 10], False)      # any EOS id ends it
    assert reward.response_ids(_s(0, True, "length", [4, 5]), EOS) == ([4, 5], False)  # truncated: left open
    assert reward.response_ids({"response_token_ids": [], "finish_reason": "stop"}, EOS) == ([9], True)
    assert reward.response_ids({"response_token_ids": [], "finish_reason": "length"}, EOS) == ([], False)


def test_own_stats_count_an_empty_response_as_one_token() -> None:
    samples = [_s(0, True), _s(1, False), _s(2, True, "length")]
    assert reward.own_stats(samples, [0, 5, 3]) == pytest.approx(((1 + 5 + 3) / 3, 1 / 3))


def test_reference_stats_own_or_loaded(tmp_path: Path) -> None:
    rows = [{"id": "A", "ids": ["A", "A2"], "ref_mean_length": 20.0, "ref_mean_accuracy": 0.25},
            {"id": "B", "ref_mean_length": 7, "ref_mean_accuracy": 1}]
    (tmp_path / "problem_stats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for source in (tmp_path, tmp_path / "problem_stats.jsonl"):  # the folder or the file itself
        ref = reward.load_ref_stats(source)
        assert sorted(ref) == ["A", "A2", "B"]
        assert reward.reference_stats("A2", (3.0, 1.0), ref, source) == (20.0, 0.25)
    assert reward.reference_stats("A", (3.0, 1.0), None, None) == (3.0, 1.0)
    with pytest.raises(KeyError, match="problem C is not in ref_stats"):
        reward.reference_stats("C", (3.0, 1.0), ref, tmp_path)


def test_keep_per_problem_draws_distinct_sorted_positions_reproducibly() -> None:
    samples = [_s(i, True) for i in range(8)]
    lengths = list(range(8))
    assert reward.select("lh", samples, lengths, None, np.random.default_rng(0)) == [(i, False) for i in range(8)]
    assert reward.select("lh", samples, lengths, 99, np.random.default_rng(0)) == [(i, False) for i in range(8)]
    draws = [reward.select("lh", samples, lengths, 3, np.random.default_rng(seed)) for seed in range(20)]
    for rows in draws:
        positions = [p for p, _ in rows]
        assert len(set(positions)) == 3 and positions == sorted(positions) and all(0 <= p < 8 for p in positions)
    assert draws[5] == reward.select("lh", samples, lengths, 3, np.random.default_rng(5))
    assert len({tuple(d) for d in draws}) > 1  # the draw depends on the seed


def test_sft_and_dpo_selections() -> None:
    rng = np.random.default_rng(0)
    samples = [_s(0, True), _s(1, True), _s(2, False), _s(3, False), _s(4, True, "length")]
    lengths = [6, 4, 5, 9, 4]
    assert reward.select("sft", samples, lengths, None, rng) == [(1, True)]          # shortest correct
    assert reward.select("dpo", samples, lengths, None, rng) == [(1, True), (3, False)]  # vs the longest wrong
    tie = [_s(0, True), _s(1, True)]
    assert reward.select("sft", tie, [4, 4], None, rng) == [(0, True)]               # tie: lowest sample_index
    assert reward.select("dpo", tie, [4, 7], None, rng) == [(0, True), (1, False)]   # none wrong: longest other
    assert reward.select("dpo", [_s(0, True)], [3], None, rng) == []                 # no pair
    assert reward.select("sft", [_s(0, False)], [3], None, rng) == []                # no correct sample


def test_rewards_by_hand_and_the_one_clip() -> None:
    lengths = torch.tensor([2, 4, 8, 1, 1000])
    got = reward.rewards(lengths, [True, True, False, True, False], [4.0, 4.0, 4.0, 10.0, 10.0],
                         [0.5, 0.5, 0.5, 0.5, 1.0], lam=2.0)
    by_hand = [4 / 2 - 1 + 1, 4 / 4 - 1 + 1, 4 / 8 - 1 - 1, 10 / 1 - 1 + 1, 10 / 1000 - 1 - 2]  # last two: clipped
    expected = [min(reward.CLIP[1], max(reward.CLIP[0], r)) for r in by_hand]
    assert got.dtype == torch.float32 and got.tolist() == pytest.approx(expected)
    assert got[3].item() == reward.CLIP[1] and got[4].item() == reward.CLIP[0]


def test_advantages_standardise_lh_and_fix_the_baselines() -> None:
    r = torch.tensor([2.0, 1.0, -1.0, 0.5])
    adv, mean, std = reward.advantages("lh", r, [False] * 4)
    r64 = r.double()
    assert mean == pytest.approx(float(r64.mean())) and std == pytest.approx(float(r64.std(unbiased=False)))
    assert adv.tolist() == pytest.approx(((r64 - mean) / std).tolist(), abs=1e-6)
    assert float(adv.double().mean()) == pytest.approx(0, abs=1e-6)
    flat, _, std0 = reward.advantages("lh", torch.tensor([0.7, 0.7]), [False, False])
    assert std0 == 0.0 and flat.tolist() == [0.0, 0.0]  # no division by a zero std
    assert reward.advantages("lh", torch.tensor([0.7]), [False])[2] == 0.0
    assert reward.advantages("sft", r, [True] * 4)[0].tolist() == [1.0] * 4
    assert reward.advantages("dpo", r, [True, False, True, False])[0].tolist() == [1.0, -1.0, 1.0, -1.0]


def test_selection_arguments_are_checked() -> None:
    reward.check_selection("dpo", 2)
    with pytest.raises(ValueError, match=r"kind must be one of \('lh', 'sft', 'dpo'\), got 'ppo'"):
        reward.check_selection("ppo", None)
    with pytest.raises(ValueError, match="keep_per_problem must be >= 1"):
        reward.check_selection("lh", 0)
