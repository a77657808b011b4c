"""GPU-path rules of the trainer that a CPU can still show (issue 21): activation checkpointing stays on
whatever path gave the old log-probs, a failing Liger patch is undone, a CUDA process without torchrun
gets a world-of-one group, micro-batches without padding skip the attention mask."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def small_trainset(tiny_model_dir, tmp_path_factory) -> Path:
    from test_train import _write_samples

    from pruner.dataset import build_trainset

    root = tmp_path_factory.mktemp("gpu_rules_set")
    samples = _write_samples(root / "samples.jsonl", tiny_model_dir, problems=4, k=4)
    return build_trainset(samples, root / "lh", lam=2.0, tokenizer=str(tiny_model_dir))


def _cpu() -> "object":
    from pruner.distributed import Dist

    return Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def _block_forwards_in_one_step(policy, data, flat, pad_id: int) -> int:
    """Decoder-block forwards during one optimizer step of two micro-batches of two sequences: each
    block runs once per micro-batch, and once more in backward when checkpointing recomputes it."""
    from pruner.distributed import decoder_blocks
    from pruner.step import LossSpec, train_step

    calls = []
    # a pre-hook: the recomputation stops early once it has what backward needs, before any post-hook
    handles = [b.register_forward_pre_hook(lambda *_: calls.append(1)) for b in decoder_blocks(policy.lm)]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    try:
        train_step(policy, optimizer, data, [[[0, 1], [2, 3]]], spec=LossSpec(), d=_cpu(), pad_id=pad_id,
                   old_logps_flat=flat, max_grad_norm=10.0)
    finally:
        for h in handles:
            h.remove()
    return len(calls)


@pytest.mark.parametrize("source", ["cache", "computed"])
def test_checkpointing_is_active_however_the_old_logps_were_obtained(tiny_model_dir, small_trainset, tmp_path,
                                                                    source):
    from pruner.modeling import prepare_model
    from pruner.old_logps import attach_response_offsets, old_logprobs
    from pruner.trainset import load_trainset

    trainset = Path(shutil.copytree(small_trainset, tmp_path / "set"))
    data = attach_response_offsets(load_trainset(trainset))
    kwargs = dict(temperature=1.0, micro_batch=2, pad_id=0)
    build = lambda: prepare_model(str(tiny_model_dir), _cpu(), liger=False, activation_checkpointing=True)  # noqa: E731
    if source == "cache":  # a first run fills the cache; a resumed run (a fresh policy) only reads it
        old_logprobs(build(), data, trainset, str(tiny_model_dir), _cpu(), **kwargs)
    policy = build()
    flat, _, hit = old_logprobs(policy, data, trainset, str(tiny_model_dir), _cpu(), **kwargs)
    assert hit == (source == "cache")
    layers = len(policy.lm.model.layers)
    # 2 micro-batches x 2 layers: 4 forwards without checkpointing, 8 with its recomputation in backward
    assert _block_forwards_in_one_step(policy, data, flat, pad_id=0) == 2 * 2 * layers
    assert policy.training


@pytest.mark.parametrize("error", [AttributeError("module has no attribute 'Qwen2RMSNorm'"),
                                   TypeError("apply_liger_kernel_to_qwen2() got an unexpected keyword"),
                                   RuntimeError("anything else")])
def test_a_failing_liger_patch_is_undone_and_the_run_trains_unpatched(error):
    import importlib

    from pruner.modeling import apply_liger

    module = importlib.import_module("transformers.models.qwen2.modeling_qwen2")
    before = dict(vars(module))

    def half_patch(rope: bool = True, rms_norm: bool = True, swiglu: bool = True) -> None:
        module.Qwen2RMSNorm = type("HalfPatchedNorm", (), {})  # a mismatch shows up after a first swap
        module.liger_leftover = 1
        raise error

    message = apply_liger("qwen2", patch=half_patch)
    assert "training UNPATCHED" in message and type(error).__name__ in message and str(error) in message
    assert dict(vars(module)) == before  # every swapped name back, nothing left behind


def test_a_liger_patch_that_works_is_reported_as_patched():
    import importlib

    from pruner.modeling import apply_liger

    module = importlib.import_module("transformers.models.qwen2.modeling_qwen2")
    original = module.Qwen2RMSNorm

    def norm_only(rms_norm: bool = True) -> None:  # takes only some of the switches, as older Liger does
        module.Qwen2RMSNorm = type("PatchedNorm", (original,), {})

    try:
        message = apply_liger("qwen2", patch=norm_only)
    finally:
        module.Qwen2RMSNorm = original
    assert message == "liger-kernel patched rms_norm into qwen2 (not patched: rope, swiglu)"


def test_a_cuda_process_without_torchrun_gets_a_world_of_one_group():
    from pruner.distributed import wants_world_of_one

    assert wants_world_of_one(torch.device("cuda", 0), {})
    assert not wants_world_of_one(torch.device("cuda", 0), {"RANK": "0", "WORLD_SIZE": "1"})  # torchrun's own
    assert not wants_world_of_one(torch.device("cpu"), {})  # the CPU keeps its group-less world of one


@pytest.mark.slow
def test_the_world_of_one_group_gives_one_process_the_fsdp2_path(tiny_model_dir, small_trainset, tmp_path):
    """What a lone GPU process now runs, on gloo: FSDP2-sharded parameters (so on CUDA the bf16
    MixedPrecisionPolicy applies) and a finite optimizer step, with no torchrun variables at all."""
    code = f"""
