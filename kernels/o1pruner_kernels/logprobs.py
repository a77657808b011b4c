"""Per-token log-probabilities (and entropy) from given logits [..., V], one pass over V.

Layers: `_logprobs_fwd_kernel` / `_logprobs_bwd_kernel` (Triton, one program per row, online
log-sum-exp over vocabulary tiles) -> `_launch_fwd` / `_launch_bwd` -> `TritonLogprobs`
(autograd.Function; backward recomputes the softmax from the saved per-row lse) ->
`logprobs_from_logits` (validation + dispatch). The torch path is `reference.logprobs_reference`
evaluated in fp32.

Logits may have any float dtype and any strides: the kernels take the row and column strides
of the [N, V] view, so slices such as `logits[:, :-1]` are read in place without a copy.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import (
    as_rows,
    check_label_range,
    check_labels,
    check_temperature,
    interpreting,
    launch,
    next_pow2,
    resolve_backend,
    should_check_labels,
)
from ._tl import dlogits, num_warps_for, online_lse_update
from .reference import logprobs_reference, valid_label_mask


@triton.jit
def _logprobs_fwd_kernel(
    x_ptr, stride_xn, stride_xv, y_ptr, logp_ptr, lse_ptr, ent_ptr,
    V, inv_t, ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xn
    y = tl.load(y_ptr + row)
    m = -1.0e30
    s = 0.0
    t = 0.0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = tl.load(x_row + cols * stride_xv, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_t
        m, s, t = online_lse_update(m, s, t, z, 0)
    lse = m + tl.log(s)
    valid = (y != ignore_index) & (y >= 0)
    z_y = tl.load(x_row + y * stride_xv, mask=valid, other=0.0).to(tl.float32) * inv_t
    logp = z_y - lse
    logp = tl.where(logp > 0, 0.0, logp)  # a comparison, not tl.minimum, so NaN stays NaN
    tl.store(logp_ptr + row, tl.where(valid, logp, 0.0))
    tl.store(lse_ptr + row, lse)
    tl.store(ent_ptr + row, tl.where(valid, lse - t / s, 0.0))


@triton.jit
def _logprobs_bwd_kernel(
    x_ptr, stride_xn, stride_xv, y_ptr, lse_ptr, ent_ptr, glogp_ptr, gent_ptr, dx_ptr, stride_dn,
    V, inv_t, ignore_index,
    HAS_ENT_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xn
    dx_row = dx_ptr + row * stride_dn
    y = tl.load(y_ptr + row)
    valid = (y != ignore_index) & (y >= 0)
    lse = tl.load(lse_ptr + row)
    g_logp = tl.where(valid, tl.load(glogp_ptr + row), 0.0)
    g_ent = 0.0
    ent = 0.0
    if HAS_ENT_GRAD:
        g_ent = tl.where(valid, tl.load(gent_ptr + row), 0.0)
        ent = tl.load(ent_ptr + row)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        in_row = cols < V
        z = tl.load(x_row + cols * stride_xv, mask=in_row, other=float("-inf")).to(tl.float32) * inv_t
        p = tl.exp(z - lse)
        dz = dlogits(z, p, cols == y, g_logp, g_ent, lse, ent, HAS_ENT_GRAD) * inv_t
        tl.store(dx_row + cols, dz.to(dx_ptr.dtype.element_ty), mask=in_row)


def _block_v(V: int) -> int:
    return min(next_pow2(V), 64 if interpreting() else 4096)


def _launch_fwd(x: torch.Tensor, y: torch.Tensor, inv_t: float, ignore_index: int):
    N, V = x.shape
    logp = torch.empty(N, dtype=torch.float32, device=x.device)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp)
    if N:
        bv = _block_v(V)
        launch(
            _logprobs_fwd_kernel, (N,), x, x.stride(0), x.stride(1), y, logp, lse, ent, V, inv_t, ignore_index,
            BLOCK_V=bv, num_warps=num_warps_for(bv),
        )
    return logp, lse, ent


def _launch_bwd(x, y, lse, ent, g_logp, g_ent, inv_t, ignore_index):
    N, V = x.shape
    dx = torch.empty((N, V), dtype=x.dtype, device=x.device)
    if N:
        bv = _block_v(V)
        has_ent = g_ent is not None
        launch(
            _logprobs_bwd_kernel, (N,), x, x.stride(0), x.stride(1), y, lse, ent, g_logp, g_ent if has_ent else g_logp, dx, dx.stride(0),
            V, inv_t, ignore_index, HAS_ENT_GRAD=has_ent, BLOCK_V=bv, num_warps=num_warps_for(bv),
        )
    return dx


class TritonLogprobs(torch.autograd.Function):
    """Outputs (logp, entropy), both [N] fp32; the entropy output is differentiable too."""

    @staticmethod
    def forward(ctx, x, y, inv_t: float, ignore_index: int):
        logp, lse, ent = _launch_fwd(x, y, inv_t, ignore_index)
        ctx.save_for_backward(x, y, lse, ent)
        ctx.args = (inv_t, ignore_index)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(lse)
        return logp, ent, lse

    @staticmethod
    def backward(ctx, g_logp, g_ent, _g_lse):
        x, y, lse, ent = ctx.saved_tensors
        inv_t, ignore_index = ctx.args
        if g_logp is None and g_ent is None:
            return None, None, None, None
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.float().contiguous()
        g_ent = None if g_ent is None else g_ent.float().contiguous()
        dx = _launch_bwd(x, y, lse, ent, g_logp, g_ent, inv_t, ignore_index)
        return dx, None, None, None


def logprobs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log softmax(logits / temperature)[label] per position, fp32, shape labels.shape.

    Positions whose label equals `ignore_index` (or is negative) give log-prob 0, entropy 0 and
    zero gradient. With `return_entropy=True` also returns the entropy of softmax(logits / T),
    differentiable in both backends. NaN logits give NaN outputs; finite logits never give NaN.
    """
    temperature = check_temperature(temperature)
    check_labels(labels, logits.shape[:-1], "logits.shape[:-1]")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    V = logits.shape[-1]
    if V == 0:
        raise ValueError("logits have an empty vocabulary dimension")
    if resolve_backend(backend, logits, labels) == "torch":
        check_label_range(labels, valid_label_mask(labels, ignore_index), V)
        logp, ent = logprobs_reference(logits.float(), labels, temperature, ignore_index, return_entropy)
    else:
        x = as_rows(logits)
        y = labels.reshape(-1).to(torch.int64).contiguous()
        if should_check_labels(x):
            check_label_range(y, valid_label_mask(y, ignore_index), V)
        logp, ent, _ = TritonLogprobs.apply(x, y, 1.0 / temperature, ignore_index)
        logp, ent = logp.view(labels.shape), ent.view(labels.shape)
    return (logp, ent) if return_entropy else logp
