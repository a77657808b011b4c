"""One training step of this trainer against the paper code's recipe, at the same batch.

ours : the trainer's own step (pruner.step.train_step, as pruner/train.py calls it) on the trainer's
       FSDP2 policy: one model; the old log-probs (here the reference model's) precomputed once
       (the sampled data is fixed, so they never change); token log-probs from the fused kernel
       (no [N, V] logits); the fused clipped-ratio loss.
paper: the policy AND a second reference model forwarded every step; full fp32 logits,
       log_softmax + gather; the same loss in plain PyTorch.

Each recipe runs in its own process (`--recipe`), so peak memory is that recipe's alone. Run
`python bench/train_step.py` (it launches both and writes a JSON + Markdown comparison), or under
`torchrun --nproc_per_node 1` on a GPU to include FSDP2 as the trainer uses it.

`--compare packing`: the trainer's step with padded micro-batches (`--micro-batch-size`, length-bucketed)
against packed rows (`--micro-batch-tokens`) at the same global batch, over the same global steps, on
`--lengths demo` (a training set folder, default the demo's, on its model) or `--lengths lognormal` (a
long-tail synthetic set on `--preset`; `cpu-deep` weighs its LM head per token as Qwen2.5-0.5B/1.5B do,
`cpu-small`'s head dominates its step): tokens/s, the fraction of computed positions that are padding,
peak memory and micro-batches per step.
"""
from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `python bench/train_step.py` from a checkout: `bench.*` and `pruner`

import torch  # noqa: E402

from pruner.cli import parse_config, to_argv  # noqa: E402
from pruner.presets import ARCHITECTURES  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
Preset = Literal[tuple(sorted(ARCHITECTURES))]


@dataclass
class StepBenchConfig:
    """One trainer step (pruner.step.train_step) against the paper code's recipe, at the same batch."""

    preset: Preset = field(default="cpu-small", metadata={"help": "architecture preset (random weights, pruner/presets.py)"})
    batch: int = field(default=4, metadata={"help": "sequences per step"})
    seq: int = field(default=512, metadata={"help": "tokens per sequence (a quarter prompt)"})
    steps: int = field(default=3, metadata={"help": "timed steps (the median is reported)"})
    warmup: int = field(default=1, metadata={"help": "untimed steps first"})
    device: Literal["auto", "cuda", "cpu"] = field(default="auto", metadata={"help": "'auto' (cuda when available), 'cuda' or 'cpu'"})
    activation_checkpointing: bool = field(default=False, metadata={"help": "recompute decoder blocks in backward"})
    recipe: Literal["", "ours", "paper", "padded", "packed"] = field(default="", metadata={"help": "run one recipe in this process (internal); empty = launch both"})
    compare: Literal["paper", "packing"] = field(default="paper", metadata={"help": "'paper': ours against the paper's recipe; 'packing': padded against packed micro-batches"})
    lengths: Literal["lognormal", "demo"] = field(default="lognormal", metadata={"help": "--compare packing: 'lognormal' (synthetic long tail on --preset) or 'demo' (the set in --data on --model)"})
    data: str = field(default="runs/demo/trainset", metadata={"help": "--lengths demo: a training set folder (pruner/dataset.py)"})
    model: str = field(default="", metadata={"help": "--lengths demo: its model folder; empty = the embedded default"})
    global_batch: int = field(default=32, metadata={"help": "--compare packing: sequences per step"})
    micro_batch_size: int = field(default=8, metadata={"help": "--compare packing: sequences per padded micro-batch (the trainer's default)"})
    micro_batch_tokens: int = field(default=2048, metadata={"help": "--compare packing: the packed budget"})
    median_tokens: int = field(default=192, metadata={"help": "--lengths lognormal: median sequence length"})
    max_tokens: int = field(default=2048, metadata={"help": "--lengths lognormal: the tail's cut-off"})
    packed_path: str = field(default="", metadata={"help": "pin the packed attention (pruner.packed_attention.PATHS); empty = by device"})
    torchrun: bool = field(default=False, metadata={"help": "launch each recipe under torchrun (FSDP2, 1 process)"})
    out: str = field(default="runs/bench/train_step", metadata={"help": "folder for the JSON + Markdown comparison"})


