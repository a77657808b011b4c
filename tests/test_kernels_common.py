"""Shared helpers for the kernel tests (no tests here).

Accuracy rule, after Cut Cross-Entropy: for low-precision inputs a kernel must be, per element,
at least as close to the float64 reference as the naive PyTorch computation in that same dtype
is, up to a small tolerance; for fp32 a fixed tight tolerance against float64.
"""
from __future__ import annotations

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]
FP32_ATOL, FP32_RTOL = 2e-5, 1e-4


# Triton's CPU interpreter converts fp32 -> bf16 by truncation (measured: 1.14817 -> 1.140625,
# even with fp_downcast_rounding="rtne"), GPUs round to nearest: allow one whole ulp there.
INTERPRETED = DEVICE == "cpu"


def assert_close_to_ref(
    got: torch.Tensor, ref64: torch.Tensor, naive: torch.Tensor | None, what: str, truncating: bool = False
) -> None:
    """fp32: |got - ref| <= atol + rtol |ref|.  Low precision: |got - ref| <= |naive - ref| + tol.

    `truncating`: the result went through the interpreter's truncating bf16 cast."""
    got = got.detach().double().cpu()
    ref64 = ref64.detach().double().cpu()
    assert got.shape == ref64.shape, (what, got.shape, ref64.shape)
    err = (got - ref64).abs()
    if naive is None:
        bound = FP32_ATOL + FP32_RTOL * ref64.abs()
    else:
        naive_err = (naive.detach().double().cpu() - ref64).abs()
        # One bf16 rounding of the result (half an ulp <= 2^-8 relative; a whole ulp when
        # truncating) plus a floor for values near 0.
        rel = 2.0**-7 if truncating else 2.0**-8
        bound = naive_err + rel * ref64.abs() + 1e-3 * ref64.abs().max().clamp(min=1e-6)
    bad = ~(err <= bound)  # NaN counts as bad
    assert not bad.any(), f"{what}: {int(bad.sum())}/{bad.numel()} elements off, max err {err.max():.3g}"


def labels_with_ignored(shape: tuple[int, ...], vocab: int, gen: torch.Generator) -> torch.Tensor:
    y = torch.randint(0, vocab, shape, generator=gen)
    flat = y.view(-1)
    flat[::5] = -100
    if flat.numel() > 3:
        flat[3] = vocab - 1  # the last vocabulary entry lives in a partial tile
    return y


def noncontiguous(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Same values as x ([N, K]) in a non-contiguous layout of the given kind."""
    if kind == "contiguous":
        return x
    if kind == "transposed":
        return x.T.contiguous().T  # strides (1, N)
    if kind == "sliced":
        big = torch.zeros(x.shape[0], x.shape[1] + 9, dtype=x.dtype, device=x.device)
        big[:, 3 : 3 + x.shape[1]] = x
        return big[:, 3 : 3 + x.shape[1]]  # row stride K + 9
    raise ValueError(kind)
