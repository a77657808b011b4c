"""Length-Harmonizing Fine-Tuning: `torchrun --nproc_per_node N pruner/train.py [--flags]`.

One entry point, one loop that reads top to bottom. The same code runs as a single process
(`python pruner/train.py`), on CPUs over gloo and on GPUs over NCCL. Every flag is a field of
`TrainConfig` below, with its help text.
"""
from __future__ import annotations

import json
import sys
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

if __package__ in (None, ""):  # `python pruner/train.py` / torchrun: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from pruner import distributed
from pruner.batching import check_batch_sizes, plan_epoch
from pruner.checkpoint import export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from pruner.cli import parse_config
from pruner.configs import TrainConfig
from pruner.distributed import print0
from pruner.manifest import release_all
from pruner.metrics import MetricsLogger, peak_memory_gib, plot_metrics
from pruner.modeling import prepare_model
from pruner.onpolicy import resample
from pruner.plan import check_memory_plan
from pruner.reflogps import reference_logprobs
from pruner.step import LossSpec, StepResult, train_step
from pruner.trainer_setup import (check_inputs, claim_run_folder, cosine_with_warmup, load_training_data,
                                  resolve_defaults)




def train(cfg: TrainConfig) -> Path | None:
    d = distributed.init(cfg.device)
    cfg = resolve_defaults(cfg)
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    data, tokenizer = load_training_data(cfg)          # clear errors before any work
    check_inputs(cfg, data, tokenizer, d.world_size)
    accum = check_batch_sizes(cfg.global_batch_size, cfg.micro_batch_size, d.world_size, 2 if cfg.loss == "dpo" else 1)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    run_lock = claim_run_folder(cfg, tokenizer, d)  # noqa: F841 - held (rank 0) until train() returns
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    print0(f"o1-pruner: {d.world_size} process(es) on {d.device}, loss={cfg.loss}, ratio={cfg.ratio_level}, "
           f"lr={cfg.lr:g}, global batch {cfg.global_batch_size} = {cfg.micro_batch_size} x {d.world_size} x {accum}")

    check_memory_plan(cfg, d, data)                    # before any weight is read: will it fit?
    policy = prepare_model(cfg.model, d, temperature=cfg.temperature, liger=cfg.liger,
                           activation_checkpointing=cfg.activation_checkpointing,
                           mixed_precision=cfg.mixed_precision, meta_init=cfg.meta_init)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)

    # Reference log-probs: once, by the unmodified model, before the first update (DESIGN §1.4).
    old_flat = _old_logprobs(policy, data, Path(cfg.data), cfg.model, cfg, d, pad_id)
    plan_args = dict(global_batch=cfg.global_batch_size, micro_batch=cfg.micro_batch_size,
                     world_size=d.world_size, seed=cfg.seed)
    steps_per_round = _steps_per_epoch(data, plan_args) * cfg.epochs
    total_steps = min(steps_per_round * cfg.rounds, cfg.max_steps or steps_per_round * cfg.rounds)
    scheduler = cosine_with_warmup(optimizer, total_steps, cfg.warmup_ratio, cfg.min_lr_ratio)

    step = 0
    if cfg.resume and (ckpt := latest_checkpoint(out / "checkpoints")) is not None:
        step = load_checkpoint(ckpt, policy, optimizer, scheduler, d)["step"]
        print0(f"resumed from {ckpt} at step {step}")
    logger = MetricsLogger(out / "metrics.jsonl", enabled=d.is_main, total_steps=total_steps, start_step=step,
                           tensorboard=cfg.tensorboard)
    spec = LossSpec.from_config(cfg)
    bad_steps, t_start = 0, time.perf_counter()
    plan, plan_key, data_round = [], None, 0

    while step < total_steps:
        round_index, in_round = divmod(step, steps_per_round)
        if round_index != data_round:  # on-policy round: sample from the current policy
            model_dir, trainset = resample(policy, Path(cfg.data), out, round_index, cfg.model, d,
                                           samples_per_problem=cfg.round_samples)
            data, _ = load_training_data(replace(cfg, data=str(trainset)))
            old_flat = _old_logprobs(policy, data, trainset, str(model_dir), cfg, d, pad_id)
            data_round = round_index
        epoch, in_epoch = divmod(in_round, _steps_per_epoch(data, plan_args))
        if plan_key != (round_index, epoch):  # an epoch's order is a function of (seed, round, epoch)
            plan = plan_epoch(_lengths(data), epoch=epoch + 1000 * round_index, pairs=data.get("pairs"), **plan_args)
            plan_key = (round_index, epoch)
        t_step = time.perf_counter()
        result = train_step(policy, optimizer, data, plan[in_epoch], spec=spec, d=d, pad_id=pad_id,
                            old_flat=old_flat, max_grad_norm=cfg.max_grad_norm)
        step += 1
        lr = _advance_schedule(scheduler)
        bad_steps = _count_bad_steps(result, bad_steps, step, cfg.max_bad_steps, logger)
        if not result.finite:  # nobody updated, so the ranks stay identical; nothing to log or save
            continue
        logger.log(_step_row(result, data, plan[in_epoch], step=step, round_index=round_index, epoch=epoch, lr=lr,
                             elapsed=time.perf_counter() - t_step, device=d.device))

        if step % cfg.ckpt_every == 0 or step == total_steps or step == cfg.stop_after:
            save_checkpoint(out / "checkpoints", step, policy, optimizer, scheduler, {"round": round_index}, d,
                            keep=cfg.keep_checkpoints)
        if cfg.stop_after and cfg.stop_after <= step < total_steps:  # a preempted run, as asked
            print0(f"stopping after step {step} as asked (--stop-after); --resume continues")
            return _finish(policy, cfg, out, d, logger, final=False)

    print0(f"trained {total_steps} steps in {time.perf_counter() - t_start:.1f}s")
    return _finish(policy, cfg, out, d, logger, final=True)


