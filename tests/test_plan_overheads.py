"""The memory planner's terms beyond the model's own tensors (issue 21): the padded micro-batch's attention
mask and repeated K/V heads, foreach-AdamW's temporaries, the CUDA context and NCCL, and fragmentation
headroom; each estimate is named, and the refusal errs on the safe side."""
from __future__ import annotations

import math

import pytest
import torch

from pruner import plan
from pruner.presets import config_for

GIB = 2**30


def _plan(arch: str = "qwen2.5-7b", **kw) -> plan.MemoryPlan:
    args = dict(gpus=4, gpu_memory_gib=80, micro_batch_tokens=16384, activation_checkpointing=True)
    return plan.estimate(config_for(arch), **{**args, **kw})


def test_the_new_terms_are_in_every_plan_and_the_total_is_their_sum():
    p = _plan()
    for key in ("padded_attention", "optimizer_step", "cuda_context_nccl", "fragmentation"):
        assert key in p.per_rank and key in plan.COMPONENTS
    assert p.per_rank["total"] == sum(v for k, v in p.per_rank.items() if k != "total")
    assert set(p.estimates) == {"padded_attention", "cuda_context_nccl", "fragmentation"}
    table = plan.format_table(p)
    assert table.count("(estimate)") == 3 and "AdamW foreach temporaries" in table


def test_cuda_context_nccl_and_fragmentation_on_cuda_only():
    one, four, cpu = _plan(gpus=1), _plan(gpus=4), _plan(device="cpu")
    assert one.per_rank["cuda_context_nccl"] == plan.CUDA_CONTEXT_BYTES
    assert four.per_rank["cuda_context_nccl"] == plan.CUDA_CONTEXT_BYTES + plan.NCCL_BYTES
    allocator = sum(four.per_rank[k] for k in plan.COMPONENTS if k not in ("cuda_context_nccl", "fragmentation"))
    assert four.per_rank["fragmentation"] == math.ceil(plan.FRAGMENTATION * allocator)
    assert cpu.per_rank["cuda_context_nccl"] == cpu.per_rank["fragmentation"] == 0


def test_foreach_adamw_temporaries_count_where_they_outgrow_the_backward():
    # a short micro-batch: the step's fp32 sqrt(exp_avg_sq) of the whole shard is the peak
    short = _plan("qwen2.5-32b", gpus=8, micro_batch_tokens=256)
    local = short.per_rank["params"] // 4
    transient = sum(short.per_rank[k] for k in ("fsdp_unsharded", "activations", "head_workspace",
                                                "padded_attention"))
    assert short.per_rank["optimizer_step"] == 4 * local - transient > 0
    assert _plan(activation_checkpointing=False).per_rank["optimizer_step"] == 0  # activations dominate


def test_padded_mask_term_is_zero_for_one_sequence_and_grows_with_the_square_of_the_width():
    config = config_for("qwen2.5-7b")
    layers = config.num_hidden_layers
    assert _plan(micro_batch_size=1, activation_checkpointing=False).per_rank["padded_attention"] == 0
    b4 = plan.padded_attention_bytes(config, 4 * 1024, 4, elem=2, checkpointing=False)
    b4_wide = plan.padded_attention_bytes(config, 4 * 2048, 4, elem=2, checkpointing=False)
    kv = 2 * 2 * (config.num_attention_heads * 128 - config.num_key_value_heads * 128)
    assert b4 == 4 * 1024 * 1024 * plan.MASK_ELEM * layers + kv * 4 * 1024 * layers
    assert b4_wide - kv * 4 * 2048 * layers == 4 * (b4 - kv * 4 * 1024 * layers)  # T^2
    ckpt = plan.padded_attention_bytes(config, 4 * 1024, 4, elem=2, checkpointing=True)
    assert ckpt == 4 * 1024 * 1024 * plan.MASK_ELEM * 2 + kv * 4 * 1024 * 2


def _saved(config, ids: torch.Tensor, mask: torch.Tensor | None) -> int:
    from transformers import AutoModelForCausalLM

    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    from test_plan import saved_by_forward

    return saved_by_forward(AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).train(), ids, mask)


def test_the_padded_mask_estimate_is_not_below_what_autograd_keeps():
    config = config_for("cpu-small", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                        num_key_value_heads=1, num_hidden_layers=3, vocab_size=101)
    batch, width = 3, 160
    ids = torch.randint(0, 101, (batch, width))
    mask = torch.ones(batch, width, dtype=torch.long)
    mask[1, 100:] = 0  # right padding, as the trainer's collate makes it
    mask[2, 40:] = 0
    extra = _saved(config, ids, mask) - _saved(config, ids, None)
    estimate = plan.padded_attention_bytes(config, batch * width, batch, elem=2, checkpointing=False)
    assert 0 < extra <= estimate


def test_a_plan_that_fit_only_without_the_overheads_is_now_refused():
    p = _plan()
    bare = sum(p.per_rank[k] for k in ("params", "grads", "optimizer", "fsdp_unsharded", "activations",
                                       "head_workspace"))
    tight = _plan(gpu_memory_gib=bare / GIB + 1)  # fitted the old plan with 1 GiB to spare
    assert not tight.fits
    with pytest.raises(MemoryError):
        plan.refuse_if_too_big(tight, "cuda", enforce=True)
