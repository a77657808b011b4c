"""fused_linear_logprobs against a float64 reference, both backends, plus the memory bound."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_kernels_common import BACKENDS, DEVICE, INTERPRETED, assert_close_to_ref, labels_with_ignored, noncontiguous

from o1pruner_kernels import _fused_linear_triton as flt
from o1pruner_kernels import fused_linear_logprobs
from o1pruner_kernels.reference import fused_linear_logprobs_reference

ROOT = Path(__file__).resolve().parents[1]

CASES = [  # (lead shape, D, V, temperature, hidden layout, weight layout, tuning per backend)
    ((37,), 45, 203, 0.7, "contiguous", "contiguous", {"torch": {"chunk_size": 8}, "triton": {"bwd_chunk": 16}}),
    ((3, 7), 45, 203, 1.0, "transposed", "sliced", {"torch": {"chunk_bytes": 4096}, "triton": {"splits": 3, "bwd": "atomic"}}),
    ((19,), 33, 77, 1.5, "sliced", "transposed", {"torch": {}, "triton": {"splits": 1}}),
]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,D,V,temperature,h_layout,w_layout,tuning", CASES)
def test_matches_float64_reference(backend, dtype, lead, D, V, temperature, h_layout, w_layout, tuning, monkeypatch):
    # d_weight's fp32 partial products (several backward chunks) in row slices of 50: the sliced path runs.
    monkeypatch.setattr(flt, "DW_SLICE_BYTES", 4 * D * 50)
    gen = torch.Generator().manual_seed(D * 1000 + V)
    N = int(torch.tensor(lead).prod())
    h2 = torch.randn(N, D, generator=gen).to(dtype)
    w2 = (torch.randn(V, D, generator=gen) * 0.4).to(dtype)
    y = labels_with_ignored(lead, V, gen)
    g_logp, g_ent = torch.randn(lead, generator=gen), torch.randn(lead, generator=gen)

    h64 = h2.double().reshape(*lead, D).requires_grad_()
    w64 = w2.double().requires_grad_()
    ref_lp, ref_ent = fused_linear_logprobs_reference(h64, w64, y, temperature)
    (ref_lp * g_logp + ref_ent * g_ent).sum().backward()

    # detach() keeps strides: the leaves that receive gradients are non-contiguous views.
    h = noncontiguous(h2.to(DEVICE), h_layout).reshape(*lead, D).detach().requires_grad_()
    w = noncontiguous(w2.to(DEVICE), w_layout).detach().requires_grad_()
    assert (h_layout == "contiguous") == h.is_contiguous() and (w_layout == "contiguous") == w.is_contiguous()
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    lp, ent = fused_linear_logprobs(h, w, dev(y), temperature=temperature, return_entropy=True,
                                    backend=backend, **tuning[backend])
    (lp * dev(g_logp) + ent * dev(g_ent)).sum().backward()
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == y.shape
    assert h.grad.dtype == w.grad.dtype == dtype

    naive = [None] * 4
    if dtype != torch.float32:
        hn, wn = h2.reshape(*lead, D).clone().requires_grad_(), w2.clone().requires_grad_()
        n_lp, n_ent = fused_linear_logprobs_reference(hn, wn, y, temperature)
        (n_lp * g_logp.to(dtype) + n_ent * g_ent.to(dtype)).sum().backward()
        naive = [n_lp, n_ent, hn.grad, wn.grad]
    trunc = backend == "triton" and INTERPRETED
    assert_close_to_ref(lp, ref_lp, naive[0], "logp")
    assert_close_to_ref(ent, ref_ent, naive[1], "entropy")
    assert_close_to_ref(h.grad, h64.grad, naive[2], "d_hidden", trunc)
    assert_close_to_ref(w.grad, w64.grad, naive[3], "d_weight", trunc)
    ignored = (y == -100).to(DEVICE)
    assert (lp[ignored] == 0).all() and (h.grad[ignored] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_and_logp_only(backend):
    gen = torch.Generator().manual_seed(7)
    h = torch.randn(21, 24, generator=gen).to(DEVICE).requires_grad_()
    w = torch.randn(50, 24, generator=gen).to(DEVICE).requires_grad_()
    y = torch.full((21,), -100, device=DEVICE)
    lp, ent = fused_linear_logprobs(h, w, y, return_entropy=True, backend=backend)
    (lp.sum() + ent.sum()).backward()
    assert (lp == 0).all() and (ent == 0).all() and (h.grad == 0).all() and (w.grad == 0).all()

    # logp alone (no entropy requested), against fp64 autograd
    y = torch.randint(0, 50, (21,), generator=gen).to(DEVICE)
    g = torch.randn(21, generator=gen).to(DEVICE)
    h.grad = w.grad = None
    (fused_linear_logprobs(h, w, y, temperature=0.5, backend=backend) * g).sum().backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref, _ = fused_linear_logprobs_reference(h64, w64, y, 0.5)
    (ref * g.double()).sum().backward()
    assert_close_to_ref(h.grad, h64.grad, None, "d_hidden")
    assert_close_to_ref(w.grad, w64.grad, None, "d_weight")

    # frozen LM head: only d_hidden is computed, and it is the same
    for tuning in ([{}] if backend == "torch" else [{"bwd": "matmul"}, {"bwd": "atomic"}]):
        h2 = h.detach().clone().requires_grad_()
        (fused_linear_logprobs(h2, w.detach(), y, temperature=0.5, backend=backend, **tuning) * g).sum().backward()
        assert_close_to_ref(h2.grad, h64.grad, None, f"d_hidden (frozen weight, {tuning})")


@pytest.mark.parametrize("scored", [0, 1, 9, 31])
def test_torch_backend_computes_only_the_rows_with_a_label(scored, monkeypatch):
    # Prompt and padding rows were run through the [N, V] GEMM both ways for nothing; now only scored rows are.
    from o1pruner_kernels import fused_linear as fl

    gen = torch.Generator().manual_seed(scored)
    h = noncontiguous(torch.randn(31, 29, generator=gen, dtype=torch.float64), "transposed").float().requires_grad_()
    w = torch.randn(97, 29, generator=gen).requires_grad_()
    y = torch.full((31,), -100)
    keep = torch.randperm(31, generator=gen)[:scored]
    y[keep] = torch.randint(0, 97, (scored,), generator=gen)
    seen = []
    real = fl._chunk_logits
    monkeypatch.setattr(fl, "_chunk_logits", lambda rows, *a: seen.append(rows.shape[0]) or real(rows, *a))
    g_lp, g_ent = torch.randn(31, generator=gen), torch.randn(31, generator=gen)
    lp, ent = fused_linear_logprobs(h, w, y, return_entropy=True, temperature=0.8, backend="torch", chunk_size=4)
    (lp * g_lp + ent * g_ent).sum().backward()
    assert sum(seen) == 2 * scored  # forward and backward, each over the scored rows only
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref_lp, ref_ent = fused_linear_logprobs_reference(h64, w64, y, 0.8)
    (ref_lp * g_lp.double() + ref_ent * g_ent.double()).sum().backward()
    assert_close_to_ref(lp, ref_lp, None, "logp")
    assert_close_to_ref(ent, ref_ent, None, "entropy")
    assert_close_to_ref(h.grad, h64.grad, None, "d_hidden")
    assert_close_to_ref(w.grad, w64.grad, None, "d_weight")
    assert (h.grad[y < 0] == 0).all() and (lp[y < 0] == 0).all() and (ent[y < 0] == 0).all()


def test_rejects_bad_arguments():
    h, w, y = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError):
        fused_linear_logprobs(h, torch.randn(10, 7), y)
    with pytest.raises(TypeError):
        fused_linear_logprobs(h, w, y, backend="torch", block_m=3)
    with pytest.raises(IndexError):
        fused_linear_logprobs(h, w, torch.full((4,), 10), backend="torch")
    for backend in ("torch", "triton"):  # V = 0 used to divide by zero deep in the chunking
        with pytest.raises(ValueError, match="V = 0"):
            fused_linear_logprobs(h, torch.randn(0, 8), y, backend=backend)


# Peak RSS (ru_maxrss, kB on Linux) of a fresh interpreter, read before and after one forward +
# backward. The inputs are allocated and a small warm-up call is made first, so the growth is what
# the op itself adds at its peak. Robust because it is the kernel's own high-water mark of the
# process, independent of allocator caching, and nothing else runs in that process.
_MEM_SCRIPT = textwrap.dedent("""
    import json, resource, torch
    from o1pruner_kernels import fused_linear_logprobs
    torch.manual_seed(0)
    N, D, V = 8192, 64, 32000
    h = torch.empty(N, D).normal_().requires_grad_()
    w = torch.empty(V, D).normal_().mul_(0.05).requires_grad_()
    y = torch.randint(0, V, (N,))
    g = torch.empty(N).normal_()
    fused_linear_logprobs(h[:64], w, y[:64], backend="torch", return_entropy=True)[0].sum().backward()
    h.grad = w.grad = None
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    before = peak()
    lp, ent = fused_linear_logprobs(h, w, y, backend="torch", return_entropy=True)
    (lp * g + ent * g).sum().backward()
    print(json.dumps({"growth": peak() - before, "finite": bool(torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all())}))
