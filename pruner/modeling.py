"""The policy as the trainer sees it: an HF causal LM whose token log-probs come from the fused kernel.

`TokenLogprobs` runs the model's body (never its `logits`) and hands the last hidden states and the
LM-head weight to `o1pruner_kernels.fused_linear_logprobs`, so the [tokens, vocab] logits never exist in
memory. `prepare_model` loads the model, patches Liger's body kernels on CUDA, and applies FSDP2.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from o1pruner_kernels.fused_linear import fused_linear_logprobs
from pruner.distributed import Dist, broadcast_buffers, compute_dtype, decoder_blocks, print0


class TokenLogprobs(nn.Module):
    """forward(input_ids, attention_mask, labels[, position_ids, packed-row boundaries]) -> log pi(label_t | prefix)
    [B, T] fp32 (0 where ignored).

    `attention_mask` None: no padding, causal attention alone (the trainer passes None for its unpadded
    micro-batches, so transformers neither syncs to inspect a mask nor builds one)."""

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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
                position_ids: torch.Tensor | None = None, **attention_kwargs: object) -> torch.Tensor:
        # A packed row (pruner/packing.py) comes with position_ids restarting per sequence and its
        # boundaries in `attention_kwargs`, which transformers hands to every attention call.
        body = self.lm.get_decoder()
        hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                      **attention_kwargs).last_hidden_state
        # Inside the root FSDP forward the head's weight is the unsharded tensor, and its gradient
        # flows back into FSDP's reduce-scatter like any other parameter's.
        # Tied models (Qwen2.5-0.5B/1.5B) share this tensor with the embedding; FSDP2 manages it once.
        # Under the bf16 MixedPrecisionPolicy both `hidden` and `weight` are bf16 here.
        weight = self.lm.get_output_embeddings().weight
        logps = fused_linear_logprobs(hidden, weight, labels, temperature=self.temperature)
        # The kernel returns a view ([N] -> [B, T]); FSDP2 hooks the root's outputs for its
        # pre-backward all-gather, and an in-place op on a view would silently drop that hook
        # (FSDP2 warns "returned a view tensor"). A [B, T] fp32 copy is cheap; a lost hook is not.
        return logps.clone() if logps._base is not None else logps


LIGER_MODEL_TYPES = ("qwen2", "llama")  # the architectures of the presets (pruner/presets.py)
_LIGER_KERNELS = {"rope": "apply_rotary_pos_emb", "rms_norm": "{Prefix}RMSNorm", "swiglu": "{Prefix}MLP"}


def _modeling_module(model_type: str):
    """transformers' modeling module of `model_type` (what Liger patches)."""
    import importlib

    return importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")


def _patch_targets(model_type: str) -> dict[str, object]:
    """What Liger replaces in transformers' modeling module of `model_type`, as it is now."""
    module = _modeling_module(model_type)
    prefix = {"qwen2": "Qwen2", "llama": "Llama"}[model_type]
    return {kernel: getattr(module, attr.format(Prefix=prefix), None) for kernel, attr in _LIGER_KERNELS.items()}


def apply_liger(model_type: str, patch: Callable[..., object] | None = None) -> str:
    """Patch Liger-Kernel's RMSNorm/RoPE/SwiGLU into `model_type`'s classes; returns what happened.

    Must run BEFORE the model is built: Liger swaps the classes in transformers' modeling module,
    so only modules constructed afterwards get its kernels. `patch`: the patch function (default:
    the one Liger registers for `model_type`). A patch that fails in any way is undone and reported,
    and the run trains unpatched.
    """
    apply = patch
    if apply is None:
        try:
            from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
        except ImportError:
            return "liger-kernel not installed; body kernels are transformers' own"
        except Exception as exc:  # noqa: BLE001 - a Liger built against another transformers can fail on import
            return (f"liger-kernel failed to import ({type(exc).__name__}: {exc}): training UNPATCHED, "
                    "with transformers' own RMSNorm/RoPE/SwiGLU")
        apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply is None or model_type not in LIGER_MODEL_TYPES:
        return f"liger-kernel: no patch for model type {model_type!r} (patched types: {', '.join(LIGER_MODEL_TYPES)})"
    wanted = {"rope": True, "rms_norm": True, "swiglu": True,
              # The LM head and the loss are this project's fused kernels, not Liger's.
              "cross_entropy": False, "fused_linear_cross_entropy": False}
    before = _patch_targets(model_type)
    error = _apply_or_undo(apply, wanted, model_type)
    if error:  # a Liger/transformers mismatch must not stop a run: it trains, slower, on transformers' kernels
        return (f"liger-kernel patch FAILED for {model_type} ({error}); the partial patch was undone: "
                "training UNPATCHED, with transformers' own RMSNorm/RoPE/SwiGLU")
    after = _patch_targets(model_type)
    patched = [k for k in _LIGER_KERNELS if before[k] is not after[k]]
    missing = [k for k in _LIGER_KERNELS if k not in patched]
    return (f"liger-kernel patched {', '.join(patched) or 'nothing'} into {model_type}"
            + (f" (not patched: {', '.join(missing)})" if missing else ""))


