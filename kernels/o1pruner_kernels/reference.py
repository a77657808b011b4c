"""Plain PyTorch references: the oracle for the tests and the building blocks of the CPU path.

Every function computes in the dtype of its inputs (pass float64 tensors for an oracle) and is
differentiable by ordinary autograd. They materialise full [N, V] tensors; they are meant to be
obviously right, not economical.
"""
from __future__ import annotations

import torch


def valid_label_mask(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Labels that count; negative labels other than ignore_index are treated as ignored too."""
    return (labels != ignore_index) & (labels >= 0)


def logprobs_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logp, entropy) of shape labels.shape; ignored positions give 0 for both.

    `with_entropy=False` skips the entropy (returned as None), saving two [N, V] passes."""
    valid = valid_label_mask(labels, ignore_index)
    logp_all = torch.log_softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    # Rounding can push z_y - lse a hair above 0; log-probs are never positive.
    logp = torch.where(valid, logp.clamp(max=0.0), zero)
    if not with_entropy:
        return logp, None
    # -inf logits have p = 0; masking them keeps 0 * -inf from turning the entropy into NaN.
    finite_logp = logp_all.masked_fill(torch.isneginf(logp_all), 0.0)
    entropy = -(logp_all.exp() * finite_logp).sum(-1)
    return logp, torch.where(valid, entropy, zero)


def fused_linear_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    return logprobs_reference(hidden @ weight.T, labels, temperature, ignore_index)


def clipped_ratio_loss_reference(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    level: str = "sequence",
    normalizer: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    m = mask.to(torch.bool)
    zero = torch.zeros((), dtype=logps.dtype, device=logps.device)
    log_ratio = torch.where(m, logps - old_logps, zero)
    if level == "sequence":
        n = m.sum(-1)
        unit_valid = n > 0
        log_r = log_ratio.sum(-1) / n.clamp(min=1).to(logps.dtype)
        adv = advantages.to(logps.dtype)
    elif level == "token":
        unit_valid = m
        log_r = log_ratio
        adv = advantages.to(logps.dtype).unsqueeze(-1).expand_as(logps)
    else:
        raise ValueError(f"level must be 'sequence' or 'token', got {level!r}")
    r = torch.exp(log_r)
    unclipped = -adv * r
    clipped = -adv * r.clamp(1.0 - eps_low, 1.0 + eps_high)
    term = torch.where(unit_valid, torch.maximum(unclipped, clipped), zero)
    count = unit_valid.sum()
    denom = count.clamp(min=1).to(logps.dtype) if normalizer is None else normalizer
    loss = term.sum() / denom
    with torch.no_grad():
        cnt = count.clamp(min=1).to(logps.dtype)
        stats = {
            "ratio_mean": torch.where(unit_valid, r, zero).sum() / cnt,
            "clip_frac": (unit_valid & (clipped > unclipped)).sum().to(logps.dtype) / cnt,
            "log_ratio_mean": torch.where(unit_valid, log_r, zero).sum() / cnt,
        }
    return loss, stats
