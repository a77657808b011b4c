"""Padding-free micro-batches (`--micro-batch-tokens N`): token-budget plans and packed rows.

The plan. Each global step holds the same sequences as the padded plan (`plan_epoch`: the same
seed/round/epoch shuffle and length buckets, so packing changes how a step is computed, not what
it learns from). Its units (sequences, or DPO pairs, which never split) are packed into
`world_size x M` bins of at most N tokens, with M the smallest count that fits: units go, longest
first, to the least-loaded bin that still has room (worst-fit decreasing, which balances bins),
then bins go, heaviest first, to the lightest rank that still has fewer than M. Every rank runs
exactly M micro-batches (FSDP2 runs collectives in every forward and backward), with token counts
balanced; the plan is a pure function of (lengths, budget, world size, seed, epoch), so `--resume`
rebuilds it. A bin left empty (fewer units than bins) is run as a zero-weighted repeat of a real
unit, so its rank still joins every collective.

The row. A micro-batch is one row of concatenated sequences; `position_ids` restart at 0 for each
sequence and `cu_seq_lens` mark the boundaries for the attention (pruner/packed_attention.py),
which never looks across them. The log-probs come back in the padded layout of `collate` so the
losses see exactly what they see without packing.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from pruner.batching import MicroBatch, Plan, collate, plan_epoch, to_device

def check_budget(lengths: list[int], budget: int, *, source: str = "the training set",
                 pairs: list[list[int]] | None = None) -> None:
    """Refuse a budget that some sequence (or DPO pair, which stays in one micro-batch) exceeds,
    naming both numbers and the sample; called before any weight is read."""
    if budget <= 0:
        raise ValueError(f"--micro-batch-tokens must be positive, got {budget}")
    units = pairs if pairs is not None else [[i] for i in range(len(lengths))]
    longest = max(units, key=lambda u: (sum(lengths[i] for i in u), -u[0]), default=None)
    if longest is None:
        return
    tokens = sum(lengths[i] for i in longest)
    if tokens > budget:
        what = (f"DPO pair (samples {', '.join(map(str, longest))}, kept in one micro-batch)" if len(longest) > 1
                else f"sequence (sample {longest[0]})")
        raise ValueError(f"{source}: --micro-batch-tokens {budget} is smaller than its longest {what} of "
                         f"{tokens} prompt+response tokens; raise --micro-batch-tokens to at least {tokens}")


def check_packed_batch(global_batch: int, world_size: int, unit: int = 1) -> None:
    """A packed step needs whole DPO pairs and at least one unit for every process."""
    if global_batch % unit or global_batch // unit < world_size:
        raise ValueError(f"--global-batch-size {global_batch} must hold whole {'pairs' if unit > 1 else 'sequences'}, "
                         f"at least one per process ({world_size} processes)")


def _fill(sizes: list[int], order: list[int], bins: int, budget: int) -> list[list[int]] | None:
    """Worst-fit decreasing of units `order` (longest first) into `bins` bins; None if one does not fit.
    The least-loaded bin has the most room: if a unit does not fit there it fits nowhere."""
    heap = [(0, j) for j in range(bins)]  # (load, bin): ties go to the lower index, deterministically
    members: list[list[int]] = [[] for _ in range(bins)]
    for u in order:
        load, b = heapq.heappop(heap)
        if load + sizes[u] > budget:
            return None
        members[b].append(u)
        heapq.heappush(heap, (load + sizes[u], b))
    return members


def pack_step(units: list[list[int]], lengths: list[int], budget: int, world_size: int) -> list[list[list[int]]]:
    """One global step's units (index lists) as ranks -> micro-batches -> sample indices, every rank
    with the same number of micro-batches of at most `budget` tokens, token counts balanced."""
    sizes = [sum(lengths[i] for i in u) for u in units]
    order = sorted(range(len(units)), key=lambda u: (-sizes[u], units[u][0]))
    per_rank = max(1, -(-sum(sizes) // (budget * world_size)))
    while (members := _fill(sizes, order, world_size * per_rank, budget)) is None:
        per_rank += 1
    loads = [sum(sizes[u] for u in m) for m in members]
    ranks: list[list[list[int]]] = [[] for _ in range(world_size)]
    rank_load = [0] * world_size
    for b in sorted(range(len(members)), key=lambda j: (-loads[j], j)):
        r = min((r for r in range(world_size) if len(ranks[r]) < per_rank), key=lambda r: (rank_load[r], r))
        # a unit's samples stay adjacent (DPO rows come in (chosen, rejected) pairs)
        ranks[r].append([i for u in sorted(members[b]) for i in units[u]])
        rank_load[r] += loads[b]
    return ranks


def plan_packed_epoch(lengths: list[int], *, global_batch: int, micro_batch_tokens: int, world_size: int,
                      seed: int, epoch: int, pairs: list[list[int]] | None = None) -> Plan:
    """`plan_epoch`'s global steps (same sequences per step), each packed into token-budget micro-batches."""
    unit = len(pairs[0]) if pairs else 1
    check_packed_batch(global_batch, world_size, unit)
    check_budget(lengths, micro_batch_tokens, pairs=pairs)
    steps = plan_epoch(lengths, global_batch=global_batch, micro_batch=global_batch, world_size=1, seed=seed,
                       epoch=epoch, pairs=pairs)
    plan: Plan = []
    for step in steps:
        indices = step[0][0]  # plan_epoch keeps a pair's samples adjacent, in the pair's order
        units = [indices[k:k + unit] for k in range(0, len(indices), unit)]
        plan.append(pack_step(units, lengths, micro_batch_tokens, world_size))
    return plan


