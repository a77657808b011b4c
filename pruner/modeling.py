"""The policy as the trainer sees it: an HF causal LM whose token log-probs come from the fused kernel.

`TokenLogprobs` runs the model's body (never its `logits`) and hands the last hidden states and the
LM-head weight to `o1pruner_kernels.fused_linear_logprobs`, so the [tokens, vocab] logits never exist in
memory. `prepare_model` loads the model, patches Liger's body kernels on CUDA, and applies FSDP2.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import o1pruner_kernels
from pruner.distributed import Dist, print0


class TokenLogprobs(nn.Module):
    """forward(input_ids, attention_mask, labels) -> log pi(label_t | prefix) [B, T] fp32 (0 where ignored)."""

    def __init__(self, lm: nn.Module, temperature: float = 1.0):
        super().__init__()
        self.lm = lm
        self.temperature = temperature
        head = lm.get_output_embeddings()
        if head is None or not hasattr(head, "weight"):
            raise ValueError(f"{type(lm).__name__} has no LM head (get_output_embeddings() is None); "
                             "the trainer needs a causal LM with an output projection")
        if getattr(head, "bias", None) is not None:
            raise ValueError(f"{type(lm).__name__}'s LM head has a bias, which the fused log-prob kernel does not take")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        body = self.lm.get_decoder()
        hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        # Inside the root FSDP forward the head's weight is the unsharded tensor, and its gradient
        # flows back into FSDP's reduce-scatter like any other parameter's.
        weight = self.lm.get_output_embeddings().weight
        return o1pruner_kernels.fused_linear_logprobs(hidden, weight, labels, temperature=self.temperature)


def apply_liger(model_type: str) -> str:
    """Patch Liger-Kernel's RMSNorm/RoPE/SwiGLU into `model_type`'s classes; returns what happened."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return "liger-kernel not installed; body kernels are transformers' own"
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply is None:
        return f"liger-kernel has no patch for model type {model_type!r}"
    wanted = {"rope": True, "rms_norm": True, "swiglu": True,
              # The LM head and the loss are this project's fused kernels, not Liger's.
              "cross_entropy": False, "fused_linear_cross_entropy": False}
    accepted = inspect.signature(apply).parameters
    apply(**{k: v for k, v in wanted.items() if k in accepted})
    return f"liger-kernel body kernels patched into {model_type}"


def _decoder_blocks(lm: nn.Module) -> list[nn.Module]:
    names = set(getattr(lm, "_no_split_modules", None) or [])
    blocks = [m for m in lm.modules() if type(m).__name__ in names]
    if not blocks:  # architectures that do not declare their blocks: the body's layer list
        layers = getattr(lm.get_decoder(), "layers", None)
        blocks = list(layers) if layers is not None else []
    return blocks


def load_model(path: str, d: Dist, *, meta_init: bool, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load the HF model; with `meta_init` only rank 0 reads the weights, the others build on `meta`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if meta_init and not d.is_main:
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def prepare_model(path: str | Path, d: Dist, *, temperature: float = 1.0, liger: bool = True,
                  activation_checkpointing: bool = False, mixed_precision: bool = True,
                  meta_init: bool = True) -> TokenLogprobs:
    """Load, patch and shard the policy: FSDP2 on every decoder block, then on the root."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    if d.device.type == "cuda" and liger:
        print0(apply_liger(config.model_type))
    elif liger:
        print0("liger-kernel: skipped on the CPU (its kernels are Triton GPU kernels)")
    meta_init = meta_init and d.enabled and d.world_size > 1
    lm = load_model(str(path), d, meta_init=meta_init)
    full_state = {f"lm.{k}": v for k, v in lm.state_dict().items()} if meta_init and d.is_main else {}
    if activation_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.config.use_cache = False
    policy = TokenLogprobs(lm, temperature=temperature)

    if d.enabled:
        mp = None
        if d.device.type == "cuda" and mixed_precision:
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        shard_kwargs = {"mp_policy": mp} if mp is not None else {}
        if d.device.type != "cpu" and not meta_init:
            policy.to(d.device)
        for block in _decoder_blocks(lm):
            fully_shard(block, **shard_kwargs)
        fully_shard(policy, **shard_kwargs)
        if meta_init:
            if not d.is_main:
                policy.to_empty(device=d.device)
            elif d.device.type != "cpu":
                policy.to(d.device)
            set_model_state_dict(policy, full_state, options=StateDictOptions(
                full_state_dict=True, broadcast_from_rank0=True))
            # Non-persistent buffers (rotary frequencies) are not in the state dict: copy rank 0's.
            for buf in policy.buffers():
                torch.distributed.broadcast(buf.data, src=0)
    else:
        policy.to(d.device)
    return policy
