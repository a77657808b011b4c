"""The objectives the trainer can optimise: the O1-Pruner clipped ratio loss and the paper's baselines.

Every loss is a SUM over this micro-batch's units divided by `normalizer`, the number of units
(sequences, tokens or pairs) in the whole global step over all ranks and accumulation steps, so
the gradient is the same however the step is split across processes and micro-batches.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from o1pruner_kernels.ratio_loss import clipped_ratio_loss
from o1pruner_kernels.sequence import sequence_logprobs
from pruner.configs import LOSSES


def normalizer_units(loss: str, ratio_level: str) -> str:
    """What one step's loss is averaged over: 'sequences', 'tokens' or 'pairs'."""
    if loss == "lh":
        return "sequences" if ratio_level == "sequence" else "tokens"
    return {"sft": "tokens", "dpo": "pairs"}[loss]


def count_units(units: str, response_lengths: list[int]) -> int:
    if units == "tokens":
        return sum(response_lengths)
    if units == "pairs":
        return len(response_lengths) // 2
    return sum(1 for n in response_lengths if n > 0)


def compute_loss(loss: str, logps: torch.Tensor, old_logps: torch.Tensor | None, mask: torch.Tensor,
                 advantages: torch.Tensor, normalizer: float, *, ratio_level: str = "sequence",
                 eps_low: float = 0.2, eps_high: float = 0.2, dpo_beta: float = 0.1,
                 chosen: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one micro-batch (already divided by the global `normalizer`) and detached statistics.

    `old_logps` are the log-probs of the policy that sampled the training set (the ratio's
    denominator; DPO's reference): the frozen reference model in the first round, the round's
    sampling policy in an on-policy round."""
    if loss == "lh":
        value, stats = clipped_ratio_loss(logps, old_logps, advantages, mask, eps_low=eps_low,
                                                  eps_high=eps_high, level=ratio_level, normalizer=normalizer)
        names = {"ratio_mean": "mean_ratio", "clip_frac": "clip_fraction"}
        return value, {names.get(k, k): v.detach() for k, v in stats.items()}
    if loss == "sft":
        total = -(logps * mask).sum()
        nll = total.detach() / mask.sum().clamp(min=1)
        return total / normalizer, {"nll": nll}
    if loss == "dpo":
        # Rows come in (chosen, rejected) pairs, adjacent; the `chosen` flags say which is which.
        seq, _ = sequence_logprobs(logps, mask, normalize=False)
        old_seq, _ = sequence_logprobs(old_logps, mask, normalize=False)
        margin = (seq - old_seq).view(-1, 2)
        sign = torch.where(chosen.view(-1, 2)[:, 0].bool(), 1.0, -1.0).to(margin)
        delta = sign * (margin[:, 0] - margin[:, 1])
        per_pair = -F.logsigmoid(dpo_beta * delta)
        return per_pair.sum() / normalizer, {"reward_margin": (dpo_beta * delta).detach().mean(),
                                             "pair_accuracy": (delta > 0).float().mean().detach()}
    raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")
