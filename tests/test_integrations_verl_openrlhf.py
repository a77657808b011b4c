"""verl / OpenRLHF drop-ins against a float64 statement of what their own functions compute.

verl and OpenRLHF do not install on this CPU environment (verl pulls ray and pins an older
transformers; OpenRLHF needs flash-attn built), so each reference below restates, in float64, the
documented semantics of the function it replaces (verl 0.9.1 `verl.utils.torch_functional`,
`verl.utils.experimental.torch_functional.FusedLinearForPPO`; OpenRLHF 0.11.2
`openrlhf.models.utils.log_probs_from_logits`). tests/test_integrations_upstream.py runs the
upstream code itself when its source is available. Odd shapes, random upstream gradients.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch

from o1pruner_kernels.integrations import openrlhf as o1_openrlhf
from o1pruner_kernels.integrations import verl as o1_verl

V, D = 37, 11


def ref_logprobs(logits64: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[label]; 0 where the label is -100 (flash-attn's ignore index)."""
    valid = labels != -100
    picked = torch.log_softmax(logits64, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, torch.zeros_like(picked))


def ref_entropy(logits64: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits64, -1) - (torch.softmax(logits64, -1) * logits64).sum(-1)


def grads(outputs, upstream, inputs):
    return torch.autograd.grad(outputs, inputs, upstream)


def case(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(*shape, V, generator=g)).to(dtype).requires_grad_()
    labels = torch.randint(0, V, shape, generator=g)
    return logits, labels, torch.randn(shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("shape", [(5,), (3, 7)])
def test_verl_logprobs_from_logits(shape):
    logits, labels, up = case(shape)
    labels.view(-1)[1] = -100
    out = o1_verl.logprobs_from_logits(logits, labels, inplace_backward=True)
    ref = ref_logprobs(logits.detach().double().requires_grad_(), labels)
    assert out.dtype == torch.float32 and out.shape == labels.shape
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    assert out.view(-1)[1] == 0
    (g,) = grads(out, up.float(), logits)
    logits64 = logits.detach().double().requires_grad_()
    (g_ref,) = grads(ref_logprobs(logits64, labels), up, logits64)
    torch.testing.assert_close(g.double(), g_ref, rtol=0, atol=1e-5)
    assert g.view(-1, V)[1].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_verl_entropy_from_logits(dtype):
    logits, _, up = case((3, 7), seed=1, dtype=dtype)
    out = o1_verl.entropy_from_logits(logits)
    assert out.dtype == dtype
    logits64 = logits.detach().double().requires_grad_()
    ref = ref_entropy(logits64)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    (g,) = grads(out, up.to(dtype), logits)
    (g_ref,) = grads(ref, up, logits64)
    torch.testing.assert_close(g.double(), g_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", [(13,), (2, 9)])
def test_verl_fused_linear_for_ppo(shape):
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(*shape, D, generator=g, requires_grad=True)
    weight = torch.randn(V, D, generator=g, requires_grad=True)
    ids = torch.randint(0, V, shape, generator=g, dtype=torch.int32)  # verl casts ids to int64 itself
    up_logp, up_ent = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
    logp, ent = o1_verl.FusedLinearForPPO(chunk_size=4).forward(hidden, weight, ids, temperature=0.7)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32 and logp.shape == shape
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    z = (h64 @ w64.T) / 0.7
    ref_logp, ref_ent = ref_logprobs(z, ids.long()), ref_entropy(z)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)
    got = grads((logp, ent), (up_logp.float(), up_ent.float()), (hidden, weight))
    want = grads((ref_logp, ref_ent), (up_logp, up_ent), (h64, w64))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="disagree"):
        o1_verl.FusedLinearForPPO()(hidden, weight, ids.reshape(-1)[:3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_openrlhf_log_probs_from_logits_scales_in_place(dtype):
    leaf, labels, up = case((3, 7), seed=3, dtype=dtype)
    logits = leaf * 1  # a non-leaf, like the model's output OpenRLHF passes
    before = logits.detach().clone()
    out = o1_openrlhf.log_probs_from_logits(logits, labels, temperature=0.6)
    assert out.dtype == dtype and out.shape == labels.shape
    torch.testing.assert_close(logits.detach(), before / 0.6)  # OpenRLHF's documented side effect
    leaf64 = leaf.detach().double().requires_grad_()
    ref = ref_logprobs(leaf64 / 0.6, labels)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    (g,) = grads(out, up.to(dtype), leaf)
    (g_ref,) = grads(ref, up, leaf64)
    torch.testing.assert_close(g.double(), g_ref, rtol=tol, atol=tol)
    untouched = before.clone()
    o1_openrlhf.log_probs_from_logits(untouched, labels)  # temperature 1: no scaling
    torch.testing.assert_close(untouched, before, rtol=0, atol=0)


def test_openrlhf_log_probs_from_hidden():
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 9, D, generator=g, requires_grad=True)
    weight = torch.randn(V, D, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (2, 9), generator=g)
    labels[1, -2:] = -100
    up = torch.randn(2, 9, generator=g, dtype=torch.float64)
    out = o1_openrlhf.log_probs_from_hidden(hidden, weight, labels, temperature=1.3)
    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    ref = ref_logprobs((h64 @ w64.T) / 1.3, labels)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    for a, b in zip(grads(out, up.float(), (hidden, weight)), grads(ref, up, (h64, w64))):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "patch, package", [(o1_verl.patch_verl, "verl"), (o1_openrlhf.patch_openrlhf, "openrlhf")]
)
def test_patch_names_the_missing_package(monkeypatch, patch, package):
    monkeypatch.setitem(sys.modules, package, None)
    with pytest.raises(ImportError, match=f"`{package}` package"):
        patch()


def test_patch_functions_swap_the_module_attributes(monkeypatch):
    """Only the swapping logic: stand-in module objects, since the real packages do not install here."""
    names = [
        "verl", "verl.utils", "verl.utils.torch_functional", "verl.utils.experimental",
        "verl.utils.experimental.torch_functional", "openrlhf", "openrlhf.models",
        "openrlhf.models.utils", "openrlhf.models.actor",
    ]
    stand_ins = {name: types.ModuleType(name) for name in names}
    for name, module in stand_ins.items():
        monkeypatch.setitem(sys.modules, name, module)
    o1_verl.patch_verl()
    o1_openrlhf.patch_openrlhf()
    assert stand_ins["verl.utils.torch_functional"].logprobs_from_logits is o1_verl.logprobs_from_logits
    assert stand_ins["verl.utils.torch_functional"].entropy_from_logits is o1_verl.entropy_from_logits
    assert stand_ins["verl.utils.experimental.torch_functional"].FusedLinearForPPO is o1_verl.FusedLinearForPPO
    for name in ("openrlhf.models.utils", "openrlhf.models.actor"):
        assert stand_ins[name].log_probs_from_logits is o1_openrlhf.log_probs_from_logits
