"""logprobs_from_logits against a float64 reference, both backends (Triton via the interpreter on CPU)."""
from __future__ import annotations

import pytest
import torch
from test_kernels_common import BACKENDS, DEVICE, INTERPRETED, assert_close_to_ref, labels_with_ignored, noncontiguous

from o1pruner_kernels import logprobs_from_logits
from o1pruner_kernels.reference import logprobs_reference

CASES = [  # (lead shape, V, temperature, layout)
    ((37,), 203, 0.7, "contiguous"),
    ((3, 11), 203, 1.0, "sliced"),
    ((29,), 97, 1.3, "transposed"),
]


def _run(backend, x, y, temperature, g_logp, g_ent):
    # detach() keeps the strides, so the leaf that receives the gradient is non-contiguous too.
    x = x.detach().requires_grad_()
    logp, ent = logprobs_from_logits(x, y, temperature=temperature, return_entropy=True, backend=backend)
    (logp * g_logp + ent * g_ent).sum().backward()
    return logp, ent, x.grad


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,V,temperature,layout", CASES)
def test_matches_float64_reference(backend, dtype, lead, V, temperature, layout):
    gen = torch.Generator().manual_seed(hash((lead, V, layout)) % 2**31)
    N = int(torch.tensor(lead).prod())
    x2 = (torch.randn(N, V, generator=gen) * 4).to(dtype)
    y = labels_with_ignored(lead, V, gen)
    g_logp = torch.randn(lead, generator=gen)
    g_ent = torch.randn(lead, generator=gen)
    x = noncontiguous(x2.to(DEVICE), layout).reshape(*lead, V)
    assert layout == "contiguous" or not x.is_contiguous()

    x64 = x2.double().reshape(*lead, V).requires_grad_()
    ref_lp, ref_ent = logprobs_reference(x64, y, temperature)
    (ref_lp * g_logp + ref_ent * g_ent).sum().backward()

    dev = lambda t: t.to(DEVICE)  # noqa: E731
    lp, ent, grad = _run(backend, x, dev(y), temperature, dev(g_logp), dev(g_ent))
    assert lp.dtype == torch.float32 and lp.shape == y.shape and grad.dtype == dtype
    naive = [None, None, None]
    if dtype != torch.float32:  # the same computation done naively in the low-precision dtype
        xn = x2.reshape(*lead, V).clone().requires_grad_()
        n_lp, n_ent = logprobs_reference(xn, y, temperature)
        (n_lp * g_logp.to(dtype) + n_ent * g_ent.to(dtype)).sum().backward()
        naive = [n_lp, n_ent, xn.grad]
    assert_close_to_ref(lp, ref_lp, naive[0], "logp")
    assert_close_to_ref(ent, ref_ent, naive[1], "entropy")
    trunc = backend == "triton" and INTERPRETED
    assert_close_to_ref(grad.reshape(*lead, V), x64.grad, naive[2], "d_logits", trunc)
    ignored = y == -100
    assert (lp[ignored.to(lp.device)] == 0).all() and (grad.reshape(N, V)[ignored.view(-1).to(grad.device)] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_values(backend):
    """-inf logits (masked vocabulary), a dominant logit, an all-ignored row, a NaN row."""
    V = 70
    x = torch.randn(5, V, dtype=torch.float32) * 3
    x[0, 10:40] = float("-inf")
    x[1, 7] = 1.0e4  # p(7) rounds to 1: z_y - lse must not come out positive
    x[4, 5] = float("nan")
    y = torch.tensor([3, 7, -100, 69, 2])
    xd = x.to(DEVICE).requires_grad_()
    lp, ent = logprobs_from_logits(xd, y.to(DEVICE), temperature=0.9, return_entropy=True, backend=backend)
    (lp.sum() + ent.sum()).backward()
    ref_lp, ref_ent = logprobs_reference(x[:4].double(), y[:4], 0.9)
    assert_close_to_ref(lp[:4], ref_lp, None, "logp")
    assert_close_to_ref(ent[:4], ref_ent, None, "entropy")
    assert (lp[:4] <= 0).all() and lp[1] == 0
    assert torch.isfinite(xd.grad[:4]).all() and (xd.grad[0, 10:40] == 0).all() and (xd.grad[2] == 0).all()
    assert torch.isnan(lp[4]) and torch.isnan(ent[4])  # NaN in, NaN out: never silently dropped


@pytest.mark.parametrize("backend", BACKENDS)
def test_logp_only_gradient_and_validation(backend, monkeypatch):
    monkeypatch.setenv("KERNELS_CHECK_LABELS", "1")  # the CUDA Triton path checks only on request
    x = torch.randn(6, 33, device=DEVICE, requires_grad=True)
    y = torch.randint(0, 33, (6,), device=DEVICE)
    logprobs_from_logits(x, y, backend=backend).sum().backward()  # entropy not requested
    p = torch.softmax(x.detach(), -1)
    expected = torch.nn.functional.one_hot(y, 33).float() - p
    torch.testing.assert_close(x.grad, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        logprobs_from_logits(x, y, temperature=0.0, backend=backend)
    with pytest.raises(ValueError):
        logprobs_from_logits(x, y[:5], backend=backend)
    with pytest.raises(IndexError):
        logprobs_from_logits(x, torch.full_like(y, 33), backend=backend)