""")


@pytest.mark.slow
def test_torch_path_peak_memory_is_far_below_logits():
    # A fixed mmap threshold: glibc's adaptive one keeps freed chunk temporaries in the heap, so the
    # peak RSS wandered between 86 and 330+ MiB from run to run for the same allocations.
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'kernels'}", "OMP_NUM_THREADS": "2",
           "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run([sys.executable, "-c", _MEM_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    logits_bytes = 8192 * 32000 * 4
    assert res["finite"]
    assert res["growth"] < logits_bytes / 3, f"peak grew by {res['growth'] / 2**20:.0f} MiB"
    print(f"fused torch path peak growth {res['growth'] / 2**20:.1f} MiB vs logits {logits_bytes / 2**20:.0f} MiB")


def test_unknown_tuning_options_are_named_alone_and_the_other_backends_pass():
    h, w, y = torch.randn(4, 8), torch.randn(16, 8), torch.randint(0, 16, (4,))
    # one set of options serves both backends: the Triton ones are accepted by the torch path
    assert fused_linear_logprobs(h, w, y, backend="torch", chunk_size=2, block_n=16).shape == (4,)
    with pytest.raises(TypeError, match=r"unknown tuning options \['foo'\]$"):
        fused_linear_logprobs(h, w, y, backend="torch", chunk_size=8, block_n=3, foo=1)
