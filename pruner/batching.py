"""Length-bucketed batch plans and padded micro-batches over a training set.

The whole epoch's plan is a pure function of (lengths, batch sizes, world size, seed, epoch), so a
resumed run rebuilds it and skips to its step: the data position is just the step number.
Sequences of similar length share a global step (padding stays small), and each global batch is
dealt round-robin over ranks so every rank gets a similar amount of work.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100

# steps -> ranks -> micro-batches -> sample indices
Plan = list[list[list[list[int]]]]


def check_batch_sizes(global_batch: int, micro_batch: int, world_size: int, unit: int = 1) -> int:
    """Gradient-accumulation steps for the sizes, or a ValueError that says what does not divide."""
    if micro_batch <= 0 or global_batch <= 0:
        raise ValueError(f"batch sizes must be positive (global {global_batch}, micro {micro_batch})")
    if micro_batch % unit:
        raise ValueError(f"--micro-batch-size {micro_batch} must be a multiple of {unit} (preference pairs)")
    if global_batch % (micro_batch * world_size):
        raise ValueError(
            f"--global-batch-size {global_batch} is not divisible by --micro-batch-size {micro_batch} "
            f"x {world_size} processes = {micro_batch * world_size}")
    return global_batch // (micro_batch * world_size)


def steps_per_epoch(num_samples: int, *, global_batch: int, pairs: list[list[int]] | None = None) -> int:
    """How many global steps `plan_epoch` makes of an epoch (every epoch the same): whole steps only,
    since a ragged last step would change the loss scale."""
    units = len(pairs) if pairs is not None else num_samples
    unit = len(pairs[0]) if pairs else 1
    return units // (global_batch // unit)


def plan_epoch(lengths: list[int], *, global_batch: int, micro_batch: int, world_size: int,
               seed: int, epoch: int, pairs: list[list[int]] | None = None, bucket_steps: int = 16) -> Plan:
    """Group samples (or preference pairs, kept together) into global steps of similar length."""
    units = pairs if pairs is not None else [[i] for i in range(len(lengths))]
    unit = len(units[0]) if units else 1
    accum = check_batch_sizes(global_batch, micro_batch, world_size, unit)
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(units)))
    rng.shuffle(order)
    per_step = global_batch // unit
    usable = per_step * steps_per_epoch(len(lengths), global_batch=global_batch, pairs=pairs)
    order = order[:usable]
    steps: list[list[int]] = []
    bucket = per_step * bucket_steps
    for start in range(0, usable, bucket):
        chunk = sorted(order[start:start + bucket], key=lambda u: -max(lengths[i] for i in units[u]))
        group = [chunk[i:i + per_step] for i in range(0, len(chunk), per_step)]
        rng.shuffle(group)
        steps.extend(group)

    plan: Plan = []
    per_micro = micro_batch // unit
    for step_units in steps:
        ordered = sorted(step_units, key=lambda u: -max(lengths[i] for i in units[u]))
        micros = [ordered[i:i + per_micro] for i in range(0, len(ordered), per_micro)]
        ranks: list[list[list[int]]] = [[] for _ in range(world_size)]
        for j, micro in enumerate(micros):
            ranks[j % world_size].append([i for u in micro for i in units[u]])
        assert all(len(r) == accum for r in ranks)
        plan.append(ranks)
    return plan


@dataclass
class MicroBatch:
    indices: list[int]
    input_ids: torch.Tensor       # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long
    labels: torch.Tensor          # [B, T] long: position t holds token t+1 where it is a response token
    mask: torch.Tensor            # [B, T] bool: labels != IGNORE_INDEX
    old_logps: torch.Tensor | None  # [B, T] fp32: the sampling policy's log-probs, aligned with labels (0 elsewhere)

    @property
    def padded(self) -> bool:
        """Some row is shorter than the batch. Ask the host batch (collate's): on a device it would sync."""
        return not bool(self.attention_mask.all())

    def to(self, device: torch.device) -> "MicroBatch":
        move = lambda t: to_device(t, device)  # noqa: E731
        return MicroBatch(self.indices, move(self.input_ids), move(self.attention_mask), move(self.labels),
                          move(self.mask), move(self.old_logps))


def to_device(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """A host tensor on `device`, asynchronously: a copy from pageable memory is synchronous, from pinned
    memory it overlaps with the GPU's work."""
    if t is None:
        return None
    pinned = t.pin_memory() if device.type == "cuda" and t.device.type == "cpu" else t
    return pinned.to(device, non_blocking=True)


def sequence_lengths(data: dict) -> torch.Tensor:
    """Tokens (prompt + response) of every sample of a training set, from its offsets."""
    return data["offsets"][1:] - data["offsets"][:-1]


def response_offsets(response_lengths: torch.Tensor) -> torch.Tensor:
    """Start of each sample's response log-probs in a flat per-response-token table."""
    out = torch.zeros(len(response_lengths) + 1, dtype=torch.long)
    out[1:] = torch.cumsum(response_lengths.long(), 0)
    return out


def collate(data: dict, indices: list[int], *, pad_id: int = 0,
            old_logps_flat: torch.Tensor | None = None) -> MicroBatch:
    """Right-padded tensors for `indices`; `old_logps_flat` (one value per response token, in
    `response_offsets` order) becomes `old_logps`, aligned with the labels."""
    ids, offsets = data["input_ids"], data["offsets"]
    prompt_lengths, response_lengths = data["prompt_lengths"], data["response_lengths"]
    width = max(int(offsets[i + 1] - offsets[i]) for i in indices)
    batch = len(indices)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, width), dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    old = torch.zeros((batch, width), dtype=torch.float32) if old_logps_flat is not None else None
    resp_off = data.get("response_offsets")
    for row, i in enumerate(indices):
        seq = ids[offsets[i]:offsets[i + 1]].long()
        n, p, r = len(seq), int(prompt_lengths[i]), int(response_lengths[i])
        input_ids[row, :n] = seq
        attention[row, :n] = 1
        # The logits at position t predict token t+1: response tokens p..p+r-1 are scored at p-1..p+r-2.
        labels[row, p - 1:p + r - 1] = seq[p:p + r]
        if old is not None:
            old[row, p - 1:p + r - 1] = old_logps_flat[resp_off[i]:resp_off[i + 1]]
    return MicroBatch(indices, input_ids, attention, labels, labels != IGNORE_INDEX, old)
