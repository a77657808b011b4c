"""TRL: GRPOTrainer's per-token log-probs and entropies from `fused_linear_logprobs`.

What TRL calls (checked against trl 1.16): `GRPOTrainer.__init__` gives the policy (and the
reference model) a fused LM head with `add_fused_lm_head(model, temperature=..., cast_lm_head_to_fp32=...,
outputs=(...))`, a name it imports into `trl.trainer.grpo_trainer`; then
`GRPOTrainer._get_per_token_logps_and_entropies` calls `model(..., labels=labels, fused_lm_head=True)`
with labels = the completion tokens (-100 on the prompt and on padding) and reads `outputs.log_probs`
and `outputs.entropy`. `patch_grpo_trainer()` swaps that name for `add_fused_lm_head` below, which
keeps the protocol (same arguments, same `FusedCausalLMOutput`) but computes the tempered log-probs and
entropies with `o1pruner_kernels.fused_linear_logprobs` from the body's last hidden state and the LM
head weight: the [B, T, V] logits never exist (Triton kernel on CUDA, chunked PyTorch elsewhere).
Generation is untouched: without `fused_lm_head=True` the model's own forward runs.

An installed TRL that does not follow this protocol is refused with a clear error instead of being
patched silently.
"""
from __future__ import annotations

import functools
import inspect
import types

import torch

from ..fused_linear import fused_linear_logprobs
from . import require

FEATURE = "o1pruner_kernels.integrations.trl"
SUPPORTED_OUTPUTS = ("log_probs", "entropy")
# Config fields of models whose logits are not plain `hidden @ W.T`; the fused head here does not apply them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
_ORIGINALS: dict[str, object] = {}


def _grpo_module() -> types.ModuleType:
    """trl.trainer.grpo_trainer, checked to follow the fused-LM-head protocol this patch replaces."""
    trl = require("trl", "trl", FEATURE)
    grpo = require("trl.trainer.grpo_trainer", "trl", FEATURE)
    hook = getattr(grpo, "add_fused_lm_head", None)
    method = getattr(getattr(grpo, "GRPOTrainer", None), "_get_per_token_logps_and_entropies", None)
    problem = None
    if hook is None or method is None:
        problem = "trl.trainer.grpo_trainer has no `add_fused_lm_head` or no `GRPOTrainer._get_per_token_logps_and_entropies`"
    elif "fused_lm_head=True" not in inspect.getsource(method):
        problem = "GRPOTrainer._get_per_token_logps_and_entropies does not call the model with `fused_lm_head=True`"
    elif list(inspect.signature(_ORIGINALS.get("grpo", hook)).parameters) != list(_OUR_PARAMETERS):
        problem = f"add_fused_lm_head takes {inspect.signature(_ORIGINALS.get('grpo', hook))}"
    if problem:
        raise RuntimeError(
            f"{FEATURE} supports TRL's fused-LM-head protocol (tested with trl 1.16); the installed "
            f"trl {trl.__version__} differs: {problem}. Pin trl==1.16.* or update this integration."
        )
    return grpo


def _check_model(model: torch.nn.Module, outputs: tuple[str, ...]) -> None:
    unsupported = sorted(set(outputs) - set(SUPPORTED_OUTPUTS))
    if unsupported:
        raise NotImplementedError(f"{FEATURE}: fused outputs {unsupported} are not provided (only {SUPPORTED_OUTPUTS})")
    text_config = model.config.get_text_config()
    for name in _LOGIT_TRANSFORMS:
        if getattr(text_config, name, None) not in (None, 1, 1.0):
            raise NotImplementedError(
                f"{FEATURE}: {type(model).__name__} transforms its logits (config.{name}="
                f"{getattr(text_config, name)}), which the fused head does not apply; leave this model unpatched"
            )
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        # ZeRO-3 frees the head's gathered weight after the forward, but the kernel's backward re-reads it.
        raise NotImplementedError(f"{FEATURE}: DeepSpeed ZeRO-3 is not supported (use FSDP2 or ZeRO-2)")
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise NotImplementedError(f"{FEATURE}: the LM head of {type(model).__name__} is missing or has a bias")


def _head_weight(model: torch.nn.Module) -> torch.Tensor:
    """The LM head weight as the model's forward sees it.

    Under FSDP2 with the head in the root's unit (`fully_shard` on the decoder layers and on the
    model, as TRL/accelerate set it up) the root's forward has already unsharded it: a plain tensor
    in the mixed-precision dtype, whose gradient FSDP reduce-scatters and averages. A head that is
    still a DTensor here was sharded on its own (`fully_shard(model.lm_head)`): FSDP unshards it only
    around the head's own forward, which the fused head never calls. Gathering it with
    `full_tensor()` would score with the sharded fp32 parameter and sum its gradient through
    DTensor instead of FSDP's reduction, so that layout is refused."""
    weight = model.get_output_embeddings().weight
    if _is_dtensor(weight):
        raise NotImplementedError(
            f"{FEATURE}: the LM head weight of {type(model).__name__} is a DTensor (placements "
            f"{tuple(weight.placements)} on a mesh of {weight.device_mesh.size()} ranks) during the forward: "
            "the head is sharded as its own FSDP2 unit (fully_shard(model.lm_head)), which the fused head "
            "cannot unshard through FSDP. Do not apply fully_shard to the LM head separately (shard the "
            "decoder layers and the root model, so the root's forward unshards the head), or leave TRL unpatched."
        )
    return weight


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without distributed tensors cannot have produced one
        return False
    return isinstance(t, DTensor)


