"""Use the kernels inside other RL trainers, one module per trainer.

- `o1pruner_kernels.integrations.trl`: `patch_grpo_trainer()` makes TRL's GRPOTrainer score its
  per-token log-probs and entropies with `fused_linear_logprobs` on the body's hidden states.
- `o1pruner_kernels.integrations.verl`: drop-ins for `verl.utils.torch_functional`'s
  `logprobs_from_logits` / `entropy_from_logits` and verl's hidden-states `FusedLinearForPPO`.
- `o1pruner_kernels.integrations.openrlhf`: a drop-in for `openrlhf.models.utils.log_probs_from_logits`
  and a hidden-states variant.

Nothing here imports a trainer at import time: a module imports its trainer only inside the
function that needs it, and names the missing package when it is absent.
"""
import importlib
from types import ModuleType


def require(module: str, package: str, feature: str) -> ModuleType:
    """Import `module`, or raise ImportError saying that `feature` needs the pip package `package`."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{feature} needs the `{package}` package, which is not importable here ({err}); "
            f"install it with `pip install {package}`"
        ) from err
