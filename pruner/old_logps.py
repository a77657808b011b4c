"""The "old" log-probs: one no-grad pass, over a training set, of the policy that sampled it.

Two words, two things. The "ref" model is the frozen reference pi_ref, the starting point of the
run; the "old" log-probs are those of the policy that sampled the training set in use (the
ratio's denominator). In the first round the sampling policy IS the reference model; in an
on-policy round (`--rounds`) it is the policy exported at the round's start. Either way the data
is fixed and the sampling policy is the trained policy's state before the set's first update, so
log pi_old(y_t | x, y_<t) is computed once, before that update, and cached next to the training
set as `old_logps-<model>-t<temperature>-<data>.safetensors`: no second model is
ever held in memory and no step pays for an extra forward. A training set in a folder this
process cannot write (read-only, someone else's) gets its cache in the run folder
(`<out>/old_logps/`), and the log says so.

Rank 0 alone decides whether a usable cache exists and hands the table to every rank: ranks that
looked on their own (no shared filesystem, NFS lag) could disagree and then wait forever in
collectives the others never call. A damaged cache (truncated, corrupt, not the expected table)
is recomputed, and the log says so.
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
from pruner.distributed import Dist, all_reduce_sum, barrier, broadcast, decided_by_main, print0, raise_together
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
    host = collate(data, indices, pad_id=pad_id)
    batch = host.to(d.device)  # no mask without padding: no host sync in transformers (pruner/step.py)
    return policy(batch.input_ids, batch.attention_mask if host.padded else None, batch.labels)


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
    bad = int((~torch.isfinite(flat)).sum())
    # a flag every rank sees before anyone raises: a rank raising alone leaves the others in the all-reduce
    raise_together(FloatingPointError(f"old log-probs: {bad} non-finite values; the model or data is broken")
                   if bad else None)
    # Each rank filled only its own samples: the sum over ranks is the whole table.
    return all_reduce_sum(flat)


def old_logprobs(policy: torch.nn.Module, data: dict, trainset: Path, model_path: str, d: Dist, *,
                 temperature: float, micro_batch: int, pad_id: int, may_compute: bool = True,
                 run_dir: Path | None = None, micro_batch_tokens: int = 0) -> tuple[torch.Tensor, Path, bool]:
    """The old log-probs of `trainset` (sampled by `model_path`, whose weights `policy` holds now):
    the cached table, or computed and cached. Returns (table, cache file, loaded from the cache).
    `may_compute=False` (the policy has moved since the set was sampled): a missing cache is an error.
    `run_dir`: where the cache goes (`run_dir/old_logps/`) when the training set's folder is not writable."""
    model_key, data_key = model_fingerprint(model_path), content_key(data)
    places = [cache_path(trainset, model_key, temperature, data_key)]
    if run_dir is not None:
        places.append(cache_path(Path(run_dir) / "old_logps", model_key, temperature, data_key))
    numel = int(data["response_offsets"][-1])
    tables: dict[str, torch.Tensor] = {}

    def decide() -> tuple[str | None, list[str]]:  # rank 0: the first usable cache, and what was wrong
        damaged = []
        for place in places:
            flat, problem = read_cache(place, model_key, data_key, numel)
            if flat is not None:
                tables["hit"] = flat
                return str(place), damaged
            if problem:
                damaged.append(f"{place}: {problem}")
        return None, damaged

    hit, damaged = decided_by_main(decide)
    for note in damaged:
        print0(f"old log-prob cache {note}; {'recomputing it' if may_compute else 'cannot recompute it'}")
    if hit is not None:
        found = tables["hit"] if "hit" in tables else torch.zeros(numel, dtype=torch.float32)  # no default built eagerly
        return _share(found, d), Path(hit), True
    if not may_compute:
        raise FileNotFoundError(f"{places[0]}: the old log-probs of {trainset} are not cached (or the cache is "
                                "damaged) and the policy has been updated since that set was sampled; resume from "
                                "the checkpoint at the round's start")
    flat = compute_response_logprobs(policy, data, d, micro_batch=micro_batch, pad_id=pad_id,
                                     micro_batch_tokens=micro_batch_tokens)
    meta = {"model": model_path, "temperature": str(temperature), "trainset": json.dumps(str(trainset)),
            "model_key": model_key, "data_key": data_key}
    path = decided_by_main(lambda: write_cache(flat, places, meta))
    barrier()
    return flat, path if path is not None else places[0], False


def read_cache(path: Path, model_key: str, data_key: str, numel: int) -> tuple[torch.Tensor | None, str | None]:
    """(the table, None) when `path` holds the expected table; (None, None) when there is no file;
    (None, what is wrong) when the file is there but unusable (truncated, corrupt, another table)."""
    if not path.exists():
        return None, None
    try:
        with safe_open(str(path), framework="pt") as fh:  # safetensors: data only, never code
            stored = fh.metadata() or {}
            flat = fh.get_tensor("logps")
    except Exception as exc:  # SafetensorError (truncated/corrupt header), a missing tensor, an I/O error
        return None, f"unreadable ({type(exc).__name__}: {str(exc)[:200]})"
    if (stored.get("data_key"), stored.get("model_key")) != (data_key, model_key):
        return None, "written for another model or training set"
    if flat.dtype != torch.float32 or flat.dim() != 1 or flat.numel() != numel:
        return None, f"holds {flat.dtype} {tuple(flat.shape)}, expected float32 ({numel},)"
    if not torch.isfinite(flat).all():
        return None, "holds non-finite values"
    return flat, None


def write_cache(flat: torch.Tensor, places: list[Path], meta: dict[str, str]) -> Path | None:
    """Write the table to the first place that takes it (rank 0); the log says where, when that is not the
    first. None: nowhere (the run goes on; the next run computes the table again)."""
    errors = []
    for place in places:
        tmp = place.with_name(place.name + ".tmp")
        try:
            place.parent.mkdir(parents=True, exist_ok=True)
            save_file({"logps": flat}, str(tmp), metadata=meta)
            os.replace(tmp, place)
        except Exception as exc:  # OSError or SafetensorError: a read-only folder, a full disk
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            errors.append(f"{place.parent} is not writable ({type(exc).__name__}: {str(exc)[:120]})")
            continue
        if errors:
            print0(f"old log-probs: {'; '.join(errors)}: cached in {place} instead")
        return place
    print0(f"old log-probs: not cached ({'; '.join(errors)}); a later run computes them again")
    return None


def _share(flat: torch.Tensor, d: Dist, chunk: int = 1 << 24) -> torch.Tensor:
    """Rank 0's table on every rank, in chunks (a bounded copy on the group's device)."""
    if d.world_size == 1 or flat.numel() == 0:
        return flat
    return torch.cat([broadcast(flat[i:i + chunk]) for i in range(0, flat.numel(), chunk)])


def attach_response_offsets(data: dict) -> dict:
    data["response_offsets"] = response_offsets(data["response_lengths"])
    return data