def _score(hidden, weight, labels, temperature, want_entropy, cast_fp32):
    """Tempered log-probs / entropies [B, T] of the labelled positions; zero where the label is -100."""
    mask = labels != -100
    if cast_fp32:
        hidden, weight = hidden.float(), weight.float()
    # The kernel keeps its own fp32 accumulation; autocast must not turn its chunk GEMMs into bf16 ones.
    with torch.autocast(hidden.device.type, enabled=False):
        out = fused_linear_logprobs(
            hidden[mask], weight, labels[mask], temperature=temperature, return_entropy=want_entropy
        )
    logp, ent = out if want_entropy else (out, None)

    def scatter(values):  # masked_scatter keeps the result attached to the graph even with no label at all
        return None if values is None else values.new_zeros(mask.shape).masked_scatter(mask, values)

    return scatter(logp), scatter(ent), mask


def add_fused_lm_head(
    model: torch.nn.Module,
    temperature: float = 1.0,
    cast_lm_head_to_fp32: bool = False,
    outputs: tuple[str, ...] = ("log_probs",),
) -> None:
    """TRL's `add_fused_lm_head` contract, computed by `fused_linear_logprobs`.

    After it, `model(..., labels=labels, fused_lm_head=True)` returns trl's `FusedCausalLMOutput` with
    `log_probs` (and `entropy` when asked) of the next-token labels under softmax(logits / temperature),
    zero where the label is -100, `label_mask` and the mean NLL as `loss`. Any other call runs the
    model's previous forward (generation is unchanged). Supports the "log_probs" and "entropy" outputs.
    """
    trl_utils = require("trl.trainer.utils", "trl", FEATURE)
    _check_model(model, outputs)
    text_config = model.config.get_text_config()
    previous_forward = model.forward
    want_entropy = "entropy" in outputs

    @functools.wraps(type(model).forward)  # `generate` checks its kwargs against this signature
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return previous_forward(*args, **kwargs, **{k: v for k, v in extra.items() if v is not None})
        if kwargs.get("output_router_logits") or getattr(text_config, "output_router_logits", False):
            raise NotImplementedError(f"{FEATURE}: MoE router (aux) losses are not supported by the fused head")
        if labels is None and shift_labels is None:
            raise ValueError(f"{FEATURE}: `fused_lm_head=True` needs `labels` (or `shift_labels`) to score")
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        weight = _head_weight(self)
        log_probs, entropy, mask = _score(
            hidden.to(weight.device), weight, labels.to(weight.device), temperature, want_entropy, cast_lm_head_to_fp32
        )
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return trl_utils.FusedCausalLMOutput(
            loss=-log_probs.sum() / count, log_probs=log_probs, entropy=entropy, label_mask=mask
        )

    forward.o1pruner_fused = True
    model.forward = types.MethodType(forward, model)


_OUR_PARAMETERS = inspect.signature(add_fused_lm_head).parameters


def patch_grpo_trainer() -> None:
    """Make every GRPOTrainer built from now on use `add_fused_lm_head` above (policy and reference model).

    Idempotent; undo with `unpatch_grpo_trainer()`. Raises RuntimeError for a TRL that does not
    follow the protocol described in this module's docstring, ImportError without trl.
    """
    grpo = _grpo_module()
    if grpo.add_fused_lm_head is not add_fused_lm_head:
        _ORIGINALS["grpo"] = grpo.add_fused_lm_head
        grpo.add_fused_lm_head = add_fused_lm_head


def unpatch_grpo_trainer() -> None:
    """Give GRPOTrainers built from now on TRL's own fused head back (models already built keep theirs)."""
    if "grpo" in _ORIGINALS:
        grpo = require("trl.trainer.grpo_trainer", "trl", FEATURE)
        grpo.add_fused_lm_head = _ORIGINALS.pop("grpo")


def is_patched(model: torch.nn.Module) -> bool:
    """Whether `model`'s forward is the fused head installed by `add_fused_lm_head` here."""
    return getattr(getattr(model.forward, "__func__", None), "o1pruner_fused", False)


__all__ = ["add_fused_lm_head", "patch_grpo_trainer", "unpatch_grpo_trainer", "is_patched"]