def build_model(preset: str, device: torch.device):
    """A random-weight model of a real architecture (pruner/presets.py); nothing is downloaded."""
    from transformers import AutoModelForCausalLM

    from pruner.presets import config_for

    config = config_for(preset)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def make_data(vocab: int, sequences: int, seq: int) -> dict:
    """An in-memory training set in pruner/dataset.py's tensor layout: a quarter prompt, the rest response."""
    from pruner.old_logps import attach_response_offsets

    g = torch.Generator().manual_seed(1)
    prompt = seq // 4
    return attach_response_offsets({
        "input_ids": torch.randint(0, vocab, (sequences * seq,), generator=g),
        "offsets": torch.arange(sequences + 1) * seq,
        "prompt_lengths": torch.full((sequences,), prompt), "response_lengths": torch.full((sequences,), seq - prompt),
        "advantages": torch.randn(sequences, generator=g)})


def _peak(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def ours_step(args, d) -> tuple[callable, int]:
    """The trainer's own step (pruner.step.train_step) on the trainer's own FSDP2 policy."""
    from pruner.modeling import TokenLogprobs, shard_policy
    from pruner.old_logps import compute_response_logprobs
    from pruner.step import LossSpec, train_step

    lm = build_model(args.preset, d.device)
    n_params = sum(p.numel() for p in lm.parameters())
    if args.activation_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = shard_policy(TokenLogprobs(lm), d, mixed_precision=True)
    data = make_data(lm.config.vocab_size, args.batch * d.world_size, args.seq)
    # The old log-probs: precomputed once before training (the sampled data is fixed, so they never change)
    # by the trainer's own function, not part of a step.
    old = compute_response_logprobs(policy, data, d, micro_batch=args.batch, pad_id=0, show_progress=False)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    step_plan = [[list(range(r * args.batch, (r + 1) * args.batch))] for r in range(d.world_size)]

    def step() -> float:
        return train_step(policy, opt, data, step_plan, spec=LossSpec("lh"), d=d, pad_id=0, old_logps_flat=old,
                          max_grad_norm=10.0).loss
    return step, n_params


def paper_step(args, d) -> tuple[callable, int]:
    """The paper code's recipe: policy AND reference model forwarded every step, full fp32 logits."""
    lm, ref_lm = build_model(args.preset, d.device), build_model(args.preset, d.device)
    n_params = sum(p.numel() for p in lm.parameters())
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if d.device.type == "cuda" else torch.autocast("cpu", enabled=False)
    if d.enabled:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if d.device.type == "cuda" else None
        for model in (lm, ref_lm):
            for block in model.model.layers:
                fully_shard(block, **({"mp_policy": mp} if mp else {}))
            fully_shard(model, **({"mp_policy": mp} if mp else {}))
        autocast = torch.autocast(d.device.type, enabled=False)
    if args.activation_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-6)
    data = make_data(lm.config.vocab_size, args.batch, args.seq)
    ids = data["input_ids"].view(args.batch, args.seq).to(d.device)
    labels = ids.roll(-1, dims=1)
    labels[:, : args.seq // 4 - 1] = -100   # the prompt
    labels[:, -1] = -100
    mask, attn, adv = labels != -100, torch.ones_like(ids), data["advantages"].to(d.device)

    def logps_of(model, grad: bool):
        with torch.set_grad_enabled(grad), autocast:
            logits = model(input_ids=ids, attention_mask=attn).logits.float()
        return torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask

    def step() -> float:
        ref, logps = logps_of(ref_lm, grad=False), logps_of(lm, grad=True)
        ratio = torch.exp((logps - ref).sum(1) / mask.sum(1).clamp(min=1))
        loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 10.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())
    return step, n_params