import os, torch
from torch.distributed.tensor import DTensor
from pruner import distributed
from pruner.modeling import prepare_model
from pruner.old_logps import attach_response_offsets, compute_response_logprobs
from pruner.step import LossSpec, train_step
from pruner.trainset import load_trainset
assert not any(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))
distributed.start_world_of_one(torch.device("cpu"))
d = distributed.Dist(0, 0, 1, torch.device("cpu"))
assert d.enabled
policy = prepare_model({str(tiny_model_dir)!r}, d, liger=False)
assert all(isinstance(p, DTensor) for p in policy.parameters())
data = attach_response_offsets(load_trainset({str(small_trainset)!r}))
flat = compute_response_logprobs(policy, data, d, micro_batch=2, pad_id=0, show_progress=False)
opt = torch.optim.AdamW(policy.parameters(), lr=1e-4)
result = train_step(policy, opt, data, [[[0, 1], [2, 3]]], spec=LossSpec(), d=d, pad_id=0, old_logps_flat=flat,
                    max_grad_norm=10.0)
assert result.finite, result
distributed.shutdown()
print("ok")
"""
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                          "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = f"{ROOT}:{ROOT / 'kernels'}"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]


def test_unpadded_micro_batches_reach_the_model_without_a_mask_and_give_the_same_logprobs(tiny_model_dir,
                                                                                          small_trainset):
    from pruner.batching import collate
    from pruner.modeling import prepare_model
    from pruner.old_logps import attach_response_offsets
    from pruner.step import _forward_backward, LossSpec
    from pruner.trainset import load_trainset

    data = attach_response_offsets(load_trainset(small_trainset))
    policy = prepare_model(str(tiny_model_dir), _cpu(), liger=False).double()
    seen = []
    policy.lm.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("attention_mask")),
                                              with_kwargs=True)
    flat = torch.zeros(int(data["response_offsets"][-1]))
    _forward_backward(policy, data, [[0], [0, 1]], LossSpec(loss="sft"), 10, flat, _cpu(), 0)
    assert seen[0] is None and seen[1] is not None  # one sequence: no padding, no mask; two: padded
    one = collate(data, [0], pad_id=0)
    with torch.no_grad():
        masked = policy(one.input_ids, one.attention_mask, one.labels)
        causal = policy(one.input_ids, None, one.labels)
    assert not one.padded and collate(data, [0, 1], pad_id=0).padded
    torch.testing.assert_close(causal, masked, rtol=0, atol=1e-12)
