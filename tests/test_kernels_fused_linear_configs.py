"""Every GPU autotuning candidate of the fused LM-head kernels is correct, in the interpreter.

The GPU autotuner may pick any candidate of `_flp_configs`; each one is run here at small odd
shapes (partial row and vocabulary tiles, labels in the last partial tile, ignored labels,
non-contiguous inputs, random upstream gradients on log-prob and entropy) against the float64
reference, with both the 32-bit offset path and the guarded 64-bit one.
"""
from __future__ import annotations

import pytest
import torch
from test_kernels_common import DEVICE, assert_close_to_ref, labels_with_ignored, noncontiguous

from o1pruner_kernels import _flp_configs as fc
from o1pruner_kernels import _fused_linear_triton as flt
from o1pruner_kernels import fused_linear_logprobs
from o1pruner_kernels.reference import fused_linear_logprobs_reference

_BWD_MODE = {"fwd": "matmul", "bwd_dz": "matmul", "bwd_atomic": "atomic"}
CASES = [
    pytest.param(kind, dtype, tile, i64, id=f"{kind}-{str(dtype)[6:]}-{'x'.join(map(str, tile[:3]))}-w{tile[3]}s{tile[4]}"
                 + ("-i64" if i64 else ""))
    for kind, per_size in fc.CANDIDATES.items()
    for size, dtype in ((2, torch.bfloat16), (4, torch.float32))
    for j, tile in enumerate(per_size[size])
    for i64 in ((False, True) if j == 0 else (False,))  # the 64-bit path once per kernel and size
]


@pytest.mark.slow
@pytest.mark.parametrize("kind,dtype,tile,i64", CASES)
def test_candidate_matches_float64_reference(kind, dtype, tile, i64, monkeypatch):
    if i64:  # the launcher picks 64-bit offsets only past 2^31 elements; force that path here
        monkeypatch.setattr(flt, "_needs_i64", lambda *extents: True)
    cfg = fc.as_dict(tile)
    N, D = cfg["block_n"] + 5, 45  # one full row tile and a partial one
    V = cfg["block_v"] + 19  # a full vocabulary tile and a partial one
    gen = torch.Generator().manual_seed(N * 31 + V)
    h2 = torch.randn(N, D, generator=gen).to(dtype)
    w2 = (torch.randn(V, D, generator=gen) * 0.4).to(dtype)
    y = labels_with_ignored((N,), V, gen)
    g_logp, g_ent = torch.randn(N, generator=gen), torch.randn(N, generator=gen)

    h64, w64 = h2.double().requires_grad_(), w2.double().requires_grad_()
    ref_lp, ref_ent = fused_linear_logprobs_reference(h64, w64, y, 0.8)
    (ref_lp * g_logp + ref_ent * g_ent).sum().backward()

    h = noncontiguous(h2.to(DEVICE), "sliced").detach().requires_grad_()
    w = noncontiguous(w2.to(DEVICE), "transposed").detach().requires_grad_()
    lp, ent = fused_linear_logprobs(h, w, y.to(DEVICE), temperature=0.8, return_entropy=True, backend="triton",
                                    bwd=_BWD_MODE[kind], **cfg)
    (lp * g_logp.to(DEVICE) + ent * g_ent.to(DEVICE)).sum().backward()

    naive = [None] * 4
    if dtype != torch.float32:
        hn, wn = h2.clone().requires_grad_(), w2.clone().requires_grad_()
        n_lp, n_ent = fused_linear_logprobs_reference(hn, wn, y, 0.8)
        (n_lp * g_logp.to(dtype) + n_ent * g_ent.to(dtype)).sum().backward()
        naive = [n_lp, n_ent, hn.grad, wn.grad]
    assert_close_to_ref(lp, ref_lp, naive[0], "logp")
    assert_close_to_ref(ent, ref_ent, naive[1], "entropy")
    if dtype == torch.float32:
        assert_close_to_ref(h.grad, h64.grad, None, "d_hidden")
        assert_close_to_ref(w.grad, w64.grad, None, "d_weight")
    else:
        _assert_grads_within_dz_rounding(h, w, h2, w2, y, g_logp, g_ent, h64.grad, w64.grad, naive[2:])
    assert (lp <= 0).all() and (lp[y.to(DEVICE) == -100] == 0).all()