def lognormal_data(vocab: int, sequences: int, median: int, cap: int, seed: int = 1) -> dict:
    """Long-thought-like lengths (log-normal, sigma 1: median `median`, tail to `cap`); prompts of 1/8."""
    from pruner.old_logps import attach_response_offsets

    g = torch.Generator().manual_seed(seed)
    lengths = (torch.randn(sequences, generator=g) + math.log(median)).exp().round().long().clamp(16, cap)
    offsets = torch.zeros(sequences + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(lengths, 0)
    prompts = (lengths // 8).clamp(min=1)
    return attach_response_offsets({"input_ids": torch.randint(0, vocab, (int(offsets[-1]),), generator=g),
                                    "offsets": offsets, "prompt_lengths": prompts, "response_lengths": lengths - prompts,
                                    "advantages": torch.randn(sequences, generator=g)})


def packing_setup(args, d) -> tuple[torch.nn.Module, dict, int]:
    """The policy (the trainer's, without FSDP on one process) and the data of a packing comparison."""
    from transformers import AutoModelForCausalLM

    from pruner import packed_attention
    from pruner.modeling import TokenLogprobs, shard_policy

    if args.lengths == "demo":
        from pruner.embedded import default_model_path
        from pruner.old_logps import attach_response_offsets
        from pruner.trainset import load_trainset

        lm = AutoModelForCausalLM.from_pretrained(args.model or str(default_model_path())).to(d.device)
        data = attach_response_offsets(load_trainset(Path(args.data)))
    else:
        lm = build_model(args.preset, d.device)
        data = lognormal_data(lm.config.vocab_size, 8 * args.global_batch, args.median_tokens, args.max_tokens)
    packed_attention.enable(lm)
    packed_attention.set_path(args.packed_path or None)
    return shard_policy(TokenLogprobs(lm), d), data, sum(p.numel() for p in lm.parameters())


def packing_recipe(args, d) -> dict:
    """Time the trainer's step over the same global steps, padded or packed; tokens are real tokens."""
    from pruner import packed_attention
    from pruner.batching import plan_epoch, sequence_lengths
    from pruner.old_logps import compute_response_logprobs
    from pruner.packing import plan_packed_epoch
    from pruner.step import LossSpec, train_step

    policy, data, n_params = packing_setup(args, d)
    lengths = sequence_lengths(data).tolist()
    packed = args.recipe == "packed"
    common = dict(global_batch=args.global_batch, world_size=1, seed=0, epoch=0)
    plan = (plan_packed_epoch(lengths, micro_batch_tokens=args.micro_batch_tokens, **common) if packed
            else plan_epoch(lengths, micro_batch=args.micro_batch_size, **common))
    plan = plan[:args.warmup + args.steps]
    old = compute_response_logprobs(policy, data, d, micro_batch=args.micro_batch_size, pad_id=0, show_progress=False)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    seconds, tokens, computed, micros = 0.0, 0, 0, 0
    for i, step_plan in enumerate(plan):
        t = time.perf_counter()
        train_step(policy, opt, data, step_plan, spec=LossSpec("lh"), d=d, pad_id=0, old_logps_flat=old,
                   max_grad_norm=10.0, packed=packed)
        if d.device.type == "cuda":
            torch.cuda.synchronize()
        if i < args.warmup:
            continue
        seconds += time.perf_counter() - t
        batches = [m for m in step_plan[0] if m]
        tokens += sum(lengths[j] for m in batches for j in m)
        computed += sum(sum(lengths[j] for j in m) if packed else len(m) * max(lengths[j] for j in m) for m in batches)
        micros += len(step_plan[0])
    return {"recipe": args.recipe, "lengths": args.lengths, "params": n_params, "tokens_per_s": tokens / seconds,
            "step_time_s": seconds / args.steps, "padding_fraction": 1 - tokens / computed,
            "micro_batches_per_step": micros / args.steps, "tokens_per_step": tokens / args.steps,
            "longest": max(lengths), "peak_memory_gib": _peak(d.device),
            "attention": packed_attention.select_path(d.device) if packed else "transformers sdpa (padding mask)"}


def run_recipe(args) -> dict:
    from pruner import distributed

    d = distributed.init(args.device)
    device = torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else platform.processor() or "cpu"
    if args.recipe in ("padded", "packed"):
        result = {**packing_recipe(args, d), "device": device}
        distributed.shutdown()
        return result
    step, n_params = (ours_step if args.recipe == "ours" else paper_step)(args, d)
    times = []
    for i in range(args.warmup + args.steps):
        if d.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if d.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    tokens = args.batch * args.seq
    median = statistics.median(times)
    result = {"recipe": args.recipe, "preset": args.preset, "device": device, "batch": args.batch, "seq": args.seq,
              "params": n_params, "step_time_s": median, "tokens_per_s": tokens / median,
              "peak_memory_gib": _peak(d.device), "fsdp": d.enabled}
    if d.device.type == "cuda":
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in result["device"]), None)
        useful = 6 * n_params * tokens / median / 1e12  # the model FLOPs a step must do, not the recipe's extra
        result["model_tflops"] = useful
        result["mfu"] = useful / peak if peak else None
    distributed.shutdown()
    return result


