"""Resumable training state through torch.distributed.checkpoint, and the final Hugging Face export.

A checkpoint is a folder `step-XXXXXXX/` holding the sharded model and optimizer (DCP) plus one
small `trainer-rank{r}.pt` per rank (scheduler, step, RNG). It is written under a temporary name
and renamed only when every rank has finished, so a run killed mid-save never resumes from a
half-written checkpoint.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from pruner.distributed import Dist, barrier
from pruner.families import write_model_record

_PREFIX = "step-"


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(root: Path) -> Path | None:
    done = sorted(p for p in root.glob(f"{_PREFIX}*") if p.is_dir() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, extra: dict, d: Dist, keep: int = 2) -> Path:
    final = root / f"{_PREFIX}{step:07d}"
    tmp = root / f"{final.name}.tmp"
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save({"step": step, "scheduler": scheduler.state_dict(), "rng": _rng_state(), **extra},
               tmp / f"trainer-rank{d.rank}.pt")
    barrier()
    if d.is_main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(p for p in root.glob(f"{_PREFIX}*") if not p.name.endswith(".tmp"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, d: Dist) -> dict:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    own = path / f"trainer-rank{d.rank}.pt"
    if not own.exists():
        raise FileNotFoundError(f"{own}: this checkpoint was written by fewer processes; resume with the same "
                                "--nproc_per_node as the run that wrote it")
    trainer = torch.load(own, weights_only=False)
    scheduler.load_state_dict(trainer["scheduler"])
    _set_rng_state(trainer["rng"])
    return trainer


def export_hf(model: nn.Module, out: Path, source: str, d: Dist, *, prefix: str = "lm.",
              sampling: dict | None = None) -> Path | None:
    """Write a Hugging Face folder (config, safetensors, tokenizer, generation config) on rank 0.

    `sampling`: the training set's sampling block, written as `o1pruner_sampling.json` so that the
    benchmark and later rounds prompt the model as its training data was sampled.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not d.is_main:
        barrier()
        return None
    config = AutoConfig.from_pretrained(source)
    # `dtype` where transformers has it (reading `torch_dtype` there warns that it is deprecated).
    dtype = (config.dtype if hasattr(config, "dtype") else getattr(config, "torch_dtype", None)) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in full.items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the embedding; safetensors refuses shared storage
    state = {k: v.detach().to(dtype).contiguous() for k, v in state.items()}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size="5GB")
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, str(tmp / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                 "weight_map": split.tensor_to_filename}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
    try:
        GenerationConfig.from_pretrained(source).save_pretrained(tmp)
    except OSError:  # the source had none: derive one from the config so vLLM sees the EOS token
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
    write_model_record(tmp, sampling)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    barrier()
    return out
