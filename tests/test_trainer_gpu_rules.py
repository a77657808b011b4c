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
