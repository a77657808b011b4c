"""The Hugging Face export of the trained policy, streamed: one tensor at a time, one shard file at a time.

Every rank walks the policy's state dict in the same order. A sharded (FSDP2) tensor is gathered on
the device (`full_tensor`, a collective every rank joins), cast there to the export dtype, and only
then copied to rank 0's host, which appends it to the shard being filled and writes that shard to
disk as soon as it is full. Rank 0 never holds the fp32 state dict nor a whole bf16 copy: at most one
shard (`max_shard_bytes`) plus one tensor, where gathering everything to the host first needs about
200 GB at 32B (the fp32 state dict plus its bf16 copy). The shard plan (which tensor goes in which
file) comes from shapes alone, so the file names `model-0000k-of-0000n.safetensors` and the index are
known before any data moves.
"""
from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pruner.distributed import Dist, barrier
from pruner.families import write_model_record

MAX_SHARD_BYTES = 2 * 2**30  # what rank 0 buffers at most, and the size of each file


@dataclass
class ShardWriter:
    """Files of one export: appends tensors and writes a shard as soon as its last tensor arrives."""

    folder: Path
    plan: dict[str, str]                        # tensor name -> file name
    pending: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    buffered: int = 0
    peak_bytes: int = 0                         # most bytes held at once (what the tests bound)
    written: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._members = Counter(self.plan.values())  # tensors per file: a file is written when all have arrived

    def add(self, name: str, tensor: torch.Tensor) -> None:
        filename = self.plan[name]
        self.pending.setdefault(filename, {})[name] = tensor
        self.buffered += tensor.numel() * tensor.element_size()
        self.peak_bytes = max(self.peak_bytes, self.buffered)
        if len(self.pending[filename]) == self._members[filename]:
            self._write(filename)

    def _write(self, filename: str) -> None:
        from safetensors.torch import save_file

        tensors = self.pending.pop(filename)
        save_file(tensors, str(self.folder / filename), metadata={"format": "pt"})
        self.buffered -= sum(t.numel() * t.element_size() for t in tensors.values())
        self.written.append(filename)


def shard_plan(sizes: dict[str, int], max_shard_bytes: int) -> dict[str, str]:
    """Tensor name -> file, in state-dict order, a new file whenever the next tensor would overflow one."""
    groups: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if groups[-1] and used + size > max_shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    if len(groups) == 1:
        return {name: "model.safetensors" for name in groups[0]}
    return {name: f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i, group in enumerate(groups)
            for name in group}


def export_dtype(config: object) -> torch.dtype:
    """The dtype the source model was published in (its config), fp32 when it names none."""
    dtype = (config.dtype if hasattr(config, "dtype") else getattr(config, "torch_dtype", None)) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _exported_tensors(model: nn.Module, config: object, prefix: str) -> dict[str, torch.Tensor]:
    """The state dict's (sharded) tensors under their Hugging Face names; a tied head only once."""
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # the embedding's tensor; safetensors refuses shared storage
    return state


def stream_weights(model: nn.Module, folder: Path, d: Dist, *, dtype: torch.dtype, config: object,
                   prefix: str = "lm.", max_shard_bytes: int = MAX_SHARD_BYTES) -> ShardWriter | None:
    """Gather, cast and write every tensor (all ranks call this; rank 0 writes). Returns rank 0's writer."""
    state = _exported_tensors(model, config, prefix)
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = {name: t.numel() * itemsize for name, t in state.items()}
    writer = ShardWriter(folder, shard_plan(sizes, max_shard_bytes)) if d.is_main else None
    for name, tensor in state.items():
        full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # a collective when sharded
        if writer is not None:  # cast on the device (never an fp32 copy on the host), by the one rank that writes
            writer.add(name, full.detach().to(dtype).to("cpu").contiguous())
        del full
    if writer is not None:
        assert not writer.pending, f"shards never completed: {sorted(writer.pending)}"
        if len(set(writer.plan.values())) > 1:
            index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": writer.plan}
            (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return writer


def export_hf(model: nn.Module, out: Path, source: str, d: Dist, *, prefix: str = "lm.",
              max_shard_bytes: int = MAX_SHARD_BYTES, sampling: dict | None = None) -> Path | None:
    """A Hugging Face folder (config, sharded safetensors, tokenizer, generation config) written by
    rank 0 under a temporary name and renamed when complete. Every rank must call it.
    `sampling`: the training set's sampling block, recorded for the benchmark and later rounds."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(source)
    tmp = out.with_name(out.name + ".tmp")
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    stream_weights(model, tmp, d, dtype=export_dtype(config), config=config, prefix=prefix,
                   max_shard_bytes=max_shard_bytes)
    if not d.is_main:
        barrier()
        return None
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
