"""One optimizer step of the trainer, shared by `pruner/train.py` and `bench/train_step.py`.

The step's metrics stay on the device while its micro-batches run: the only host sync is one
`.tolist()` of a small vector after the single all-reduce, which the non-finite check needs
before `optimizer.step()` anyway. Tokens and sequences are known from the plan on every rank,
so they are never reduced.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pruner.batching import collate
from pruner.distributed import Dist, all_reduce_sum
from pruner.losses import compute_loss, count_units, normalizer_units
from pruner.packing import pack_collate, packed_logprobs


@dataclass(frozen=True)
class LossSpec:
    """Which objective a step optimises, and its hyper-parameters (fields of TrainConfig)."""

    loss: str = "lh"
    ratio_level: str = "sequence"
    eps_low: float = 0.2
    eps_high: float = 0.2
    dpo_beta: float = 0.1

    @classmethod
    def from_config(cls, cfg: object) -> "LossSpec":
        return cls(**{name: getattr(cfg, name) for name in cls.__dataclass_fields__})


@dataclass
class StepResult:
    finite: bool                 # False: some rank saw NaN/inf, nobody updated
    loss: float                  # the global step's loss (sum over ranks of their share)
    grad_norm: float
    tokens: int                  # non-pad tokens over all ranks
    sequences: int
    stats: dict[str, float] = field(default_factory=dict)  # loss statistics, mean over micro-batches and ranks


def _forward_backward(policy: torch.nn.Module, data: dict, micro_batches: list[list[int]], spec: LossSpec,
                      normalizer: int, old_logps_flat: torch.Tensor | None, d: Dist, pad_id: int,
                      packed: bool = False) -> tuple[torch.Tensor, list[str]]:
    """Accumulate gradients over this rank's micro-batches; returns [loss, *stats] summed, on the device."""
    sums: torch.Tensor | None = None
    names: list[str] = []
    real = sum(1 for m in micro_batches if m)
    for indices in micro_batches:
        # An empty packed micro-batch (a rank with fewer units than bins) still joins FSDP's
        # collectives: it runs a real one with zero weight, adding nothing.
        weight = 1.0 if indices else 0.0
        indices = indices or next(m for m in micro_batches if m)
        if packed:
            row = pack_collate(data, indices, pad_id=pad_id, old_logps_flat=old_logps_flat).to(d.device)
            batch, logps = row.padded, packed_logprobs(policy, row)
        else:
            host = collate(data, indices, pad_id=pad_id, old_logps_flat=old_logps_flat)
            batch = host.to(d.device)
            # Without padding (known on the host) no mask: transformers would check it on the device (a host
            # sync every forward) only to find it needs none; SDPA keeps its causal path.
            logps = policy(batch.input_ids, batch.attention_mask if host.padded else None, batch.labels)
        chosen = data["chosen"][indices].to(d.device) if "chosen" in data else None
        loss, stats = compute_loss(spec.loss, logps, batch.old_logps, batch.mask,
                                   data["advantages"][indices].to(d.device), normalizer,
                                   ratio_level=spec.ratio_level, eps_low=spec.eps_low, eps_high=spec.eps_high,
                                   dpo_beta=spec.dpo_beta, chosen=chosen)
        # FSDP averages gradients over ranks; the loss is already a global mean, so undo that.
        (loss * (d.world_size * weight)).backward()
        if not weight:
            continue
        names = sorted(stats)
        row = torch.stack([loss.detach().double()] + [stats[k].double() / real for k in names])
        sums = row if sums is None else sums + row
    assert sums is not None, "a rank got no micro-batch; plan_epoch deals every rank the same number"
    return sums, names


def train_step(policy: torch.nn.Module, optimizer: torch.optim.Optimizer, data: dict,
               step_plan: list[list[list[int]]], *, spec: LossSpec, d: Dist, pad_id: int,
               old_logps_flat: torch.Tensor | None, max_grad_norm: float, packed: bool = False) -> StepResult:
    """Forward/backward this rank's share of one global step (`step_plan`: ranks -> micro-batches ->
    sample indices), clip, and update unless any rank saw a non-finite loss or gradient norm.
    `old_logps_flat`: the sampling policy's log-prob of every response token (pruner/old_logps.py).
    `packed`: each micro-batch is one packed row (pruner/packing.py, `--micro-batch-tokens`)."""
    # Train mode before every update, however the old log-probs were obtained: from_pretrained leaves the
    # model in eval(), and Hugging Face's gradient checkpointing (and dropout) act only in train mode, so a
    # run whose old log-probs came from the cache would otherwise keep every layer's activations.
    policy.train()
    everyone = [i for rank in step_plan for micro in rank for i in micro]
    # The loss is a sum over the step's units divided by their count over ALL ranks and
    # micro-batches; every rank knows the plan, so no collective is needed for it.
    normalizer = count_units(normalizer_units(spec.loss, spec.ratio_level),
                             data["response_lengths"][everyone].tolist())
    sums, names = _forward_backward(policy, data, step_plan[d.rank], spec, normalizer, old_logps_flat, d, pad_id,
                                    packed)
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    bad = (~(torch.isfinite(sums[0]) & torch.isfinite(grad_norm))).double().reshape(1)
    reduced = all_reduce_sum(torch.cat([sums[:1], bad, sums[1:]]))  # one collective per step
    host = torch.cat([reduced, grad_norm.detach().double().reshape(1)]).tolist()  # the step's one host sync
    finite = host[1] == 0
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    samples = torch.tensor(everyone)  # the step's lengths only, not the whole set's every step
    tokens = int((data["offsets"][samples + 1] - data["offsets"][samples]).sum())
    return StepResult(finite=finite, loss=host[0], grad_norm=host[-1], tokens=tokens,
                      sequences=len(everyone), stats={k: v / d.world_size for k, v in zip(names, host[2:-1])})
