"""verl: drop-ins for its log-prob helpers, computed by this library's kernels.

- `logprobs_from_logits(logits, labels, inplace_backward=True)`: as
  `verl.utils.torch_functional.logprobs_from_logits`, log_softmax(logits)[..., label] of shape
  labels.shape, returned in fp32 (verl's flash-attn path, the one it takes on GPU installs); a label
  of -100 gives 0, like flash-attn's cross entropy. `inplace_backward` is accepted for the signature:
  the values and gradients do not depend on it (the Triton backward writes its own gradient buffer).
- `entropy_from_logits(logits)`: as verl's, logsumexp(z) - sum softmax(z) z over the last dim, in
  logits' dtype, differentiable.
- `FusedLinearForPPO(chunk_size=512, impl_backend="torch")`: as verl's hidden-states module
  (`verl.utils.experimental.torch_functional`, used by verl's `use_fused_kernels` model forward):
  `forward(hidden_states, vocab_weights, input_ids, temperature=1.0) -> (log_probs, entropy)`, log-probs
  fp32 and entropy in the logits' dtype, both of softmax((hidden @ W.T) / temperature); the logits are
  never materialised. `chunk_size` and `impl_backend` are accepted and not used.

`patch_verl()` swaps these into verl's modules (attribute lookups such as `verl_F.logprobs_from_logits`
and verl's function-local import of `FusedLinearForPPO` then resolve to them).
"""
from __future__ import annotations

import torch

from ..fused_linear import fused_linear_logprobs
from ..logprobs import logprobs_from_logits as _logprobs
from . import require

FEATURE = "o1pruner_kernels.integrations.verl"


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, inplace_backward: bool = True) -> torch.Tensor:
    """verl's `logprobs_from_logits`: fp32 log-prob of each label, shape labels.shape (-100 -> 0)."""
    return _logprobs(logits, labels, ignore_index=-100)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """verl's `entropy_from_logits`: entropy of softmax(logits) over the last dim, in logits' dtype."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    _, entropy = _logprobs(logits, labels, return_entropy=True)
    return entropy.to(logits.dtype)


class FusedLinearForPPO(torch.nn.Module):
    """verl's fused hidden-states head: (log_probs fp32, entropy) without the [N, V] logits."""

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
        super().__init__()
        self.chunk_size = chunk_size
        self.impl_backend = impl_backend

    def forward(
        self,
        hidden_states: torch.Tensor,
        vocab_weights: torch.Tensor,
        input_ids: torch.Tensor,
        temperature: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if hidden_states.ndim not in (2, 3) or input_ids.shape != hidden_states.shape[:-1]:
            raise ValueError(
                f"hidden_states [T, D] or [B, T, D] and input_ids [T] or [B, T] disagree: "
                f"{tuple(hidden_states.shape)} vs {tuple(input_ids.shape)}"
            )
        log_probs, entropy = fused_linear_logprobs(
            hidden_states, vocab_weights, input_ids.to(torch.int64), temperature=temperature, return_entropy=True
        )
        return log_probs, entropy.to(torch.promote_types(hidden_states.dtype, vocab_weights.dtype))


def patch_verl() -> None:
    """Point verl's `logprobs_from_logits`, `entropy_from_logits` and `FusedLinearForPPO` at the ones here.

    Code that bound a name with `from ... import` before the call keeps verl's function.
    """
    functional = require("verl.utils.torch_functional", "verl", FEATURE)
    functional.logprobs_from_logits = logprobs_from_logits
    functional.entropy_from_logits = entropy_from_logits
    experimental = require("verl.utils.experimental.torch_functional", "verl", FEATURE)
    experimental.FusedLinearForPPO = FusedLinearForPPO
