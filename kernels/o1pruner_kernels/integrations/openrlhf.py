"""OpenRLHF: a drop-in for its log-prob helper, computed by this library's kernels.

- `log_probs_from_logits(logits, labels, temperature=1.0)`: as `openrlhf.models.utils.log_probs_from_logits`,
  including its side effect: with temperature != 1 it divides `logits` IN PLACE (OpenRLHF's Actor relies
  on the scaled logits afterwards), then returns log_softmax(logits)[..., label] of shape labels.shape in
  logits' dtype (fp32 accumulation inside); a label of -100 gives 0, like flash-attn's cross entropy.
- `log_probs_from_hidden(hidden_states, lm_head_weight, labels, temperature=1.0)`: the same log-probs of
  softmax((hidden @ W.T) / temperature) from the body's hidden states, without building the logits and
  without the in-place side effect (there are no logits). OpenRLHF's Actor builds logits through the full
  model; to use it, call the model's body (`model.model(...)`) and pass its last hidden state.

`patch_openrlhf()` swaps the drop-in into `openrlhf.models.utils` and `openrlhf.models.actor` (which
imports the name).
"""
from __future__ import annotations

import torch

from ..fused_linear import fused_linear_logprobs
from ..logprobs import logprobs_from_logits as _logprobs
from . import require

FEATURE = "o1pruner_kernels.integrations.openrlhf"


def log_probs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """OpenRLHF's `log_probs_from_logits` (scales `logits` in place when temperature != 1)."""
    if temperature != 1.0:
        logits.div_(temperature)
    return _logprobs(logits, labels, ignore_index=-100).to(logits.dtype)


def log_probs_from_hidden(
    hidden_states: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log_softmax((hidden @ W.T) / temperature)[label], fp32, shape labels.shape; no [N, V] logits."""
    return fused_linear_logprobs(hidden_states, lm_head_weight, labels, temperature=temperature, ignore_index=-100)


def patch_openrlhf() -> None:
    """Point OpenRLHF's `log_probs_from_logits` (in models.utils and models.actor) at the drop-in."""
    for module in ("openrlhf.models.utils", "openrlhf.models.actor"):
        require(module, "openrlhf", FEATURE).log_probs_from_logits = log_probs_from_logits
