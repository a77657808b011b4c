"""The "old" log-probs: one no-grad pass, over a training set, of the policy that sampled it.

Two words, two things. The "ref" model is the frozen reference pi_ref, the starting point of the
run; the "old" log-probs are those of the policy that sampled the training set in use (the
ratio's denominator). In the first round the sampling policy IS the reference model; in an
on-policy round (`--rounds`) it is the policy exported at the round's start. Either way the data
is fixed and the sampling policy is the trained policy's state before the set's first update, so
log pi_old(y_t | x, y_<t) is computed once, before that update, and cached next to the training
set as `old_logps-<model>-t<temperature>-<data>.safetensors`: no second model is
ever held in memory and no step pays for an extra forward.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pruner.batching import collate, response_offsets, sequence_lengths
from pruner.distributed import Dist, all_reduce_sum, barrier
from pruner.packing import pack_collate, pack_for_inference, packed_logprobs
from pruner.model_files import model_fingerprint


def content_key(data: dict) -> str:
    """Hash of exactly what the table is computed for: every token id, the sequence offsets and the
    prompt/response split. A rebuilt set with the same token count but another order or other
    samples gets another key, so a stale table is never reused."""
    digest = hashlib.sha256()
    for name in ("input_ids", "offsets", "prompt_lengths", "response_lengths"):
        tensor = data[name].contiguous().to(torch.int64)
        digest.update(name.encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_path(trainset: Path, model_key: str, temperature: float, data_key: str) -> Path:
    """The cached old log-probs of `trainset` under the model `model_key` at `temperature`."""
    return trainset / f"old_logps-{model_key}-t{temperature:g}-{data_key}.safetensors"


def _my_batches(lengths: list[int], world_size: int, rank: int, micro_batch: int,
                micro_batch_tokens: int) -> tuple[list[list[int] | None], list[int]]:
    """This rank's micro-batches (None: a repeat of `spare`, run only to join FSDP's collectives),
    the same number on every rank; packed bins of <= `micro_batch_tokens` tokens when it is set."""
    if micro_batch_tokens:
        mine = pack_for_inference(lengths, micro_batch_tokens, world_size)[rank]
        return [m or None for m in mine], next(m for m in mine if m)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches = [order[i:i + micro_batch] for i in range(0, len(order), micro_batch)]
    rounds = -(-len(batches) // world_size)
    return [batches[r * world_size + rank] if r * world_size + rank < len(batches) else None
            for r in range(rounds)], batches[0]


@torch.no_grad()
def _response_logps(policy: torch.nn.Module, data: dict, indices: list[int], d: Dist, pad_id: int,
                    packed: bool) -> torch.Tensor:
    """[B, T] log-probs of `indices`, aligned with their labels (padded layout either way)."""
    if packed:
        return packed_logprobs(policy, pack_collate(data, indices, pad_id=pad_id).to(d.device))
    batch = collate(data, indices, pad_id=pad_id).to(d.device)
    return policy(batch.input_ids, batch.attention_mask, batch.labels)


@torch.no_grad()
def compute_response_logprobs(policy: torch.nn.Module, data: dict, d: Dist, *, micro_batch: int,
                              pad_id: int, show_progress: bool = True, micro_batch_tokens: int = 0) -> torch.Tensor:
    """Flat fp32 tensor of `policy`'s log-probs of every response token, in sample order (see
    response_offsets). `micro_batch_tokens` > 0: packed rows of at most that many tokens."""
    lengths = sequence_lengths(data).tolist()
    offsets = data["response_offsets"]
    flat = torch.zeros(int(offsets[-1]), dtype=torch.float32)
    # FSDP's collectives need every rank to run the same number of forwards: pad with repeats.
    mine, spare = _my_batches(lengths, d.world_size, d.rank, micro_batch, micro_batch_tokens)
    iterator = mine
    if show_progress and d.is_main:
        from tqdm.auto import tqdm

        iterator = tqdm(mine, desc="old log-probs", unit="batch")
    was_training = policy.training
    policy.eval()
    for indices in iterator:
        logps = _response_logps(policy, data, indices or spare, d, pad_id, bool(micro_batch_tokens)).float().cpu()
        if indices is None:
            continue
        for row, i in enumerate(indices):
            p, r = int(data["prompt_lengths"][i]), int(data["response_lengths"][i])
            flat[offsets[i]:offsets[i + 1]] = logps[row, p - 1:p + r - 1]
    policy.train(was_training)
    if not torch.isfinite(flat).all():
        bad = (~torch.isfinite(flat)).sum().item()
        raise FloatingPointError(f"old log-probs: {bad} non-finite values; the model or data is broken")
    # Each rank filled only its own samples: the sum over ranks is the whole table.
    return all_reduce_sum(flat)


def old_logprobs(policy: torch.nn.Module, data: dict, trainset: Path, model_path: str, d: Dist, *,
                 temperature: float, micro_batch: int, pad_id: int, may_compute: bool = True,
                 micro_batch_tokens: int = 0) -> tuple[torch.Tensor, Path, bool]:
    """The old log-probs of `trainset` (sampled by `model_path`, whose weights `policy` holds now):
    the cached table, or computed and cached. Returns (table, cache file, loaded from the cache).
    `may_compute=False` (the policy has moved since the set was sampled): a missing cache is an error."""
    model_key, data_key = model_fingerprint(model_path), content_key(data)
    path = cache_path(trainset, model_key, temperature, data_key)
    if path.exists():
        with safe_open(str(path), framework="pt") as fh:
            stored = fh.metadata() or {}
            flat = fh.get_tensor("logps")
        if (stored.get("data_key"), stored.get("model_key")) == (data_key, model_key) \
                and flat.numel() == int(data["response_offsets"][-1]):
            return flat, path, True
    if not may_compute:
        raise FileNotFoundError(f"{path}: the old log-probs of {trainset} are not cached and the policy has been "
                                "updated since that set was sampled; resume from the checkpoint at the round's start")
    flat = compute_response_logprobs(policy, data, d, micro_batch=micro_batch, pad_id=pad_id,
                                     micro_batch_tokens=micro_batch_tokens)
    if d.is_main:
        tmp = path.with_suffix(".tmp")
        save_file({"logps": flat}, str(tmp), metadata={"model": model_path, "temperature": str(temperature),
                                                       "trainset": json.dumps(str(trainset)),
                                                       "model_key": model_key, "data_key": data_key})
        os.replace(tmp, path)
    barrier()
    return flat, path, False


def attach_response_offsets(data: dict) -> dict:
    data["response_offsets"] = response_offsets(data["response_lengths"])
    return data