def pack_for_inference(lengths: list[int], budget: int, world_size: int) -> list[list[list[int]]]:
    """The old-log-prob pass: the whole set in bins of at most `budget` tokens, as ranks -> micro-batches
    (the same count on every rank; a rank short of one repeats its first, its result discarded)."""
    return pack_step([[i] for i in range(len(lengths))], lengths, budget, world_size)


@dataclass
class PackedRow:
    """One packed micro-batch: the row the model runs, and the padded layout the loss reads."""

    input_ids: torch.Tensor      # [1, N] long
    position_ids: torch.Tensor   # [1, N] long, restarting at 0 for every sequence
    labels: torch.Tensor         # [1, N] long, IGNORE_INDEX outside responses (and at every boundary)
    cu_seq_lens: torch.Tensor    # [k + 1] int32: sequence boundaries in the row
    max_length: int              # the longest sequence in the row
    gather: torch.Tensor         # [B, T] long: where each padded position reads from the row
    padded: MicroBatch           # `collate`'s tensors for the same samples (labels, mask, old log-probs)

    def to(self, device: torch.device) -> "PackedRow":
        move = lambda t: to_device(t, device)  # noqa: E731
        return PackedRow(move(self.input_ids), move(self.position_ids), move(self.labels), move(self.cu_seq_lens),
                         self.max_length, move(self.gather), self.padded.to(device))

    def attention_kwargs(self) -> dict:
        """What transformers hands every attention call (its flash-attention varlen names)."""
        return {"cu_seq_lens_q": self.cu_seq_lens, "cu_seq_lens_k": self.cu_seq_lens,
                "max_length_q": self.max_length, "max_length_k": self.max_length}


def pack_collate(data: dict, indices: list[int], *, pad_id: int = 0,
                 old_logps_flat: torch.Tensor | None = None) -> PackedRow:
    """The samples `indices` as one packed row (no padding token), plus their padded layout."""
    padded = collate(data, indices, pad_id=pad_id, old_logps_flat=old_logps_flat)
    lengths = padded.attention_mask.sum(1)
    starts = torch.zeros(len(indices) + 1, dtype=torch.long)
    starts[1:] = torch.cumsum(lengths, 0)
    keep = padded.attention_mask.bool()
    width = padded.input_ids.shape[1]
    positions = torch.arange(width).expand_as(padded.input_ids)
    # Labels come from collate, which scores only a sequence's own response tokens: the last
    # position of each sequence (which would "predict" the next one's first token) stays ignored.
    return PackedRow(input_ids=padded.input_ids[keep].unsqueeze(0), position_ids=positions[keep].unsqueeze(0),
                     labels=padded.labels[keep].unsqueeze(0), cu_seq_lens=starts.to(torch.int32),
                     max_length=int(lengths.max()), gather=(starts[:-1, None] + positions).clamp(max=int(starts[-1]) - 1),
                     padded=padded)


def unpack(row_values: torch.Tensor, row: PackedRow) -> torch.Tensor:
    """[1, N] per-token values of a packed row -> the padded [B, T] layout (0 at padding)."""
    values = row_values.reshape(-1)[row.gather]
    return torch.where(row.padded.mask, values, torch.zeros((), dtype=values.dtype, device=values.device))


def packed_logprobs(policy: torch.nn.Module, row: PackedRow) -> torch.Tensor:
    """The policy's token log-probs of a packed row, in the padded [B, T] layout of `row.padded`."""
    logps = policy(row.input_ids, None, row.labels, position_ids=row.position_ids, **row.attention_kwargs())
    return unpack(logps, row)
