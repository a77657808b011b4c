"""Length-Harmonizing Fine-Tuning: `torchrun --nproc_per_node N pruner/train.py [--flags]`.

One entry point, one loop that reads top to bottom: `train` checks everything it can before any
weight is read, builds the run, then goes round by round (`--rounds`: on-policy re-sampling
between rounds), epoch by epoch, calling `pruner.step.train_step` once per optimizer step. The
same code runs as a single process (`python pruner/train.py`), on CPUs over gloo and on GPUs over
NCCL. Every flag is a field of `pruner.configs.TrainConfig`, with its help text.
"""
from __future__ import annotations

import json
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python pruner/train.py` / torchrun: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from transformers import AutoConfig

from pruner import distributed, packed_attention
from pruner.batching import check_batch_sizes, plan_epoch, sequence_lengths, steps_per_epoch
from pruner.checkpoint import latest_checkpoint, load_checkpoint, resume_checkpoint, save_checkpoint
from pruner.cli import parse_config
from pruner.configs import TrainConfig
from pruner.distributed import Dist, broadcast_object, compute_dtype, decided_by_main, print0
from pruner.embedded import default_model_path
from pruner.export import export_hf
from pruner.manifest import (Output, OutputLock, RunStateError, build_manifest, claim_output, file_digest,
                             manifest_digest, model_inputs, release_all)
from pruner.metrics import MetricsLogger, peak_memory_gib, plot_metrics
from pruner.model_files import load_tokenizer, tokenizer_fingerprint
from pruner.modeling import prepare_model
from pruner.onpolicy import export_round_model, resample, round_configs
from pruner.packing import check_budget, check_packed_batch, plan_packed_epoch
from pruner.plan import check_memory_plan
from pruner.old_logps import attach_response_offsets, old_logprobs
from pruner.step import LossSpec, StepResult, train_step
from pruner.trainset import TENSORS, load_trainset, read_meta

PAPER_LR = 2e-7          # the paper's code for 7B models
EMBEDDED_LR = 2e-5       # the embedded default: a 1M-parameter model trained from scratch moves far faster

# Flags that may change between a run and its --resume: where to stop, how often to save, what to
# show or export, and memory-only switches that leave the numbers as they are.
VOLATILE = ("out", "resume", "overwrite", "stop_after", "ckpt_every", "keep_checkpoints", "final_checkpoint", "export",
            "tensorboard", "max_bad_steps", "meta_init", "activation_checkpointing", "until_round")


@dataclass
class Run:
    """What the loop carries from step to step."""

    cfg: TrainConfig
    d: Dist
    policy: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    logger: MetricsLogger
    pad_id: int
    plan_args: dict          # batch sizes, world size and seed of plan_epoch
    spec: LossSpec           # the objective, from the flags: the same every step
    steps_per_round: int
    total_steps: int
    step: int = 0            # optimizer steps taken (skipped non-finite ones included)
    bad_steps: int = 0       # non-finite steps in a row

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)


def train(cfg: TrainConfig) -> Path | None:
    cfg.validate()
    d = distributed.init(cfg.device)
    cfg = resolve_defaults(cfg)
    torch.manual_seed(cfg.seed)
    data, tokenizer = load_training_data(cfg)          # clear errors before any work
    cfg = resolve_from_data(cfg, data["meta"])
    check_inputs(cfg, data, d.world_size)
    if cfg.rounds > 1:  # the rounds re-sample with the first set's recorded settings: are they all there?
        round_configs(Path(cfg.data), Path(cfg.out), 1, cfg.round_samples)
        check_round_placement(cfg, d)
    run_lock = claim_run_folder(cfg, tokenizer, d)  # noqa: F841 - held (rank 0) until train() returns
    if d.is_main:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        Path(cfg.out, "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    check_memory_plan(cfg, d, data)                    # before any weight is read: will it fit?

    run, old_logps = start_run(cfg, d, data, pad_id)
    t_start = time.perf_counter()
    rounds = min(cfg.rounds, math.ceil(run.total_steps / run.steps_per_round))
    for round_index in range(run.step // run.steps_per_round, rounds):
        if round_index > 0 and round_index == cfg.until_round:  # the round driver samples it, outside torchrun
            return hand_over(run, round_index)
        if round_index > 0:  # on-policy round: sample from the current policy
            data, old_logps = round_data(run, round_index)
        if not train_round(run, data, old_logps, round_index):
            print0(f"stopping after step {run.step} as asked (--stop-after); --resume continues")
            return _finish(run, final=False)
    print0(f"trained {run.total_steps} steps in {time.perf_counter() - t_start:.1f}s")
    return _finish(run, final=True)


def start_run(cfg: TrainConfig, d: Dist, data: dict, pad_id: int) -> tuple[Run, torch.Tensor]:
    """The policy, the optimizer and its schedule, the first set's old log-probs (by the unmodified
    model), and the state of the latest checkpoint under --resume."""
    print0(f"o1-pruner: {d.world_size} process(es) on {d.device}, loss={cfg.loss}, ratio={cfg.ratio_level}, "
           f"lr={cfg.lr:g}, global batch {cfg.global_batch_size} = {_micro_batches(cfg, d.world_size)}")
    policy = prepare_model(cfg.model, d, temperature=cfg.temperature, liger=cfg.liger,
                           activation_checkpointing=cfg.activation_checkpointing,
                           mixed_precision=cfg.mixed_precision, meta_init=cfg.meta_init)
    if cfg.micro_batch_tokens:
        packed_attention.enable(policy.lm)
        dtype = compute_dtype(d, cfg.mixed_precision)
        print0(f"packed attention: {packed_attention.select_path(d.device, dtype)} ({packed_attention.NAME})")
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    # Before the first update: the policy is still the one that sampled the set, so its log-probs ARE the old ones.
    old_logps = _old_logprobs(policy, data, Path(cfg.data), cfg.model, cfg, d, pad_id)
    plan_args = dict(global_batch=cfg.global_batch_size, world_size=d.world_size, seed=cfg.seed,
                     **({"micro_batch_tokens": cfg.micro_batch_tokens} if cfg.micro_batch_tokens
                        else {"micro_batch": cfg.micro_batch_size}))
    steps_per_round = _steps_per_epoch(data, plan_args) * cfg.epochs
    total_steps = min(steps_per_round * cfg.rounds, cfg.max_steps or steps_per_round * cfg.rounds)
    scheduler = cosine_with_warmup(optimizer, total_steps, cfg.warmup_ratio, cfg.min_lr_ratio)
    step = 0
    if cfg.resume and (ckpt := resume_checkpoint(Path(cfg.out) / "checkpoints", d)) is not None:
        step = load_checkpoint(ckpt, policy, optimizer, scheduler, d)["step"]
        print0(f"resumed from {ckpt} at step {step}")
    elif cfg.resume:  # said, not refused: one command line serves a job's first start and its restarts
        print0(f"no checkpoint in {cfg.out}: starting from step 0")
    logger = MetricsLogger(Path(cfg.out) / "metrics.jsonl", enabled=d.is_main, total_steps=total_steps,
                           start_step=step, tensorboard=cfg.tensorboard)
    return Run(cfg, d, policy, optimizer, scheduler, logger, pad_id, plan_args, LossSpec.from_config(cfg),
               steps_per_round, total_steps, step), old_logps


def round_data(run: Run, round_index: int) -> tuple[dict, torch.Tensor]:
    """Round `round_index`'s training set, sampled by the policy at the round's start, and its old log-probs."""
    cfg, d = run.cfg, run.d
    at_start = run.step == round_index * run.steps_per_round  # else resumed mid-round: the round is on disk
    model_dir, trainset = resample(run.policy, Path(cfg.data), run.out, round_index, cfg.model, d,
                                   samples_per_problem=cfg.round_samples, at_round_start=at_start,
                                   sample_here=not cfg.until_round)
    data, _ = load_training_data(replace(cfg, data=str(trainset)))
    check_inputs(cfg, data, d.world_size, source=str(trainset))
    return data, _old_logprobs(run.policy, data, trainset, str(model_dir), cfg, d, run.pad_id,
                               may_compute=at_start)


def check_round_placement(cfg: TrainConfig, d: Dist) -> None:
    """On GPUs a round is never sampled from inside the trainer: rank 0's vLLM would share a GPU with
    FSDP shards and AdamW state while every other rank waits in a collective past its timeout."""
    if d.device.type == "cuda" and not cfg.until_round:
        raise ValueError(f"--rounds {cfg.rounds} on GPUs: run the rounds through the round driver, which samples "
                         "between torchrun launches: python -m pruner.rounds --nproc-per-node N -- <these flags>")


def hand_over(run: Run, round_index: int) -> None:
    """The end of round `round_index - 1` under the round driver: a checkpoint at this step (the next
    launch resumes from it) and the policy exported as the round's sampling model; then exit."""
    latest = decided_by_main(lambda: latest_checkpoint(run.out / "checkpoints"))  # every rank saves, or none
    if latest is None or not latest.name.endswith(f"{run.step:07d}"):
        save_checkpoint(run.out / "checkpoints", run.step, run.policy, run.optimizer, run.scheduler,
                        {"round": round_index - 1}, run.d, keep=run.cfg.keep_checkpoints)
    built = export_round_model(run.policy, Path(run.cfg.data), run.out, round_index, run.cfg.model, run.d,
                               samples_per_problem=run.cfg.round_samples)
    print0(f"round {round_index}: {'already built' if built else 'policy exported'} at step {run.step}; "
           "the round driver samples it")
    return _finish(run, final=False)


def train_round(run: Run, data: dict, old_logps: torch.Tensor, round_index: int) -> bool:
    """The steps of one round, epoch by epoch over the round's set, from where the run stands.
    False: the run stopped early as asked (--stop-after)."""
    first = round_index * run.steps_per_round
    last = min(first + run.steps_per_round, run.total_steps)
    per_epoch = _steps_per_epoch(data, run.plan_args)
    for epoch in range((run.step - first) // per_epoch, math.ceil((last - first) / per_epoch)):
        # an epoch's order is a function of (seed, round, epoch): a resumed run rebuilds it
        planner = plan_packed_epoch if run.cfg.micro_batch_tokens else plan_epoch
        plan = planner(sequence_lengths(data).tolist(), epoch=epoch + 1000 * round_index, pairs=data.get("pairs"),
                       **run.plan_args)
        epoch_start = first + epoch * per_epoch
        for step_plan in plan[run.step - epoch_start:last - epoch_start]:
            if not _step(run, data, old_logps, step_plan, round_index, epoch):
                return False
    return True


def _step(run: Run, data: dict, old_logps: torch.Tensor, step_plan: list, round_index: int, epoch: int) -> bool:
    """One optimizer step, its metrics row and checkpoint. False: stop here (--stop-after)."""
    cfg, t_step = run.cfg, time.perf_counter()
    result = train_step(run.policy, run.optimizer, data, step_plan, spec=run.spec, d=run.d,
                        pad_id=run.pad_id, old_logps_flat=old_logps, max_grad_norm=cfg.max_grad_norm,
                        packed=bool(cfg.micro_batch_tokens))
    run.step += 1
    lr = _advance_schedule(run.scheduler)
    run.bad_steps = _count_bad_steps(result, run.bad_steps, run.step, cfg.max_bad_steps, run.logger)
    if not result.finite:  # nobody updated, so the ranks stay identical; nothing to log or save
        return True
    run.logger.log(_step_row(result, data, step_plan, step=run.step, round_index=round_index, epoch=epoch, lr=lr,
                             elapsed=time.perf_counter() - t_step, device=run.d.device))
    last = run.step == run.total_steps and cfg.final_checkpoint
    if run.step % cfg.ckpt_every == 0 or last or run.step == cfg.stop_after:
        save_checkpoint(run.out / "checkpoints", run.step, run.policy, run.optimizer, run.scheduler,
                        {"round": round_index}, run.d, keep=cfg.keep_checkpoints)
    return not (cfg.stop_after and cfg.stop_after <= run.step < run.total_steps)


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


def _finish(run: Run, *, final: bool) -> Path | None:
    """Close the metrics; after the last step export the policy and draw the curves; leave the group."""
    run.logger.close()
    if not final:  # stopped early on purpose (--stop-after): --resume continues, nothing to publish
        distributed.shutdown()
        return None
    exported = None
    if run.cfg.export:
        exported = export_hf(run.policy, run.out / "export", run.cfg.model, run.d,
                             sampling=read_meta(run.cfg.data).get("sampling"))
        print0(f"exported Hugging Face model to {run.out / 'export'}")
    if run.d.is_main and (run.out / "metrics.jsonl").exists():
        plot_metrics(run.out / "metrics.jsonl", run.out / "metrics.png")
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


def _micro_batches(cfg: TrainConfig, world_size: int) -> str:
    """How a global batch splits, for the first log line."""
    if cfg.micro_batch_tokens:
        return (f"packed rows of <= {cfg.micro_batch_tokens} tokens, balanced over {world_size} process(es) "
                "(--micro-batch-tokens; --micro-batch-size is not used)")
    accum = check_batch_sizes(cfg.global_batch_size, cfg.micro_batch_size, world_size, 2 if cfg.loss == "dpo" else 1)
    return f"{cfg.micro_batch_size} x {world_size} x {accum}"


def _steps_per_epoch(data: dict, plan_args: dict) -> int:
    return steps_per_epoch(len(data["prompt_lengths"]), global_batch=plan_args["global_batch"], pairs=data.get("pairs"))


def _old_logprobs(policy: torch.nn.Module, data: dict, trainset: Path, model: str, cfg: TrainConfig, d: Dist,
                  pad_id: int, *, may_compute: bool = True) -> torch.Tensor:
    t0 = time.perf_counter()
    flat, cache, hit = old_logprobs(policy, data, trainset, model, d, temperature=cfg.temperature,
                                    micro_batch=cfg.micro_batch_size, pad_id=pad_id, may_compute=may_compute,
                                    run_dir=Path(cfg.out), micro_batch_tokens=cfg.micro_batch_tokens)
    print0(f"old log-probs (the sampling policy's): {'loaded' if hit else 'computed'} {flat.numel()} tokens in "
           f"{time.perf_counter() - t0:.1f}s ({cache})")
    return flat


# --- before any weight is read: defaults, the training set, the run folder, the schedule -------------

def resolve_defaults(cfg: TrainConfig) -> TrainConfig:
    """The embedded default model when --model is empty; the learning rate that suits the model."""
    embedded = not cfg.model
    if embedded:
        cfg = replace(cfg, model=str(default_model_path()))
    if not cfg.lr:
        cfg = replace(cfg, lr=EMBEDDED_LR if embedded else PAPER_LR)
    return cfg


def resolve_from_data(cfg: TrainConfig, meta: dict) -> TrainConfig:
    """The loss from the set's kind, and the temperature the set was sampled at, unless given."""
    loss = cfg.loss or meta.get("kind", "lh")
    sampled_at = (meta.get("sampling") or {}).get("temperature")
    temperature = cfg.temperature if cfg.temperature is not None else float(sampled_at or 1.0)
    source = ("--temperature" if cfg.temperature is not None else
              "the training set's sampling temperature" if sampled_at else "the set records no sampling temperature")
    print0(f"log-probs at temperature {temperature:g} ({source})")
    return replace(cfg, loss=loss, temperature=temperature)


def load_training_data(cfg: TrainConfig) -> tuple[dict, Any]:
    """The training set as tensors (plus meta/stats) and the model's tokenizer, cross-checked."""
    path = Path(cfg.data)
    data = attach_response_offsets(load_trainset(path))
    tokenizer = load_tokenizer(cfg.model)
    expected, actual = data["meta"].get("tokenizer_fingerprint"), tokenizer_fingerprint(tokenizer)
    if expected and expected != actual:
        raise ValueError(f"{path / 'meta.json'}: field tokenizer_fingerprint={expected} was built with another "
                         f"tokenizer than {cfg.model}'s ({actual}); rebuild the training set for this model")
    if "pair_index" in data:
        pairs: dict[int, list[int]] = {}
        for i, p in enumerate(data["pair_index"].tolist()):
            pairs.setdefault(p, []).append(i)
        data["pairs"] = [v for _, v in sorted(pairs.items())]
    return data, tokenizer


def check_inputs(cfg: TrainConfig, data: dict, world_size: int, source: str = "") -> None:
    """What the flags alone cannot say about a training set (the first, or a round's): the model is a
    causal LM whose vocabulary holds the set's tokens, a DPO run has pairs, the set fills one global
    batch, the batch divides over the ranks."""
    source = source or cfg.data
    if cfg.micro_batch_tokens:  # every sequence (a DPO pair: both) must fit the budget
        check_budget(sequence_lengths(data).tolist(), cfg.micro_batch_tokens, source=source, pairs=data.get("pairs"))
        check_packed_batch(cfg.global_batch_size, world_size, 2 if cfg.loss == "dpo" else 1)
    else:
        check_batch_sizes(cfg.global_batch_size, cfg.micro_batch_size, world_size, 2 if cfg.loss == "dpo" else 1)
    if cfg.loss == "dpo" and "pairs" not in data:
        raise ValueError(f"{source}: --loss dpo needs a preference-pair training set (pruner/dataset.py --kind dpo)")
    config = AutoConfig.from_pretrained(cfg.model)
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs):
        raise ValueError(f"{cfg.model}: architectures {archs} have no LM head; the trainer needs a causal LM")
    vocab = getattr(config, "vocab_size", None)
    top = int(data["input_ids"].max()) if data["input_ids"].numel() else 0
    if vocab is not None and top >= vocab:
        raise ValueError(f"{source}: token id {top} is outside {cfg.model}'s vocabulary of {vocab}")
    if len(data["prompt_lengths"]) < cfg.global_batch_size:
        raise ValueError(f"{source}: {len(data['prompt_lengths'])} samples are fewer than one global batch "
                         f"of {cfg.global_batch_size}; lower --global-batch-size")


def run_manifest(cfg: TrainConfig, tokenizer: Any) -> dict[str, Any]:
    """The trainer's manifest: resolved flags, the model and tokenizer, the training set's content."""
    data = Path(cfg.data)
    inputs = {**model_inputs(cfg.model, tokenizer), "data": file_digest(data / TENSORS),
              "data_manifest": manifest_digest(data / "manifest.json")}
    return build_manifest("train", asdict(cfg), inputs, volatile=VOLATILE)


def claim_run_folder(cfg: TrainConfig, tokenizer: Any, d: Dist) -> OutputLock | None:
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


def main(argv: list[str] | None = None) -> None:
    try:
        train(parse_config(TrainConfig, argv))
    finally:
        release_all()  # also when train() raised: its frame (and lock) may outlive the exception


if __name__ == "__main__":
    main()