def launch(args, recipe: str) -> dict:
    """One recipe in a fresh process (its peak memory is its own); its RESULT line."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] \
        if args.torchrun else [sys.executable]
    cmd = launcher + [__file__, *to_argv(StepBenchConfig(**{**vars(args), "recipe": recipe, "torchrun": False}))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), str(ROOT / "kernels"), os.environ.get("PYTHONPATH", "")])})
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        sys.exit(f"{recipe} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


def packing_report(args, results: list[dict]) -> tuple[dict, list[str]]:
    padded, packed = results
    summary = {"runs": results, "speedup": packed["tokens_per_s"] / padded["tokens_per_s"],
               "peak_memory_ratio": packed["peak_memory_gib"] / padded["peak_memory_gib"]}
    lines = ["| micro-batches | tokens/s | padding | peak memory (GiB) | micro-batches/step | attention |",
             "|---|---:|---:|---:|---:|---|"]
    lines += [f"| {r['recipe']} | {r['tokens_per_s']:.0f} | {r['padding_fraction']:.1%} | {r['peak_memory_gib']:.2f} "
              f"| {r['micro_batches_per_step']:.1f} | {r['attention']} |" for r in results]
    what = (f"{args.data} on {args.model or 'the embedded model'}" if args.lengths == "demo" else
            f"log-normal lengths, median {args.median_tokens}, cap {args.max_tokens}, {args.preset}")
    lines.append(f"\npacked is {summary['speedup']:.2f}x the padded tokens/s at {summary['peak_memory_ratio']:.2f}x its "
                 f"peak memory ({what}; global batch {args.global_batch}, padded {args.micro_batch_size} sequences, "
                 f"packed {args.micro_batch_tokens} tokens per micro-batch; longest {padded['longest']}; "
                 f"{results[0]['device']})")
    return summary, lines


def paper_report(args, results: list[dict]) -> tuple[dict, list[str]]:
    ours, paper = results
    summary = {"runs": results, "speedup": paper["step_time_s"] / ours["step_time_s"],
               "peak_memory_ratio": ours["peak_memory_gib"] / paper["peak_memory_gib"]}
    lines = ["| recipe | step time (s) | tokens/s | peak memory (GiB) |", "|---|---|---|---|"]
    lines += [f"| {r['recipe']} | {r['step_time_s']:.3f} | {r['tokens_per_s']:.0f} | {r['peak_memory_gib']:.2f} |"
              for r in results]
    lines.append(f"\nours is {summary['speedup']:.2f}x faster per step at "
                 f"{summary['peak_memory_ratio']:.2f}x the paper recipe's peak memory "
                 f"({args.preset}, batch {args.batch} x {args.seq} tokens, {results[0]['device']})")
    return summary, lines


def main(argv: list[str] | None = None) -> None:
    args = parse_config(StepBenchConfig, argv, prog="python bench/train_step.py")
    if args.recipe:
        print("RESULT " + json.dumps(run_recipe(args)), flush=True)
        return
    packing = args.compare == "packing"
    results = [launch(args, recipe) for recipe in (("padded", "packed") if packing else ("ours", "paper"))]
    summary, lines = (packing_report if packing else paper_report)(args, results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"packing_{args.lengths}" if packing else f"train_step_{args.preset}"
    tag = f"{name}_{'cuda' if torch.cuda.is_available() else 'cpu'}"
    (out / f"{tag}.json").write_text(json.dumps(summary, indent=2))
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
