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


@torch.no_grad()
def compute_response_logprobs(policy: torch.nn.Module, data: dict, d: Dist, *, micro_batch: int,
                              pad_id: int, show_progress: bool = True) -> torch.Tensor:
    """Flat fp32 tensor of `policy`'s log-probs of every response token, in sample order (see
    response_offsets)."""
    lengths = sequence_lengths(data).tolist()
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches = [order[i:i + micro_batch] for i in range(0, len(order), micro_batch)]
    offsets = data["response_offsets"]
    flat = torch.zeros(int(offsets[-1]), dtype=torch.float32)
    # FSDP's collectives need every rank to run the same number of forwards: pad with repeats.
    rounds = -(-len(batches) // d.world_size)
    mine = [batches[r * d.world_size + d.rank] if r * d.world_size + d.rank < len(batches) else None
            for r in range(rounds)]
    iterator = mine
    if show_progress and d.is_main:
        from tqdm.auto import tqdm

        iterator = tqdm(mine, desc="old log-probs", unit="batch")
    was_training = policy.training
    policy.eval()
    for indices in iterator:
        host = collate(data, indices if indices is not None else batches[0], pad_id=pad_id)
        batch = host.to(d.device)  # no mask without padding: no host sync in transformers (pruner/step.py)
        logps = policy(batch.input_ids, batch.attention_mask if host.padded else None, batch.labels).float().cpu()
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
                 temperature: float, micro_batch: int, pad_id: int,
                 may_compute: bool = True) -> tuple[torch.Tensor, Path, bool]:
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
    flat = compute_response_logprobs(policy, data, d, micro_batch=micro_batch, pad_id=pad_id)
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
