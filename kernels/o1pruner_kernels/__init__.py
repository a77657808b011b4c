"""Fused kernels for length-harmonizing / PPO-style fine-tuning, usable by any trainer.

Five functional entry points. The three that stream over the vocabulary or the tokens have a
Triton implementation (CUDA tensors) and a PyTorch one (everything else), and take
`backend="auto" | "triton" | "torch"` to override the choice; the sequence reductions and the
reward are a few elementwise ops, plain PyTorch on every device:

- `logprobs_from_logits(logits, labels, *, temperature, ignore_index, return_entropy, backend)`
  -> fp32 log-prob of each label (and entropy), online log-sum-exp over V in one pass.
- `fused_linear_logprobs(hidden, weight, labels, *, ..., **tuning)` -> the same from hidden
  states and the LM head without ever materialising the [N, V] logits; d_hidden and d_weight
  for arbitrary per-token upstream gradients (log-prob and entropy).
- `sequence_logprobs(token_logps, mask, *, normalize)` -> (per-sequence mean or sum, lengths).
- `length_harmonizing_reward(lengths, correct, ref_mean_length, ref_mean_accuracy, *, lam, clip)`
  -> Lbar/L - 1 + lam (A - Abar), clipped; lengths <= 0 raise ValueError.
- `clipped_ratio_loss(logps, old_logps, advantages, mask, *, eps_low, eps_high, level, backend,
  normalizer=None)` -> (loss, stats). `normalizer` (float or 0-d tensor), when given, divides the
  SUM of per-sequence (level="sequence") or per-token (level="token") terms instead of the local
  count of valid units, so a distributed trainer can normalise by the global count across ranks
  and micro-batches. Stats (ratio_mean, clip_frac, log_ratio_mean) stay local means.

Conventions: ignored labels (== ignore_index, or negative) give log-prob 0, entropy 0 and zero
gradient; all outputs that are log-probs or losses are fp32 with fp32 accumulation; log-probs
are never positive; finite inputs never give NaN (fully masked rows included); NaN inputs
give NaN outputs. Temperature divides the logits for log-prob and entropy alike. Entropy is
differentiable in both backends. On CUDA the Triton path does not range-check labels unless
KERNELS_CHECK_LABELS=1 (the check costs a host sync).
"""
from .fused_linear import fused_linear_logprobs
from .logprobs import logprobs_from_logits
from .ratio_loss import clipped_ratio_loss
from .sequence import length_harmonizing_reward, sequence_logprobs

__all__ = [
    "logprobs_from_logits",
    "fused_linear_logprobs",
    "sequence_logprobs",
    "length_harmonizing_reward",
    "clipped_ratio_loss",
]
