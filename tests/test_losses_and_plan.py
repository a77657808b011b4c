"""The trainer's pieces that need no process group: batch plans, loss normalisation, AES."""
from __future__ import annotations

import math
import random

import pytest
import torch

from pruner.aes import accuracy_efficiency_score, waste_removed
from pruner.batching import check_batch_sizes, collate, plan_epoch, response_offsets, steps_per_epoch
from pruner.losses import compute_loss, count_units


def _lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(5, 300) for _ in range(n)]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_plan_covers_each_sample_once_and_is_the_same_for_every_world_size(world):
    lengths = _lengths(203)
    plan = plan_epoch(lengths, global_batch=16, micro_batch=2, world_size=world, seed=3, epoch=0)
    flat = [i for step in plan for rank in step for micro in rank for i in micro]
    assert len(flat) == len(set(flat)) == 16 * (203 // 16)
    assert all(len(rank) == 16 // (2 * world) for step in plan for rank in step)
    single = plan_epoch(lengths, global_batch=16, micro_batch=2, world_size=1, seed=3, epoch=0)
    # The same global batches whatever the number of processes: only the dealing differs.
    assert [sorted(i for r in s for m in r for i in m) for s in plan] == \
           [sorted(i for r in s for m in r for i in m) for s in single]
    assert plan != plan_epoch(lengths, global_batch=16, micro_batch=2, world_size=world, seed=3, epoch=1)


def test_plan_buckets_lengths_so_padding_stays_small():
    lengths = _lengths(1024, seed=1)
    plan = plan_epoch(lengths, global_batch=32, micro_batch=4, world_size=1, seed=0, epoch=0)
    padded = sum(len(m) * max(lengths[i] for i in m) for s in plan for r in s for m in r)
    real = sum(lengths[i] for s in plan for r in s for m in r for i in m)
    random_order = [list(range(k, k + 4)) for k in range(0, 1024, 4)]
    padded_random = sum(4 * max(lengths[i] for i in m) for m in random_order)
    assert padded / real < 1.15 < padded_random / real


def test_plan_keeps_preference_pairs_together():
    lengths = _lengths(40)
    pairs = [[2 * i, 2 * i + 1] for i in range(20)]
    plan = plan_epoch(lengths, global_batch=8, micro_batch=4, world_size=2, seed=0, epoch=0, pairs=pairs)
    for step in plan:
        for rank in step:
            for micro in rank:
                assert len(micro) == 4 and all(micro[k] // 2 == micro[k + 1] // 2 for k in (0, 2))


@pytest.mark.parametrize("samples,global_batch,paired", [(203, 16, False), (48, 16, False), (15, 16, False),
                                                          (42, 8, True), (40, 8, True)])
def test_steps_per_epoch_counts_the_plan_without_building_it(samples, global_batch, paired):
    lengths = _lengths(samples)
    pairs = [[2 * i, 2 * i + 1] for i in range(samples // 2)] if paired else None
    for epoch in (0, 1):
        plan = plan_epoch(lengths, global_batch=global_batch, micro_batch=4, world_size=2, seed=1, epoch=epoch,
                          pairs=pairs)
        assert steps_per_epoch(samples, global_batch=global_batch, pairs=pairs) == len(plan)


def test_batch_size_errors_name_the_flags():
    with pytest.raises(ValueError, match="--global-batch-size 30 is not divisible by --micro-batch-size 4 x 2"):
        check_batch_sizes(30, 4, 2)
    with pytest.raises(ValueError, match="multiple of 2"):
        check_batch_sizes(8, 3, 1, unit=2)
    assert check_batch_sizes(32, 4, 2) == 4


def test_collate_aligns_labels_and_old_logprobs_with_the_response():
    # sample 0: prompt [5, 6], response [7, 8, 9]; sample 1: prompt [1], response [2]
    data = {"input_ids": torch.tensor([5, 6, 7, 8, 9, 1, 2], dtype=torch.int32), "offsets": torch.tensor([0, 5, 7]),
            "prompt_lengths": torch.tensor([2, 1]), "response_lengths": torch.tensor([3, 1])}
    data["response_offsets"] = response_offsets(data["response_lengths"])
    ref = torch.tensor([-0.1, -0.2, -0.3, -0.4])
    b = collate(data, [0, 1], pad_id=0, old_logps_flat=ref)
    assert b.labels.tolist() == [[-100, 7, 8, 9, -100], [2, -100, -100, -100, -100]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert torch.allclose(b.old_logps, torch.tensor([[0, -0.1, -0.2, -0.3, 0], [-0.4, 0, 0, 0, 0]]))


def test_micro_batch_losses_sum_to_the_global_mean():
    """Split a step into micro-batches: the sum of their losses is the loss of the whole step."""
    g = torch.Generator().manual_seed(0)
    logps = -torch.rand(6, 9, generator=g, dtype=torch.float64)
    old = logps + 0.3 * torch.randn(6, 9, generator=g, dtype=torch.float64)
    mask = torch.rand(6, 9, generator=g) > 0.3
    mask[2] = False  # a fully masked row contributes nothing and is not counted
    adv = torch.randn(6, generator=g, dtype=torch.float64)
    for loss, level in (("lh", "sequence"), ("lh", "token"), ("sft", "sequence")):
        units = {"lh": "sequences" if level == "sequence" else "tokens", "sft": "tokens"}[loss]
        norm = count_units(units, mask.sum(1).tolist())
        whole, _ = compute_loss(loss, logps.float(), old.float(), mask, adv.float(), norm, ratio_level=level)
        parts = sum(compute_loss(loss, logps[s].float(), old[s].float(), mask[s], adv[s].float(), norm,
                                 ratio_level=level)[0] for s in (slice(0, 2), slice(2, 5), slice(5, 6)))
        assert float(parts) == pytest.approx(float(whole), rel=1e-5, abs=1e-7)
    # The sequence-level O1-Pruner loss by hand, in float64.
    n = mask.sum(1)
    valid = n > 0
    ratio = torch.exp(((logps - old) * mask).sum(1)[valid] / n[valid])
    a = adv[valid]
    expect = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2)).sum() / valid.sum()
    got, stats = compute_loss("lh", logps.float(), old.float(), mask, adv.float(), float(valid.sum()))
    assert float(got) == pytest.approx(float(expect), rel=1e-5)
    assert {"mean_ratio", "clip_fraction"} <= set(stats)


def test_dpo_loss_matches_its_formula_and_respects_the_chosen_flag():
    g = torch.Generator().manual_seed(1)
    logps = -torch.rand(4, 5, generator=g)
    old = -torch.rand(4, 5, generator=g)
    mask = torch.ones(4, 5, dtype=torch.bool)
    chosen = torch.tensor([1, 0, 0, 1])  # pair 0: row 0 chosen; pair 1: row 3 chosen
    loss, stats = compute_loss("dpo", logps, old, mask, torch.zeros(4), 2.0, dpo_beta=0.5, chosen=chosen)
    m = (logps - old).sum(1)
    expect = (-torch.nn.functional.logsigmoid(0.5 * (m[0] - m[1])) - torch.nn.functional.logsigmoid(0.5 * (m[3] - m[2]))) / 2
    assert float(loss) == pytest.approx(float(expect), rel=1e-5)


def test_aes_penalises_accuracy_drops():
    assert accuracy_efficiency_score(100, 0.5, 60, 0.55) == pytest.approx(0.4 + 3 * 0.1)
    # A drop costs 5 per unit (the paper's first Table 2 credited it with +3 instead).
    assert accuracy_efficiency_score(100, 0.5, 60, 0.45) == pytest.approx(0.4 - 5 * 0.1)
    assert waste_removed(200, 120, 100) == pytest.approx(0.8)
    assert waste_removed(100, 90, 100) is None
    with pytest.raises(ValueError):
        accuracy_efficiency_score(0, 0.5, 10, 0.5)
    assert math.isfinite(accuracy_efficiency_score(100, 1.0, 150, 1.0))
