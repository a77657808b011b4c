"""What the trainer checks and derives before any work: defaults, the training set, the schedule."""
from __future__ import annotations

import math
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from pruner.distributed import Dist, broadcast_object
from pruner.losses import LOSSES
from pruner.manifest import (Output, OutputLock, RunStateError, build_manifest, claim_output, file_digest,
                             manifest_digest, model_inputs)
from pruner.reflogps import attach_response_offsets

PAPER_LR = 2e-7          # the paper's code for 7B models
EMBEDDED_LR = 2e-5       # the embedded default: a 1M-parameter model trained from scratch moves far faster


def resolve_defaults(cfg: Any) -> Any:
    embedded = not cfg.model
    if embedded:
        from pruner import default_model_path

        cfg = replace(cfg, model=str(default_model_path()))
    if not cfg.lr:
        cfg = replace(cfg, lr=EMBEDDED_LR if embedded else PAPER_LR)
    return cfg


def load_training_data(cfg: Any) -> tuple[dict, Any]:
    """The training set as tensors (plus meta/stats) and the model's tokenizer, cross-checked."""
    from pruner.dataset import load_trainset
    from pruner.model_files import load_tokenizer, tokenizer_fingerprint

    path = Path(cfg.data)
    if not (path / "meta.json").exists():
        raise FileNotFoundError(f"training set {path} not found (no {path / 'meta.json'}): build it with "
                                "`python pruner/presample.py` then `python pruner/dataset.py`, or pass --data")
    data = attach_response_offsets(load_trainset(path))
    meta = data["meta"]
    if not cfg.loss:
        cfg.loss = meta.get("kind", "lh")
    tokenizer = load_tokenizer(cfg.model)
    expected, actual = meta.get("tokenizer_fingerprint"), tokenizer_fingerprint(tokenizer)
    if expected and expected != actual:
        raise ValueError(f"{path / 'meta.json'}: field tokenizer_fingerprint={expected} was built with another "
                         f"tokenizer than {cfg.model}'s ({actual}); rebuild the training set for this model")
    if "pair_index" in data:
        pairs: dict[int, list[int]] = {}
        for i, p in enumerate(data["pair_index"].tolist()):
            pairs.setdefault(p, []).append(i)
        data["pairs"] = [v for _, v in sorted(pairs.items())]
    return data, tokenizer


def check_inputs(cfg: Any, data: dict, tokenizer: Any, world_size: int) -> None:
    from transformers import AutoConfig

    if cfg.loss not in LOSSES:
        raise ValueError(f"--loss {cfg.loss!r}: choose one of {LOSSES}")
    if cfg.ratio_level not in ("sequence", "token"):
        raise ValueError(f"--ratio-level {cfg.ratio_level!r}: choose 'sequence' or 'token'")
    if cfg.loss == "dpo" and "pairs" not in data:
        raise ValueError(f"{cfg.data}: --loss dpo needs a preference-pair training set (pruner/dataset.py --kind dpo)")
    config = AutoConfig.from_pretrained(cfg.model)
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs):
        raise ValueError(f"{cfg.model}: architectures {archs} have no LM head; the trainer needs a causal LM")
    vocab = getattr(config, "vocab_size", None)
    top = int(data["input_ids"].max()) if data["input_ids"].numel() else 0
    if vocab is not None and top >= vocab:
        raise ValueError(f"{cfg.data}: token id {top} is outside {cfg.model}'s vocabulary of {vocab}")
    if len(data["prompt_lengths"]) < cfg.global_batch_size:
        raise ValueError(f"{cfg.data}: {len(data['prompt_lengths'])} samples are fewer than one global batch "
                         f"of {cfg.global_batch_size}; lower --global-batch-size")


# Flags that may change between a run and its --resume: where to stop, how often to save, what to
# show or export, and memory-only switches that leave the numbers as they are.
VOLATILE = ("out", "resume", "overwrite", "stop_after", "ckpt_every", "keep_checkpoints", "export", "tensorboard",
            "max_bad_steps", "meta_init", "activation_checkpointing")


def run_manifest(cfg: Any, tokenizer: Any) -> dict[str, Any]:
    """The trainer's manifest: resolved flags, the model and tokenizer, the training set's content."""
    data = Path(cfg.data)
    inputs = {**model_inputs(cfg.model, tokenizer), "data": file_digest(data / "trainset.safetensors"),
              "data_manifest": manifest_digest(data / "manifest.json")}
    return build_manifest("train", asdict(cfg), inputs, volatile=VOLATILE)


def claim_run_folder(cfg: Any, tokenizer: Any, d: Dist) -> OutputLock | None:
    """Lock --out (rank 0) and check its manifest: a fresh run never lands in another run's folder
    (its checkpoints would mix), and --resume continues only an identical configuration. Every
    rank raises the same error, so no rank waits on a collective that will never come."""
    lock, error = None, None
    if d.is_main:
        try:
            # config.json alone (a run that failed while loading the model) holds no results
            lock = claim_output(Output.folder(cfg.out, incidental=("config.json",)), run_manifest(cfg, tokenizer),
                                what=f"run folder {cfg.out}", resume=cfg.resume, overwrite=cfg.overwrite,
                                inputs=[cfg.data] + ([cfg.model] if Path(cfg.model).exists() else []))
        except (RunStateError, ValueError) as exc:
            error = str(exc)
    error = broadcast_object(error)
    if error:
        raise RunStateError(error)
    return lock


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float,
                       min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, math.ceil(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
