"""Padding-free micro-batches (`--micro-batch-tokens`): a packed row computes what each of its
sequences computes alone (log-probs and gradients, float64), and the token-budget plan keeps every
rank in step with balanced work."""
from __future__ import annotations

import random

import pytest
import torch

from pruner import packed_attention
from pruner.batching import IGNORE_INDEX, collate, plan_epoch
from pruner.modeling import TokenLogprobs
from pruner.old_logps import attach_response_offsets
from pruner.packing import (check_budget, pack_collate, pack_step, packed_logprobs, plan_packed_epoch)

LENGTHS = [7, 19, 3, 12, 26, 1 + 4]  # prompt + response, odd and uneven
PROMPTS = [2, 5, 1, 4, 9, 2]


def _qwen2_gqa() -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                         intermediate_size=80, vocab_size=97, max_position_embeddings=128, rope_theta=1e4)
    return Qwen2ForCausalLM(config)


def _embedded() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from pruner.embedded import default_model_path

    return AutoModelForCausalLM.from_pretrained(str(default_model_path()))


def _data(vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    offsets = torch.zeros(len(LENGTHS) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.tensor(LENGTHS), 0)
    prompts = torch.tensor(PROMPTS)
    return attach_response_offsets({"input_ids": torch.randint(0, vocab, (sum(LENGTHS),), generator=g),
                                    "offsets": offsets, "prompt_lengths": prompts,
                                    "response_lengths": torch.tensor(LENGTHS) - prompts})


def _grads(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    policy.zero_grad(set_to_none=True)
    return out


@pytest.fixture(autouse=True)
def _path_by_device():
    yield
    packed_attention.set_path(None)


@pytest.mark.parametrize("path", ["per-sequence SDPA", "SDPA block mask"])
@pytest.mark.parametrize("build", [_qwen2_gqa, _embedded], ids=["qwen2-gqa", "embedded"])
def test_a_packed_row_equals_each_sequence_alone(build, path):
    lm = build().double()
    packed_attention.enable(lm)
    packed_attention.set_path(path)
    policy = TokenLogprobs(lm)
    data = _data(lm.config.vocab_size)
    order = [4, 0, 2, 5, 1, 3]
    upstream = torch.randn(len(order), max(LENGTHS), dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    row = pack_collate(data, order)
    assert row.input_ids.shape == (1, sum(LENGTHS))  # not one padding token
    assert row.position_ids[0].tolist() == [p for i in order for p in range(LENGTHS[i])]
    packed = packed_logprobs(policy, row)
    (packed.double() * upstream[:, :packed.shape[1]]).sum().backward()
    packed_grads = _grads(policy)

    for b, i in enumerate(order):
        alone = collate(data, [i])
        logps = policy(alone.input_ids, alone.attention_mask, alone.labels)
        n = LENGTHS[i]
        torch.testing.assert_close(packed[b, :n], logps[0, :n], rtol=1e-6, atol=1e-7)
        assert not packed[b, n:].any()
        (logps[0, :n].double() * upstream[b, :n]).sum().backward()  # grads accumulate over the sequences
    alone_grads = _grads(policy)
    assert packed_grads.keys() == alone_grads.keys() and packed_grads
    for name in alone_grads:  # the fused head computes in fp32: fp32 agreement through it
        scale = alone_grads[name].abs().max()
        torch.testing.assert_close(packed_grads[name], alone_grads[name], rtol=1e-5, atol=1e-6 * scale, msg=name)


@pytest.mark.parametrize("path", ["per-sequence SDPA", "SDPA block mask"])
@pytest.mark.parametrize("build", [_qwen2_gqa, _embedded], ids=["qwen2-gqa", "embedded"])
def test_the_body_in_float64_is_exact_to_float64(build, path):
    """The decoder body (where the attention is) without the fp32 head: hidden states and every
    body gradient of a packed row equal each sequence's alone to float64 precision."""
    lm = build().double()
    packed_attention.enable(lm)
    packed_attention.set_path(path)
    body = lm.get_decoder()
    data = _data(lm.config.vocab_size, seed=1)
    order = [1, 3, 0, 5, 4, 2]
    row = pack_collate(data, order)
    upstream = torch.randn(row.input_ids.shape[1], lm.config.hidden_size, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(4))
    hidden = body(input_ids=row.input_ids, position_ids=row.position_ids, **row.attention_kwargs()).last_hidden_state
    (hidden[0] * upstream).sum().backward()
    packed_grads = _grads(body)
    starts = row.cu_seq_lens.tolist()
    for b, i in enumerate(order):
        alone = body(input_ids=collate(data, [i]).input_ids).last_hidden_state[0]
        torch.testing.assert_close(hidden[0, starts[b]:starts[b + 1]], alone, rtol=1e-12, atol=1e-12)
        (alone * upstream[starts[b]:starts[b + 1]]).sum().backward()
    alone_grads = _grads(body)
    for name in alone_grads:
        torch.testing.assert_close(packed_grads[name], alone_grads[name], rtol=1e-10, atol=1e-12, msg=name)


def test_without_the_boundaries_the_row_would_attend_across_sequences():
    """The control: the same packed row with plain causal attention (boundaries dropped) differs."""
    lm = _qwen2_gqa().double()
    packed_attention.enable(lm)
    policy = TokenLogprobs(lm)
    row = pack_collate(_data(lm.config.vocab_size), [0, 1])
    crossing = policy(row.input_ids, None, row.labels, position_ids=row.position_ids)
    separate = policy(row.input_ids, None, row.labels, position_ids=row.position_ids, **row.attention_kwargs())
    second = slice(LENGTHS[0], LENGTHS[0] + LENGTHS[1])
    assert (crossing[0, second] - separate[0, second]).abs().max() > 1e-4


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@torch.no_grad()
def test_flex_attention_document_mask_matches_on_the_forward():
    # FlexAttention has no CPU backward; its forward with the document mask is checked here, the
    # whole path on a GPU (docs/gpus.md).
    lm = _qwen2_gqa().double()
    packed_attention.enable(lm)
    policy = TokenLogprobs(lm)
    row = pack_collate(_data(lm.config.vocab_size), [1, 4, 3])
    packed_attention.set_path("per-sequence SDPA")
    reference = packed_logprobs(policy, row)
    packed_attention.set_path("FlexAttention document mask")
    torch.testing.assert_close(packed_logprobs(policy, row), reference, rtol=1e-6, atol=1e-7)


def test_padded_batches_through_the_registered_attention_are_unchanged():
    lm = _qwen2_gqa().double()
    data = _data(lm.config.vocab_size)
    batch = collate(data, [0, 1, 2])
    before = TokenLogprobs(lm)(batch.input_ids, batch.attention_mask, batch.labels)
    packed_attention.enable(lm)
    after = TokenLogprobs(lm)(batch.input_ids, batch.attention_mask, batch.labels)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_every_boundary_label_is_ignored():
    row = pack_collate(_data(97), [0, 1, 2, 3])
    ends = row.cu_seq_lens[1:].long() - 1
    assert (row.labels[0, ends] == IGNORE_INDEX).all()
    assert row.cu_seq_lens.dtype == torch.int32 and row.max_length == 19


def test_the_path_on_each_device():
    assert packed_attention.select_path(torch.device("cpu")) == "per-sequence SDPA"
    gpu = packed_attention.select_path(torch.device("cuda"), torch.bfloat16)
    assert gpu in ("flash-attn varlen", "FlexAttention document mask")
    assert packed_attention.select_path(torch.device("cuda"), torch.float32) == "FlexAttention document mask"
    with pytest.raises(ValueError, match="unknown packed attention path"):
        packed_attention.set_path("nope")


# --- the plan ---------------------------------------------------------------------------------

def _long_tail(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [max(4, min(2000, int(rng.lognormvariate(5.0, 1.0)))) for _ in range(n)]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_plan_fits_the_budget_keeps_ranks_in_step_and_balances_tokens(world):
    lengths = _long_tail(384)
    budget = 2048
    plan = plan_packed_epoch(lengths, global_batch=48, micro_batch_tokens=budget, world_size=world, seed=5, epoch=1)
    padded = plan_epoch(lengths, global_batch=48, micro_batch=48, world_size=1, seed=5, epoch=1)
    assert len(plan) == len(padded) == 8
    for step, reference in zip(plan, padded):
        assert len(step) == world
        assert len({len(rank) for rank in step}) == 1  # the same number of micro-batches on every rank
        flat = [i for rank in step for micro in rank for i in micro]
        assert sorted(flat) == sorted(reference[0][0])  # the same sequences as the padded plan's step
        assert all(sum(lengths[i] for i in micro) <= budget for rank in step for micro in rank)
        loads = [sum(lengths[i] for micro in rank for i in micro) for rank in step]
        assert max(loads) - min(loads) <= max(lengths[i] for i in flat)
        # no more micro-batches than needed: one fewer per rank could not hold the step
        per_rank = len(step[0])
        assert per_rank == 1 or sum(lengths[i] for i in flat) > budget * world * (per_rank - 1) \
            or max(lengths[i] for i in flat) > budget // 2
    assert plan == plan_packed_epoch(lengths, global_batch=48, micro_batch_tokens=budget, world_size=world,
                                     seed=5, epoch=1)  # a pure function: --resume rebuilds it
    assert plan != plan_packed_epoch(lengths, global_batch=48, micro_batch_tokens=budget, world_size=world,
                                     seed=5, epoch=2)


def test_dpo_pairs_stay_together_in_one_micro_batch():
    lengths = _long_tail(64, seed=2)
    pairs = [[2 * i, 2 * i + 1] for i in range(32)]
    plan = plan_packed_epoch(lengths, global_batch=16, micro_batch_tokens=3000, world_size=2, seed=0, epoch=0,
                             pairs=pairs)
    for step in plan:
        for rank in step:
            for micro in rank:
                assert len(micro) % 2 == 0
                for k in range(0, len(micro), 2):  # adjacent (chosen, rejected) rows, as the DPO loss reads them
                    assert micro[k] % 2 == 0 and micro[k + 1] == micro[k] + 1


def test_a_rank_short_of_units_gets_an_empty_micro_batch_not_fewer():
    # three units that each need a bin of their own on two ranks: 2 micro-batches per rank, one empty
    ranks = pack_step([[0], [1], [2]], [90, 80, 70], 100, 2)
    assert [len(r) for r in ranks] == [2, 2]
    assert sorted(len(m) for r in ranks for m in r) == [0, 1, 1, 1]
    assert all(any(m for m in r) for r in ranks)  # every rank has real work


def test_a_budget_below_the_longest_sequence_names_both():
    lengths = [10, 700, 30]
    with pytest.raises(ValueError, match=r"--micro-batch-tokens 512 is smaller than its longest sequence \(sample 1\) "
                                         r"of 700 prompt\+response tokens"):
        check_budget(lengths, 512)
    with pytest.raises(ValueError, match=r"DPO pair \(samples 0, 1.*710"):
        check_budget([10, 700, 30, 5], 705, pairs=[[0, 1], [2, 3]])
    check_budget(lengths, 700)


# --- the step: packed and padded micro-batches give the same loss and gradients -----------------

@pytest.mark.parametrize("loss,level", [("lh", "sequence"), ("lh", "token"), ("sft", "sequence"), ("dpo", "sequence")])
def test_train_step_packed_equals_padded(loss, level):
    from pruner.distributed import Dist
    from pruner.old_logps import compute_response_logprobs
    from pruner.step import LossSpec, train_step

    lm = _qwen2_gqa().double()
    packed_attention.enable(lm)
    policy = TokenLogprobs(lm)
    data = _data(lm.config.vocab_size, seed=2)
    data["advantages"] = torch.tensor([0.5, -1.0, 0.25, 2.0, -0.75, 1.5])
    data["chosen"] = torch.tensor([1, 0, 0, 1, 1, 0])
    pairs = [[0, 1], [2, 3], [4, 5]] if loss == "dpo" else None
    d = Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    lengths = LENGTHS
    old = compute_response_logprobs(policy, data, d, micro_batch=2, pad_id=0, show_progress=False) - 0.05
    old_packed = compute_response_logprobs(policy, data, d, micro_batch=2, pad_id=0, show_progress=False,
                                           micro_batch_tokens=48) - 0.05
    torch.testing.assert_close(old_packed, old, rtol=1e-6, atol=1e-7)  # the old-log-prob pass, packed
    padded_plan = plan_epoch(lengths, global_batch=6, micro_batch=2, world_size=1, seed=0, epoch=0, pairs=pairs)[0]
    packed_plan = plan_packed_epoch(lengths, global_batch=6, micro_batch_tokens=48, world_size=1, seed=0, epoch=0,
                                    pairs=pairs)[0]
    assert len(packed_plan[0]) < len(padded_plan[0])
    results = []
    for plan, packed in ((padded_plan, False), (packed_plan, True)):
        opt = torch.optim.SGD(policy.parameters(), lr=0.0)
        results.append(train_step(policy, opt, data, plan, spec=LossSpec(loss, level), d=d, pad_id=0,
                                  old_logps_flat=old, max_grad_norm=1e9, packed=packed))
    padded, packed = results
    assert packed.loss == pytest.approx(padded.loss, rel=1e-5, abs=1e-7)
    assert packed.grad_norm == pytest.approx(padded.grad_norm, rel=1e-5)
    assert packed.tokens == padded.tokens and packed.sequences == padded.sequences
    # The statistics are means over micro-batches (as without packing), so they depend on the split;
    # with one ratio for every sequence (old = new - 0.05) the ratio statistics do not.
    for name in padded.stats if loss == "lh" else ():
        assert packed.stats[name] == pytest.approx(padded.stats[name], rel=1e-5, abs=1e-7), name


def test_a_new_row_never_reuses_the_previous_rows_mask():
    """Two rows of the same size with other boundaries, one after the other: each gets its own mask."""
    torch.manual_seed(1)
    packed_attention.set_path("SDPA block mask")
    q, k, v = (torch.randn(1, 2, 12, 8, dtype=torch.float64) for _ in range(3))
    for bounds in ([0, 5, 12], [0, 7, 12], [0, 5, 12]):
        cu = torch.tensor(bounds, dtype=torch.int32)
        got = packed_attention.packed_attention(q, k, v, cu)
        expected = torch.cat([torch.nn.functional.scaled_dot_product_attention(
            q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True) for s, e in zip(bounds[:-1], bounds[1:])], 2)
        torch.testing.assert_close(got, expected)


def test_the_deep_cpu_preset_has_a_head_share_of_the_families_it_stands_for():
    # bench/train_step.py --preset cpu-deep measures packing, which changes only the decoder's work: its LM head must
    # weigh per token what a real model's does (Qwen2.5-1.5B .. 0.5B), not cpu-small's ~70%.
    from pruner.presets import ARCHITECTURES

    def head_share(arch: str) -> float:
        a = ARCHITECTURES[arch]
        d, kv = a["hidden_size"], a["num_key_value_heads"] * d_head(a)
        layer = 2 * d * d + 2 * d * kv + 3 * d * a["intermediate_size"]  # q, o; k, v; gate, up, down
        return d * a["vocab_size"] / (d * a["vocab_size"] + a["num_hidden_layers"] * layer)

    def d_head(a: dict) -> int:
        return a["hidden_size"] // a["num_attention_heads"]

    assert head_share("qwen2.5-1.5b") < head_share("cpu-deep") < head_share("qwen2.5-0.5b") < 0.3
    assert head_share("cpu-small") > 0.65
