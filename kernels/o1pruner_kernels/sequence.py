"""Masked per-sequence reductions and the Length-Harmonizing reward.

Both are a handful of elementwise ops over [B, T] or [B]; a dedicated kernel would not beat
PyTorch's fused reductions by anything measurable next to the LM head, so they are plain
PyTorch (autograd included) on every device. The heavy [B, T] pass is `clipped_ratio_loss`.
"""
from __future__ import annotations

import torch


def sequence_logprobs(
    token_logps: torch.Tensor, mask: torch.Tensor, *, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum (normalize=False) or mean (normalize=True) of masked token log-probs.

    token_logps [B, T] (any float dtype), mask [B, T] (bool or 0/1). Returns
    (seq_logps [B] fp32, lengths [B] int64), lengths being the number of masked-in tokens.
    Sequences without any token give 0 (and zero gradient). Masked-out positions are never
    read into the result, so NaN/inf padding there is harmless.
    """
    if token_logps.shape != mask.shape or token_logps.dim() != 2:
        raise ValueError(f"token_logps and mask must both be [B, T], got {tuple(token_logps.shape)} and {tuple(mask.shape)}")
    m = mask if mask.dtype == torch.bool else mask != 0
    lengths = m.sum(-1, dtype=torch.int64)
    x = token_logps.float()
    total = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(-1)
    if normalize:
        total = total / lengths.clamp(min=1).to(total.dtype)
    return total, lengths


def length_harmonizing_reward(
    lengths: torch.Tensor,
    correct: torch.Tensor,
    ref_mean_length: torch.Tensor | float,
    ref_mean_accuracy: torch.Tensor | float,
    *,
    lam: float,
    clip: tuple[float, float] | None = (-2.0, 4.0),
) -> torch.Tensor:
    """O1-Pruner's reward R = Lbar_ref / L - 1 + lam * (A - Abar_ref), clipped to `clip`.

    lengths [B] (token counts), correct [B] (bool or 0/1), ref_mean_length / ref_mean_accuracy
    [B] or scalars (the per-problem pre-sampling statistics of each sample's problem).
    A length <= 0 raises ValueError: every response has at least one token (an EOS), so a zero
    means a bookkeeping bug upstream, and Lbar/0 would silently saturate at the clip maximum.
    `clip=None` disables clipping. Dataset-wide standardisation is left to the caller.
    Computed in float64 and returned as fp32 [B]. NaN statistics give NaN rewards.
    """
    lengths = torch.as_tensor(lengths)
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be [B], got shape {tuple(lengths.shape)}")
    if lengths.numel() and bool((lengths <= 0).any()):
        raise ValueError("every response length must be >= 1 token (got a length <= 0)")
    if clip is not None and not clip[0] <= clip[1]:
        raise ValueError(f"clip must be (low, high) with low <= high, got {clip}")
    dev = lengths.device
    L = lengths.to(torch.float64)
    A = torch.as_tensor(correct, device=dev).to(torch.float64)
    Lbar = torch.as_tensor(ref_mean_length, device=dev).to(torch.float64)
    Abar = torch.as_tensor(ref_mean_accuracy, device=dev).to(torch.float64)
    reward = Lbar / L - 1.0 + float(lam) * (A - Abar)
    if reward.shape != lengths.shape:
        raise ValueError(f"inputs broadcast to {tuple(reward.shape)}, expected {tuple(lengths.shape)}")
    if clip is not None:
        reward = reward.clamp(float(clip[0]), float(clip[1]))
    return reward.float()