def _advance_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler) -> float:
    """Step the schedule (it follows the step count, updates or not); returns the step's learning rate."""
    lr = scheduler.get_last_lr()[0]
    with warnings.catch_warnings():  # a skipped update is deliberate, not the misuse torch warns about
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
        scheduler.step()
    return lr


def _count_bad_steps(result: StepResult, bad_steps: int, step: int, max_bad_steps: int, logger: MetricsLogger) -> int:
    """Steps in a row with a NaN/inf loss or gradient norm (on any rank); too many stops the run."""
    if result.finite:
        return 0
    bad_steps += 1
    logger.write(f"step {step}: non-finite loss or gradient norm; update skipped ({bad_steps} in a row)")
    if bad_steps >= max_bad_steps:
        raise FloatingPointError(f"{bad_steps} steps in a row with NaN/inf loss or gradients; stopping at "
                                 f"step {step} (lower --lr, check the data)")
    return bad_steps


def _finish(policy: torch.nn.Module, cfg: TrainConfig, out: Path, d, logger: MetricsLogger, *,
            final: bool) -> Path | None:
    """Close the metrics; after the last step export the policy and draw the curves; leave the group."""
    logger.close()
    if not final:  # stopped early on purpose (--stop-after): --resume continues, nothing to publish
        distributed.shutdown()
        return None
    exported = None
    if cfg.export:
        exported = export_hf(policy, out / "export", cfg.model, d)
        print0(f"exported Hugging Face model to {out / 'export'}")
    if d.is_main and (out / "metrics.jsonl").exists():
        plot_metrics(out / "metrics.jsonl", out / "metrics.png")
    distributed.shutdown()
    return exported


def _step_row(result: StepResult, data: dict, step_plan: list, *, step: int, round_index: int, epoch: int,
              lr: float, elapsed: float, device: torch.device) -> dict:
    """The metrics.jsonl row of one step (host values only: the step already synced once)."""
    indices = [i for rank in step_plan for micro in rank for i in micro]
    return {"step": step, "round": round_index, "epoch": epoch, "loss": result.loss, "lr": lr,
            "grad_norm": result.grad_norm, "mean_advantage": data["advantages"][indices].mean().item(),
            "mean_response_tokens": float(data["response_lengths"][indices].float().mean()),
            "tokens_per_s": result.tokens / elapsed, "step_time_s": elapsed,
            "peak_memory_gib": peak_memory_gib(device), **result.stats}


def _lengths(data: dict) -> list[int]:
    return (data["offsets"][1:] - data["offsets"][:-1]).tolist()


def _steps_per_epoch(data: dict, plan_args: dict) -> int:
    return len(plan_epoch(_lengths(data), epoch=0, pairs=data.get("pairs"), **plan_args))


def _old_logprobs(policy, data: dict, trainset: Path, model: str, cfg: TrainConfig, d, pad_id: int) -> torch.Tensor:
    t0 = time.perf_counter()
    flat, cache, hit = reference_logprobs(policy, data, trainset, model, d, temperature=cfg.temperature,
                                          micro_batch=cfg.micro_batch_size, pad_id=pad_id)
    print0(f"old log-probs: {'loaded' if hit else 'computed'} {flat.numel()} tokens in "
           f"{time.perf_counter() - t0:.1f}s ({cache})")
    return flat


def main(argv: list[str] | None = None) -> None:
    try:
        train(parse_config(TrainConfig, argv))
    finally:
        release_all()  # also when train() raised: its frame (and lock) may outlive the exception


if __name__ == "__main__":
    main()
