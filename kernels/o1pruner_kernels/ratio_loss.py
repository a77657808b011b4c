"""PPO-style clipped surrogate with a sequence-level (O1-Pruner) or token-level ratio.

Layers: `_seq_fwd_kernel` / `_tok_kernel` (Triton, one program per sequence, streaming T in
tiles) -> `TritonClippedRatioLoss` (autograd.Function) -> `clipped_ratio_loss` (validation +
dispatch); the torch path is `reference.clipped_ratio_loss_reference` in fp32.

Gradients flow to `logps` only; `old_logps` and `advantages` are treated as constants.
Per unit u (a sequence, or a token), term_u = max(-A r_u, -A clip(r_u, 1-eps_low, 1+eps_high));
its derivative w.r.t. r_u is -A where the unclipped branch is the max, else 0.
The loss is sum_u term_u / denominator, the denominator being the local count of valid units
(sequences with >= 1 token, or tokens) or `normalizer` when given (e.g. the global count over
ranks and micro-batches). Statistics are always local means over valid units and detached.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import interpreting, launch, next_pow2, resolve_backend
from .reference import clipped_ratio_loss_reference


@triton.jit
def _clip_term(r, a, lo, hi):
    un = -a * r
    cl = -a * tl.minimum(tl.maximum(r, lo), hi)
    clipped = cl > un
    return tl.where(clipped, cl, un), clipped  # `where`, not max: a NaN ratio stays NaN


@triton.jit
def _log_ratio_tile(lp_ptr, s_lb, s_lt, old_ptr, s_ob, s_ot, m_ptr, s_mb, s_mt, b, ts, T):
    """Row b's tile at positions ts: (in range, valid token, logps - old_logps or 0 where invalid)."""
    ok = ts < T
    mk = tl.load(m_ptr + b * s_mb + ts * s_mt, mask=ok, other=0) != 0
    lp = tl.load(lp_ptr + b * s_lb + ts * s_lt, mask=mk, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + b * s_ob + ts * s_ot, mask=mk, other=0.0).to(tl.float32)
    return ok, mk, tl.where(mk, lp - old, 0.0)


