"""The memory planner: FSDP2 sharding over the fake process group, the calibrated activation
formula against autograd's saved tensors, the CLI's JSON contract and the trainer's refusal."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pruner import plan
from pruner.presets import ARCHITECTURES, config_for

ROOT = Path(__file__).resolve().parent.parent
REAL = ["qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "qwen2.5-32b", "llama-3.1-8b"]


@pytest.mark.parametrize("arch", REAL)
def test_presets_have_the_published_parameter_counts(arch):
    published = {"qwen2.5-0.5b": 0.494e9, "qwen2.5-1.5b": 1.544e9, "qwen2.5-7b": 7.616e9,
                 "qwen2.5-32b": 32.764e9, "llama-3.1-8b": 8.030e9}[arch]
    assert plan.model_layout(config_for(arch)).param_count == pytest.approx(published, rel=2e-3)


@pytest.mark.parametrize("arch, world", [("qwen2.5-0.5b", 3), ("qwen2.5-7b", 8), ("llama-3.1-8b", 6), ("cpu-small", 1)])
def test_fake_group_fsdp2_shards_match_the_chunking_rule(arch, world):
    config = config_for(arch)
    built = plan.fsdp_local_numel(config, world)  # fully_shard over torch's fake process group
    layout = plan.model_layout(config)
    assert built == layout.local_numel(world)
    assert built >= layout.param_count / world and (world == 1) == (built == layout.param_count)


def _saved_bytes(config, tokens: int, dtype: torch.dtype, checkpointing: bool) -> int:
    """Bytes autograd saves for backward in a real forward (tensors counted once per storage)."""
    from transformers import AutoModelForCausalLM

    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return saved_by_forward(lm.train(), torch.randint(0, config.vocab_size, (1, tokens)), None)


def saved_by_forward(lm, ids: torch.Tensor, mask: torch.Tensor | None) -> int:
    """Bytes the decoder's forward saves for backward, beyond the parameters (each storage once)."""
    params = {p.untyped_storage().data_ptr() for p in lm.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lm.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False)
    return sum(n for ptr, n in seen.items() if ptr not in params)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_activation_formula_matches_autograds_saved_tensors(model_type, dtype, checkpointing):
    # Odd shapes, not the ones the formula was fitted on (h=256/512, i=512/1024).
    config = config_for("cpu-small", model_type=model_type, hidden_size=320, intermediate_size=880,
                        num_attention_heads=5, num_key_value_heads=1, num_hidden_layers=3, vocab_size=101)
    tokens = 192
    measured = _saved_bytes(config, tokens, dtype, checkpointing)
    formula = plan.saved_activation_bytes(config, tokens, elem=dtype.itemsize, checkpointing=checkpointing)
    assert formula == pytest.approx(measured, rel=0.1)


@pytest.mark.slow
def test_cli_json_is_one_object_with_the_contract_fields():
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'kernels'}"}
    proc = subprocess.run([sys.executable, "-m", "pruner.plan", "--arch", "qwen2.5-32b", "--gpus", "8",
                           "--gpu-memory-gib", "80", "--micro-batch-tokens", "16384", "--activation-checkpointing",
                           "--json"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)  # exactly one JSON document on stdout
    assert isinstance(out["param_count"], int) and isinstance(out["fits"], bool)
    keys = ("params", "grads", "optimizer", "activations", "head_workspace")
    assert all(isinstance(out["per_rank"][k], int) and out["per_rank"][k] > 0 for k in keys + ("total",))
    assert out["per_rank"]["total"] == sum(v for k, v in out["per_rank"].items() if k != "total")
    assert out["per_rank"]["optimizer"] == 2 * out["per_rank"]["params"]
    assert out["fits"] == (out["per_rank"]["total"] <= 80 * 2**30)


def test_checkpointing_and_more_gpus_shrink_the_plan_and_the_verdict_names_a_fix():
    config = config_for("qwen2.5-7b")
    kw = dict(gpu_memory_gib=80, micro_batch_tokens=16384, name="qwen2.5-7b")
    one = plan.plan_for(config, gpus=1, activation_checkpointing=False, **kw)
    assert not one.fits and one.suggestions
    four_ckpt = plan.plan_for(config, gpus=4, activation_checkpointing=True, **kw)
    four = plan.plan_for(config, gpus=4, activation_checkpointing=False, **kw)
    assert four_ckpt.per_rank["activations"] < four.per_rank["activations"] / 5
    assert four.per_rank["params"] < one.per_rank["params"] / 3.9
    assert four_ckpt.fits and "fits" in plan.format_table(four_ckpt)
    assert "--activation-checkpointing" in " ".join(four.suggestions)
    assert four.logits_avoided == 4 * 16384 * config.vocab_size
    with pytest.raises(MemoryError, match="--activation-checkpointing"):
        plan.refuse_if_too_big(four, "cuda", enforce=True)
    plan.refuse_if_too_big(four, "cuda", enforce=False)  # --no-plan-check
    plan.refuse_if_too_big(four, "cpu", enforce=True)    # the CPU only reports


def test_every_preset_builds_and_every_trainer_flag_has_help():
    from pruner.train import TrainConfig

    assert set(REAL) <= set(ARCHITECTURES)
    import dataclasses

    assert all(f.metadata.get("help") for f in dataclasses.fields(TrainConfig))
    assert "plan_check" in {f.name for f in dataclasses.fields(TrainConfig)}
