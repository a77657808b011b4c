"""The verl / OpenRLHF drop-ins against the upstream functions themselves, when their source is at hand.

verl and OpenRLHF cannot be installed here (their dependency stacks), so this module runs their own
code from an unpacked copy of their wheels, pointed to by O1PRUNER_UPSTREAM_SRC (skipped without it):

    pip download --no-deps verl==0.9.1 openrlhf==0.11.2 -d wheels
    unzip wheels/verl-*.whl 'verl/utils/*' -d upstream
    mkdir -p upstream/openrlhf/models && unzip -j wheels/openrlhf-*.whl '*/openrlhf/models/utils.py' -d upstream/openrlhf/models
    O1PRUNER_UPSTREAM_SRC=$PWD/upstream pytest tests/test_integrations_upstream.py

verl's experimental module imports only torch (and optional flash-attn / liger-kernel), so it is loaded
whole. `verl/utils/torch_functional.py` and `openrlhf/models/utils.py` import heavy packages at the top
(tensordict, deepspeed), so the functions under test are taken from their source text and run with
torch, with flash-attn absent (their CPU fallback path, the one they take on this machine).
"""
from __future__ import annotations

import ast
import importlib.util
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from o1pruner_kernels.integrations import openrlhf as o1_openrlhf
from o1pruner_kernels.integrations import verl as o1_verl

SRC = os.environ.get("O1PRUNER_UPSTREAM_SRC")
pytestmark = pytest.mark.skipif(not SRC, reason="O1PRUNER_UPSTREAM_SRC (unpacked verl/OpenRLHF source) not set")


def functions_from(path: Path, names: list[str], **namespace) -> dict:
    """Execute only the named top-level functions of a source file, in `namespace` (+ torch, F, os)."""
    tree = ast.parse(path.read_text())
    defs = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in names]
    assert sorted(d.name for d in defs) == sorted(names), f"{path}: missing some of {names}"
    scope = {"torch": torch, "F": F, "os": os, "Optional": None, **namespace}
    exec(compile(ast.Module(body=defs, type_ignores=[]), str(path), "exec"), scope)
    return scope


def module_from(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def logits_case(seed: int, shape=(3, 7), vocab=53):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(*shape, vocab, generator=g)).requires_grad_()
    return logits, torch.randint(0, vocab, shape, generator=g), torch.randn(shape, generator=g)


def assert_same_values_and_grads(ours, theirs, inputs, upstream, atol=1e-5):
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=atol)
    for a, b in zip(torch.autograd.grad(ours, inputs, upstream), torch.autograd.grad(theirs, inputs, upstream)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=atol)


def test_against_verl_torch_functional():
    verl = functions_from(
        Path(SRC) / "verl/utils/torch_functional.py",
        ["logprobs_from_logits", "logprobs_from_logits_v2", "entropy_from_logits"],
        FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE=False, NPU_CROSS_ENTROPY_LOSS_AVAILABLE=False,
    )
    logits, labels, up = logits_case(0)
    assert_same_values_and_grads(
        o1_verl.logprobs_from_logits(logits, labels), verl["logprobs_from_logits"](logits, labels), logits, up
    )
    assert_same_values_and_grads(o1_verl.entropy_from_logits(logits), verl["entropy_from_logits"](logits), logits, up)


def test_against_verl_fused_linear_for_ppo():
    experimental = module_from(Path(SRC) / "verl/utils/experimental/torch_functional.py", "verl_experimental_tf")
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    weight = torch.randn(53, 16, generator=g, requires_grad=True)
    ids = torch.randint(0, 53, (2, 9), generator=g)
    ups = (torch.randn(2, 9, generator=g), torch.randn(2, 9, generator=g))
    ours = o1_verl.FusedLinearForPPO()(hidden, weight, ids, temperature=0.7)
    theirs = experimental.FusedLinearForPPO(chunk_size=5)(hidden, weight, ids, temperature=0.7)
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(ours, (hidden, weight), ups)
    want = torch.autograd.grad(theirs, (hidden, weight), ups)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_against_openrlhf_log_probs_from_logits(temperature):
    openrlhf = functions_from(
        Path(SRC) / "openrlhf/models/utils.py", ["log_probs_from_logits", "_logsumexp_by_chunk"]
    )
    leaf, labels, up = logits_case(2)
    ours_in, theirs_in = leaf * 1, leaf * 1  # non-leaf logits, as OpenRLHF's Actor passes them
    ours = o1_openrlhf.log_probs_from_logits(ours_in, labels, temperature=temperature)
    theirs = openrlhf["log_probs_from_logits"](theirs_in, labels, temperature=temperature)
    torch.testing.assert_close(ours_in, theirs_in, rtol=0, atol=0)  # the same in-place scaling
    assert ours.dtype == theirs.dtype
    assert_same_values_and_grads(ours, theirs, leaf, up)