def _assert_grads_within_dz_rounding(h, w, h2, w2, y, g_logp, g_ent, ref_dh, ref_dw, naive):
    """bf16: the kernels round dz = d loss / d logits to bf16 before the GEMMs (the interpreter
    truncates: up to 2^-7 relative), which the naive bf16 computation does not; so the bound is
    the naive error plus that rounding propagated, 2^-7 |dz| @ |W| and 2^-7 |dz|^T @ |h|, plus
    one rounding of the result."""
    z = (h2.double() @ w2.double().T).requires_grad_()
    logp_all = torch.log_softmax(z / 0.8, -1)
    valid = y != -100
    lp = torch.where(valid, logp_all.gather(1, y.clamp(min=0)[:, None]).squeeze(1), 0.0)
    ent = torch.where(valid, -(logp_all.exp() * logp_all).sum(-1), 0.0)
    (dz,) = torch.autograd.grad((lp * g_logp + ent * g_ent).sum(), z)
    for got, ref, nv, prop, what in ((h.grad, ref_dh, naive[0], dz.abs() @ w2.double().abs(), "d_hidden"),
                                     (w.grad, ref_dw, naive[1], dz.abs().T @ h2.double().abs(), "d_weight")):
        err = (got.detach().double().cpu() - ref).abs()
        bound = (nv.double() - ref).abs() + 2.0**-7 * (prop + ref.abs()) + 1e-4 * ref.abs().max()
        bad = ~(err <= bound)
        assert not bad.any(), f"{what}: {int(bad.sum())}/{bad.numel()} elements off, max err {err.max():.3g}"


def test_logp_without_entropy_matches_with_entropy():
    """The forward's no-entropy variant (the trainer's) gives the same log-probs and gradients."""
    gen = torch.Generator().manual_seed(5)
    h2, w2 = torch.randn(23, 40, generator=gen), torch.randn(70, 40, generator=gen) * 0.4
    y = labels_with_ignored((23,), 70, gen)
    g = torch.randn(23, generator=gen)
    grads = []
    for with_ent in (False, True):
        h, w = h2.clone().to(DEVICE).requires_grad_(), w2.clone().to(DEVICE).requires_grad_()
        out = fused_linear_logprobs(h, w, y.to(DEVICE), return_entropy=with_ent, backend="triton")
        lp = out[0] if with_ent else out
        (lp * g.to(DEVICE)).sum().backward()
        grads.append((lp.detach(), h.grad, w.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bwd", ["matmul", "atomic"])
def test_autotuned_launch_path(bwd, monkeypatch):
    """The GPU path through triton.autotune (grid per config, neutral unused split columns, keys,
    dtype pruning), run by the interpreter: fp32 (no bf16 upcast needed) with the candidate lists
    cut to one config each, so the autotuner launches without benchmarking."""
    monkeypatch.setenv("O1PRUNER_AUTOTUNE", "1")  # gpu_check.sh runs the other tests with autotuning off
    monkeypatch.setattr(flt, "interpreting", lambda: False)
    for kind in fc.CANDIDATES:
        monkeypatch.setitem(fc.CANDIDATES[kind], 4, fc.CANDIDATES[kind][4][:1])
    gen = torch.Generator().manual_seed(11)
    N, D, V = 70, 33, 150
    h2, w2 = torch.randn(N, D, generator=gen), torch.randn(V, D, generator=gen) * 0.4
    y = labels_with_ignored((N,), V, gen)
    g_logp, g_ent = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    assert flt._config({}, torch.float32)["autotune"]
    h, w = h2.clone().to(DEVICE).requires_grad_(), w2.clone().to(DEVICE).requires_grad_()
    lp, ent = fused_linear_logprobs(h, w, y.to(DEVICE), temperature=1.3, return_entropy=True, backend="triton", bwd=bwd)
    (lp * g_logp.to(DEVICE) + ent * g_ent.to(DEVICE)).sum().backward()
    tuned = {"fwd": flt._fwd_tuned, "bwd_dz" if bwd == "matmul" else "bwd_atomic":
             flt._bwd_dz_tuned if bwd == "matmul" else flt._bwd_atomic_tuned}
    for kind, tuner in tuned.items():  # the launches went through the autotuners, with the fp32 candidate
        assert tuner.best_config.kwargs["BLOCK_N"] == fc.CANDIDATES[kind][4][0][0]
        assert tuner.best_config.kwargs["BLOCK_V"] == fc.CANDIDATES[kind][4][0][1]
    h64, w64 = h2.double().requires_grad_(), w2.double().requires_grad_()
    ref_lp, ref_ent = fused_linear_logprobs_reference(h64, w64, y, 1.3)
    (ref_lp * g_logp + ref_ent * g_ent).sum().backward()
    for got, ref, what in ((lp, ref_lp, "logp"), (ent, ref_ent, "entropy"), (h.grad, h64.grad, "d_hidden"),
                           (w.grad, w64.grad, "d_weight")):
        assert_close_to_ref(got, ref, None, what)