def _apply_or_undo(apply: object, wanted: dict[str, bool], model_type: str) -> str:
    """Run Liger's patch function; on any error put every name of the modeling module back as it was
    (a patch may have swapped some classes before failing) and return the error, else ''."""
    module = _modeling_module(model_type)
    saved = dict(vars(module))
    try:
        accepted = inspect.signature(apply).parameters  # type: ignore[arg-type]
        apply(**{k: v for k, v in wanted.items() if k in accepted})  # type: ignore[operator]
    except Exception as exc:  # noqa: BLE001 - AttributeError/TypeError from a version mismatch, or anything else
        for name in [n for n in vars(module) if n not in saved]:
            delattr(module, name)
        for name, value in saved.items():
            if vars(module).get(name) is not value:
                setattr(module, name, value)
        return f"{type(exc).__name__}: {exc}"
    return ""


def load_model(path: str, d: Dist, *, meta_init: bool, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load the HF model; with `meta_init` only rank 0 reads the weights, the others build on `meta`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if meta_init and not d.is_main:
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    with _no_progress_bars():
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' progress bars off for a while: its "Loading weights" bar would break into the
    trainer's console (its own progress bar and metrics lines) at every load."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def prepare_model(path: str | Path, d: Dist, *, temperature: float = 1.0, liger: bool = True,
                  activation_checkpointing: bool = False, mixed_precision: bool = True,
                  meta_init: bool = True) -> TokenLogprobs:
    """Patch Liger (before building), load, and shard the policy: FSDP2 on every decoder block, then the root."""
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
    return shard_policy(policy, d, mixed_precision=mixed_precision, full_state=full_state if meta_init else None)


def shard_policy(policy: TokenLogprobs, d: Dist, *, mixed_precision: bool = True,
                 full_state: dict | None = None) -> TokenLogprobs:
    """FSDP2 over `policy` (bf16 compute, fp32 reduction on CUDA). `full_state` given: the model was
    built on `meta` on ranks > 0 and rank 0's weights (the dict) are broadcast into every shard."""
    if not d.enabled:
        return policy.to(d.device)
    mp = None
    if compute_dtype(d, mixed_precision) == torch.bfloat16:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    shard_kwargs = {"mp_policy": mp} if mp is not None else {}
    # No `policy.to(device)` first: that would put the whole fp32 model on every GPU (out of memory at
    # 32B). fully_shard moves one group's parameters to the mesh's device and keeps this rank's shard
    # (FSDP2's _move_states_to_device), so the peak is the shards plus one block.
    for block in decoder_blocks(policy.lm):
        fully_shard(block, **shard_kwargs)
    fully_shard(policy, **shard_kwargs)  # the root: embedding, final norm and the LM head (tied or not)
    if full_state is not None:
        if not d.is_main:
            policy.to_empty(device=d.device)
        elif d.device.type != "cpu":
            policy.to(d.device)
        set_model_state_dict(policy, full_state, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True))
        # Non-persistent buffers (rotary inv_freq) are not in the state dict and hold garbage after
        # to_empty on ranks > 0: copy rank 0's.
        broadcast_buffers(policy, src=0)
    return policy
