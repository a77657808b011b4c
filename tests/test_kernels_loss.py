"""clipped_ratio_loss (both backends), sequence_logprobs and length_harmonizing_reward."""
from __future__ import annotations

import pytest
import torch
from test_kernels_common import BACKENDS, DEVICE, INTERPRETED, assert_close_to_ref

from o1pruner_kernels import clipped_ratio_loss, length_harmonizing_reward, sequence_logprobs
from o1pruner_kernels.reference import clipped_ratio_loss_reference

B, T = 7, 45


def _batch(dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, T, generator=gen) * 3
    old = logps + torch.randn(B, T, generator=gen) * 0.4  # ratios on both sides of the clip range
    adv = torch.randn(B, generator=gen)
    adv[4] = 0.0
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[0], lengths[2] = T, 0  # a full row and a fully masked row
    mask = torch.arange(T)[None, :] < lengths[:, None]
    # Garbage where the mask is off must never reach the result.
    logps, old = logps.masked_fill(~mask, float("nan")), old.masked_fill(~mask, float("inf"))
    return logps.to(dtype), old.to(dtype), adv, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["sequence", "token"])
@pytest.mark.parametrize("dtype,normalizer", [(torch.float32, None), (torch.bfloat16, None), (torch.float32, 11.0)])
def test_matches_float64_reference(backend, level, dtype, normalizer):
    logps, old, adv, mask = _batch(dtype)
    eps = dict(eps_low=0.2, eps_high=0.28)
    g = 1.7  # a non-unit upstream gradient
    lp64 = logps.double().requires_grad_()
    ref, ref_stats = clipped_ratio_loss_reference(lp64, old.double(), adv.double(), mask, level=level,
                                                  normalizer=normalizer, **eps)
    (ref * g).backward()
    assert 0 < ref_stats["clip_frac"] < 1, "the batch must exercise both branches"

    x = logps.T.contiguous().T.to(DEVICE).requires_grad_()  # non-contiguous [B, T]
    loss, stats = clipped_ratio_loss(x, old.to(DEVICE), adv.to(DEVICE), mask.to(DEVICE), level=level,
                                     backend=backend, normalizer=normalizer, **eps)
    (loss * g).backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0 and x.grad.dtype == dtype
    assert_close_to_ref(loss, ref, None, "loss")
    for k in ("ratio_mean", "clip_frac", "log_ratio_mean"):
        assert_close_to_ref(stats[k], ref_stats[k], None, k)
    naive = None
    if dtype != torch.float32:
        lpn = logps.clone().requires_grad_()
        n_loss, _ = clipped_ratio_loss_reference(lpn, old, adv.to(dtype), mask, level=level, **eps)
        (n_loss * g).backward()
        naive = lpn.grad
    assert_close_to_ref(x.grad, lp64.grad, naive, "d_logps", backend == "triton" and INTERPRETED)
    assert (x.grad[~mask.to(DEVICE)] == 0).all() and (x.grad[4] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["sequence", "token"])
def test_fully_masked_batch_and_normalizer(backend, level):
    logps, old, adv, mask = _batch(torch.float32, seed=3)
    x = logps.to(DEVICE).requires_grad_()
    none = torch.zeros_like(mask, device=DEVICE)
    loss, stats = clipped_ratio_loss(x, old.to(DEVICE), adv.to(DEVICE), none, level=level, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and (x.grad == 0).all()
    assert all(torch.isfinite(v) for v in stats.values())

    # normalizer = local count must reproduce the default mean; a 0-d tensor works too.
    args = (x, old.to(DEVICE), adv.to(DEVICE), mask.to(DEVICE))
    mean_loss, _ = clipped_ratio_loss(*args, level=level, backend=backend)
    count = float((mask.sum(-1) > 0).sum() if level == "sequence" else mask.sum())
    summed, _ = clipped_ratio_loss(*args, level=level, backend=backend, normalizer=torch.tensor(1.0, device=DEVICE))
    global_loss, _ = clipped_ratio_loss(*args, level=level, backend=backend, normalizer=4 * count)
    torch.testing.assert_close(summed / count, mean_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(global_loss * 4, mean_loss, rtol=1e-6, atol=1e-7)

    # a NaN on a valid token is never silently dropped
    bad = logps.clone()
    bad[0, 0] = float("nan")
    nan_loss, _ = clipped_ratio_loss(bad.to(DEVICE), *args[1:], level=level, backend=backend)
    assert torch.isnan(nan_loss)


def test_ratio_loss_rejects_bad_arguments():
    logps, old, adv, mask = _batch(torch.float32)
    with pytest.raises(ValueError):
        clipped_ratio_loss(logps, old, adv, mask, level="step")
    with pytest.raises(ValueError):
        clipped_ratio_loss(logps, old, adv[:3], mask)
    with pytest.raises(ValueError):
        clipped_ratio_loss(logps, old, adv, mask, eps_low=1.0)
    for bad in (0, -3.0, float("inf")):  # normalizer=0 used to return inf
        with pytest.raises(ValueError, match="normalizer must be a positive finite count"):
            clipped_ratio_loss(logps, old, adv, mask, normalizer=bad)


def test_sequence_logprobs():
    gen = torch.Generator().manual_seed(1)
    x = -torch.rand(4, 9, generator=gen)
    mask = torch.tensor([[1] * 9, [1] * 3 + [0] * 6, [0] * 9, [0, 1, 1, 0, 1, 0, 0, 0, 0]])
    x = x.masked_fill(mask == 0, float("nan")).requires_grad_()
    mean, lengths = sequence_logprobs(x, mask)
    total, _ = sequence_logprobs(x, mask.bool(), normalize=False)
    assert lengths.dtype == torch.int64 and lengths.tolist() == [9, 3, 0, 3]
    xs = x.detach().nan_to_num(0.0)
    expected = xs.sum(-1)
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(mean, expected / lengths.clamp(min=1))
    assert mean[2] == 0 and total.dtype == torch.float32
    mean.sum().backward()
    torch.testing.assert_close(x.grad, mask / lengths.clamp(min=1)[:, None].float())


def test_length_harmonizing_reward():
    lengths = torch.tensor([100, 50, 400, 1, 1000])
    correct = torch.tensor([True, False, True, True, False])
    ref_mean_length = torch.tensor([200.0, 200.0, 200.0, 200.0, 200.0])
    ref_mean_accuracy = torch.tensor([0.5, 0.5, 0.25, 0.5, 1.0])
    r = length_harmonizing_reward(lengths, correct, ref_mean_length, ref_mean_accuracy, lam=2.0)
    raw = [200 / 100 - 1 + 2 * 0.5, 200 / 50 - 1 - 2 * 0.5, 200 / 400 - 1 + 2 * 0.75, 200 - 1 + 1.0, 0.2 - 1 - 2.0]
    torch.testing.assert_close(r, torch.tensor([min(max(v, -2.0), 4.0) for v in raw]))
    assert r.dtype == torch.float32 and r[3] == 4.0 and r[4] == -2.0
    unclipped = length_harmonizing_reward(lengths, correct, 200.0, ref_mean_accuracy, lam=2.0, clip=None)
    torch.testing.assert_close(unclipped, torch.tensor(raw))
    with pytest.raises(ValueError, match="length"):
        length_harmonizing_reward(torch.tensor([3, 0]), torch.tensor([1, 1]), 5.0, 0.5, lam=1.0)
    nan = length_harmonizing_reward(torch.tensor([3]), torch.tensor([1]), float("nan"), 0.5, lam=1.0)
    assert torch.isnan(nan).all()