@triton.jit
def _seq_fwd_kernel(
    lp_ptr, s_lb, s_lt, old_ptr, s_ob, s_ot, m_ptr, s_mb, s_mt, adv_ptr, out_ptr,
    T, lo, hi, BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    acc = 0.0
    cnt = 0.0
    for t0 in range(0, T, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        _ok, mk, log_r = _log_ratio_tile(lp_ptr, s_lb, s_lt, old_ptr, s_ob, s_ot, m_ptr, s_mb, s_mt, b, ts, T)
        acc += tl.sum(log_r, 0)
        cnt += tl.sum(mk.to(tl.float32), 0)
    a = tl.load(adv_ptr + b).to(tl.float32)
    valid = cnt > 0
    n = tl.maximum(cnt, 1.0)
    log_r = acc / n
    r = tl.exp(log_r)
    term, clipped = _clip_term(r, a, lo, hi)
    # d term / d logp_bt for every valid token t of row b: (dterm/dr) * r / n
    coef = tl.where(clipped, 0.0, -a * r / n)
    out = out_ptr + b * 6
    tl.store(out + 0, tl.where(valid, term, 0.0))
    tl.store(out + 1, tl.where(valid, coef, 0.0))
    tl.store(out + 2, tl.where(valid, r, 0.0))
    tl.store(out + 3, tl.where(valid & clipped, 1.0, 0.0))
    tl.store(out + 4, tl.where(valid, log_r, 0.0))
    tl.store(out + 5, tl.where(valid, 1.0, 0.0))


@triton.jit
def _tok_kernel(
    lp_ptr, s_lb, s_lt, old_ptr, s_ob, s_ot, m_ptr, s_mb, s_mt, adv_ptr, out_ptr, grad_ptr, scale_ptr,
    T, lo, hi, BACKWARD: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """BACKWARD=False: per-row sums (term, -, ratio, clipped, log-ratio, count) into out[b, :6].
    BACKWARD=True: recomputes the same quantities and writes d loss / d logps into grad[b, :]."""
    b = tl.program_id(0).to(tl.int64)
    a = tl.load(adv_ptr + b).to(tl.float32)
    scale = 0.0
    if BACKWARD:
        scale = tl.load(scale_ptr).to(tl.float32)
    s_term = 0.0
    s_r = 0.0
    s_clip = 0.0
    s_logr = 0.0
    cnt = 0.0
    for t0 in range(0, T, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        ok, mk, log_r = _log_ratio_tile(lp_ptr, s_lb, s_lt, old_ptr, s_ob, s_ot, m_ptr, s_mb, s_mt, b, ts, T)
        r = tl.exp(log_r)
        term, clipped = _clip_term(r, a, lo, hi)
        if BACKWARD:
            g = tl.where(mk & (~clipped), -a * r * scale, 0.0)
            tl.store(grad_ptr + b * T + ts, g, mask=ok)
        else:
            s_term += tl.sum(tl.where(mk, term, 0.0), 0)
            s_r += tl.sum(tl.where(mk, r, 0.0), 0)
            s_clip += tl.sum(tl.where(mk & clipped, 1.0, 0.0), 0)
            s_logr += tl.sum(log_r, 0)
            cnt += tl.sum(mk.to(tl.float32), 0)
    if not BACKWARD:
        out = out_ptr + b * 6
        tl.store(out + 0, s_term)
        tl.store(out + 1, 0.0)
        tl.store(out + 2, s_r)
        tl.store(out + 3, s_clip)
        tl.store(out + 4, s_logr)
        tl.store(out + 5, cnt)


def _block_t(T: int) -> int:
    return min(next_pow2(max(T, 1)), 32 if interpreting() else 1024)


def _args(lp, old, mask, adv):
    return (lp, lp.stride(0), lp.stride(1), old, old.stride(0), old.stride(1),
            mask, mask.stride(0), mask.stride(1), adv)


class TritonClippedRatioLoss(torch.autograd.Function):
    """Returns (loss, per-row sums [B, 6]); only the loss is differentiable, w.r.t. logps."""

    @staticmethod
    def forward(ctx, lp, old, mask, adv, lo: float, hi: float, level: str, normalizer):
        B, T = lp.shape
        rows = torch.empty((B, 6), dtype=torch.float32, device=lp.device)
        bt = _block_t(T)
        if B:
            if level == "sequence":
                launch(_seq_fwd_kernel, (B,), *_args(lp, old, mask, adv), rows, T, lo, hi, BLOCK_T=bt)
            else:
                launch(_tok_kernel, (B,), *_args(lp, old, mask, adv), rows, rows, rows, T, lo, hi, BACKWARD=False, BLOCK_T=bt)
        total = rows.sum(0)
        denom = total[5].clamp(min=1.0) if normalizer is None else torch.as_tensor(normalizer, dtype=torch.float32, device=lp.device)
        loss = total[0] / denom
        ctx.save_for_backward(lp, old, mask, adv, rows[:, 1].clone(), denom)
        ctx.args = (lo, hi, level, lp.dtype)
        ctx.mark_non_differentiable(rows)
        return loss, rows

    @staticmethod
    def backward(ctx, g_loss, _g_rows):
        lp, old, mask, adv, coef, denom = ctx.saved_tensors
        lo, hi, level, dtype = ctx.args
        if g_loss is None:
            return (None,) * 8
        scale = (g_loss.float() / denom).reshape(())
        B, T = lp.shape
        if level == "sequence":
            # the per-row coefficient came out of the fused forward; spreading it over the
            # row's valid tokens is one broadcast multiply, no kernel needed
            grad = (coef * scale).unsqueeze(1) * (mask != 0)
        else:
            grad = torch.empty((B, T), dtype=torch.float32, device=lp.device)
            if B:
                launch(_tok_kernel, (B,), *_args(lp, old, mask, adv), grad, grad, scale.contiguous(), T, lo, hi,
                                  BACKWARD=True, BLOCK_T=_block_t(T))
        return grad.to(dtype), None, None, None, None, None, None, None


def clipped_ratio_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    level: str = "sequence",
    backend: str = "auto",
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate loss (fp32 scalar) and stats {ratio_mean, clip_frac, log_ratio_mean}.

    logps, old_logps, mask [B, T]; advantages [B]. level="sequence": r_b = exp(masked mean of
    logps - old_logps) (the paper's); level="token": r_bt = exp(logps - old_logps). Units with no
    valid token contribute 0 and get zero gradient; an all-masked batch gives loss 0, never NaN.
    `normalizer` replaces the local count of valid units as the denominator of the summed terms
    (a number must be > 0: ValueError otherwise).
    """
    if level not in ("sequence", "token"):
        raise ValueError(f"level must be 'sequence' or 'token', got {level!r}")
    if logps.dim() != 2 or old_logps.shape != logps.shape or mask.shape != logps.shape:
        raise ValueError("logps, old_logps and mask must all be [B, T] of the same shape")
    if advantages.shape != logps.shape[:1]:
        raise ValueError(f"advantages must be [B] = [{logps.shape[0]}], got {tuple(advantages.shape)}")
    if not (0.0 <= eps_low < 1.0 and eps_high >= 0.0):
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {eps_low}, {eps_high}")
    if normalizer is not None and not isinstance(normalizer, torch.Tensor) and not 0 < normalizer < float("inf"):
        # a tensor normalizer is not read back here: that would sync the device on every step
        raise ValueError(f"normalizer must be a positive finite count of units, got {normalizer}")
    old_logps, advantages = old_logps.detach(), advantages.detach()
    if resolve_backend(backend, logps, old_logps, advantages, mask) == "torch":
        m = mask if mask.dtype == torch.bool else mask != 0
        return clipped_ratio_loss_reference(logps.float(), old_logps.float(), advantages.float(), m,
                                            eps_low, eps_high, level, normalizer)
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    loss, rows = TritonClippedRatioLoss.apply(
        logps, old_logps, m, advantages.contiguous(), 1.0 - eps_low, 1.0 + eps_high, level, normalizer)
    total = rows.sum(0)
    cnt = total[5].clamp(min=1.0)
    stats = {"ratio_mean": total[2] / cnt, "clip_frac": total[3] / cnt, "log_ratio_mean": total[4] / cnt}
    return loss, stats
