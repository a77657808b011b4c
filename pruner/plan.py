"""Will this run fit? Per-rank memory of an FSDP2 run, built from the real model, before any weights load.

`python -m pruner.plan --arch qwen2.5-32b --gpus 8 --gpu-memory-gib 80 --micro-batch-tokens 16384
[--activation-checkpointing] [--json]` (or `--model <HF folder>`).

By construction: the transformers model is built on the meta device and sharded with FSDP2's
`fully_shard` (every decoder block, then the root, as pruner/modeling.py does) over torch's fake
process group of the requested world size; each rank's bytes are read off the sharded
parameters. Under an existing process group (the trainer's start-up check) the same numbers come
from FSDP2's dim-0 chunking rule, which tests/test_plan.py checks against the fake-group build.

Per rank (bytes), with e = bytes of the compute dtype (2 under the bf16 MixedPrecisionPolicy):
  params     4 x local shard (fp32 master weights, FSDP2 pads dim 0 to ceil(rows / world))
  grads      4 x local shard (fp32 sharded gradients)
  optimizer  8 x local shard (AdamW exp_avg + exp_avg_sq, fp32)
  fsdp_unsharded  (e + 4) x root group (embedding + head + final norm: its compute copy, held for
             the whole step, and its unsharded fp32 gradient until the root's reduce-scatter)
             + 2 e x largest block (the all-gathered block and the prefetched next one)
             + 4 x largest block (its unsharded fp32 gradient before the reduce-scatter)
  activations  per token: L x layer + outside-layers + backward transients, where, measured with
             saved_tensors_hooks on transformers' Qwen2 decoder (sdpa) at bf16 and fp32:
               layer          = e (6h + 4i + 2 kv_dim) + 8h + 4 heads   (8h: RMSNorm's fp32 upcasts)
               layer, ckpt    = e h (only the block input is kept)
               outside layers = (e + 4) h + 2 e head_dim (embedding, final norm, rotary cos/sin)
               backward       = e (4h + 2i), plus one recomputed layer under checkpointing
  head_workspace  the fused log-prob head: on CUDA (Triton) a dz chunk of <= 1 GiB, d_hidden
             N x h x e and an fp32 d_weight (+ 64 MiB of fp32 partial products when chunked); on the CPU (PyTorch chunks) 3 x <= 32 MiB
             logits chunks, fp32 weight and d_weight copies and an fp32 d_hidden. It replaces the
             N x V fp32 logits (`logits_avoided`) that log_softmax + gather would hold.
  padded_attention  (ESTIMATE, upper side) a padded micro-batch of B > 1 sequences of T tokens: the
             [B, 1, T, T] mask transformers builds (about B T^2 2 bytes per layer kept for backward,
             2 layers' worth under checkpointing) and the K/V heads SDPA repeats when a mask drops its
             GQA path, e (heads x head_dim - kv_dim) 2 per token and layer. 0 for B = 1: the trainer
             passes no mask when a micro-batch has no padding.
  optimizer_step  foreach AdamW's temporaries at `optimizer.step` (torch's _multi_tensor_adam takes
             the sqrt of exp_avg_sq of the whole shard at once: 4 x local shard), counted where they
             exceed the backward's transients (activations, workspace, unsharded buffers are freed then)
  cuda_context_nccl  (ESTIMATE) 1 GiB CUDA context (cuBLAS workspaces, loaded kernels) + 1 GiB NCCL
             buffers with more than one GPU; CUDA only, outside torch.cuda.max_memory_allocated
  fragmentation  (ESTIMATE) 10% of what goes through the caching allocator, CUDA only
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

if __package__ in (None, ""):  # `python pruner/plan.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from pruner.batching import sequence_lengths
from pruner.cli import parse_config
from pruner.distributed import compute_dtype as trainer_dtype, decoder_blocks, print0
from pruner.presets import ARCHITECTURES, config_for

GIB = 2**30
COMPONENTS = ("params", "grads", "optimizer", "fsdp_unsharded", "activations", "head_workspace",
              "padded_attention", "optimizer_step", "cuda_context_nccl", "fragmentation")
ESTIMATES = ("padded_attention", "cuda_context_nccl", "fragmentation")  # not derived from the model's tensors
CUDA_CONTEXT_BYTES = 1 << 30   # estimate: context + cuBLAS workspaces + loaded kernels on an H100
NCCL_BYTES = 1 << 30           # estimate: NCCL's channel buffers and communicator state, > 1 GPU
FRAGMENTATION = 0.10           # estimate: headroom over what the caching allocator hands out
MASK_ELEM = 2                  # bytes per element of transformers' [B, 1, T, T] mask, as issue 21 measured it
CPU_CHUNK_BYTES = 32 * 2**20   # o1pruner_kernels.fused_linear.DEFAULT_CHUNK_BYTES
TRITON_DZ_BYTES = 1 << 30      # the Triton backward's dz chunk budget (bwd_chunk_bytes)
TRITON_DW_SLICE_BYTES = 64 * 2**20  # o1pruner_kernels._fused_linear_triton.DW_SLICE_BYTES


@dataclass
class ShardLayout:
    """Parameter shapes of the model, grouped as FSDP2 groups them (root, then one group per block)."""

    param_count: int
    root_shapes: list[tuple[int, ...]]
    block_shapes: list[list[tuple[int, ...]]]

    def local_numel(self, world_size: int) -> int:
        shapes = self.root_shapes + [s for block in self.block_shapes for s in block]
        return sum(_shard_numel(s, world_size) for s in shapes)


def _shard_numel(shape: tuple[int, ...], world_size: int) -> int:
    """Elements one rank stores for a parameter: FSDP2 chunks dim 0, padded to ceil(rows / world)."""
    if not shape:
        return 1
    return math.ceil(shape[0] / world_size) * math.prod(shape[1:])


def load_config(arch: str = "", model: str = ""):
    from transformers import AutoConfig

    if bool(arch) == bool(model):
        raise ValueError("give exactly one of --arch (a preset) or --model (a Hugging Face folder)")
    return config_for(arch) if arch else AutoConfig.from_pretrained(model)


def _meta_model(config) -> torch.nn.Module:
    """The real transformers model of `config` on the meta device: shapes only, no memory, no weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def model_layout(config) -> ShardLayout:
    """Build the model on the meta device and group its parameters like FSDP2."""
    lm = _meta_model(config)
    blocks = decoder_blocks(lm)
    in_block = {id(p) for b in blocks for p in b.parameters()}
    root = [tuple(p.shape) for p in lm.parameters() if id(p) not in in_block]  # parameters() dedups tied
    return ShardLayout(param_count=sum(p.numel() for p in lm.parameters()), root_shapes=root,
                       block_shapes=[[tuple(p.shape) for p in b.parameters()] for b in blocks])


def fsdp_local_numel(config, world_size: int, layout: ShardLayout | None = None) -> int:
    """Rank 0's parameter elements after `fully_shard` over a fake process group of `world_size`."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():  # the trainer's own group: FSDP2's chunking rule gives the same count
        return (layout or model_layout(config)).local_numel(world_size)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        lm = _meta_model(config)
        for block in decoder_blocks(lm):
            fully_shard(block, mesh=mesh)
        fully_shard(lm, mesh=mesh)
        return sum(p.to_local().numel() for p in lm.parameters())
    finally:
        dist.destroy_process_group()


def _dims(config) -> tuple[int, int, int, int, int, int]:
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv_dim = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    return h, i, layers, heads, head_dim, kv_dim


def saved_activation_bytes(config, tokens: int, *, elem: int, checkpointing: bool) -> int:
    """What autograd keeps for backward after the forward of `tokens` tokens (the calibrated formula)."""
    h, i, layers, heads, head_dim, kv_dim = _dims(config)
    layer = elem * (6 * h + 4 * i + 2 * kv_dim) + 8 * h + 4 * heads
    outside = (elem + 4) * h + 2 * elem * head_dim
    return tokens * ((layers * elem * h if checkpointing else layers * layer) + outside)


def activation_bytes(config, tokens: int, *, elem: int, checkpointing: bool) -> int:
    """Peak activation memory of one micro-batch: saved tensors + backward transients (module docstring)."""
    h, i, *_ = _dims(config)
    recomputed = saved_activation_bytes(config, tokens, elem=elem, checkpointing=False) // config.num_hidden_layers
    backward = tokens * elem * (4 * h + 2 * i) + (recomputed if checkpointing else 0)
    return saved_activation_bytes(config, tokens, elem=elem, checkpointing=checkpointing) + backward


def head_workspace_bytes(config, tokens: int, *, elem: int, device: str) -> int:
    h, vocab = config.hidden_size, config.vocab_size
    per_token_out = 3 * 4 * tokens  # log-prob, log-sum-exp, entropy (fp32)
    if device == "cuda":
        chunk = max(1, min(tokens, TRITON_DZ_BYTES // (vocab * elem)))
        # fp32 accumulator + its sliced fp32 partial products (_fused_linear_triton.DW_SLICE_BYTES)
        dw = (4 * vocab * h + TRITON_DW_SLICE_BYTES) if tokens > chunk else 0
        return chunk * vocab * elem + tokens * h * elem + dw + per_token_out
    weight_copies = 4 * vocab * h * (2 if elem != 4 else 1)  # fp32 weight (a copy below fp32) + fp32 d_weight
    chunk_rows = max(1, min(tokens, CPU_CHUNK_BYTES // (4 * vocab)))  # fused_linear._chunk_rows
    return 3 * 4 * chunk_rows * vocab + weight_copies + 4 * tokens * h + per_token_out


def padded_attention_bytes(config, tokens: int, sequences: int, *, elem: int, checkpointing: bool) -> int:
    """Estimate of what a padded micro-batch of `sequences` rows adds: the [B, 1, T, T] mask kept per
    layer for backward, and the K/V heads SDPA repeats once a mask takes its GQA path away."""
    if sequences <= 1:
        return 0
    _, _, layers, heads, head_dim, kv_dim = _dims(config)
    width = math.ceil(tokens / sequences)
    kept = 2 if checkpointing else layers  # the shared mask + the layer being recomputed
    mask = sequences * width * width * MASK_ELEM * kept
    repeated_kv = 2 * elem * (heads * head_dim - kv_dim) * sequences * width * kept
    return mask + repeated_kv


def overheads(per_rank: dict[str, int], local: int, *, gpus: int, device: str) -> dict[str, int]:
    """The AdamW step's temporaries beyond the backward's transients, the CUDA context and NCCL, and
    fragmentation headroom over everything the caching allocator holds (module docstring)."""
    transient = sum(per_rank[k] for k in ("fsdp_unsharded", "activations", "head_workspace", "padded_attention"))
    out = {"optimizer_step": max(0, 4 * local - transient), "cuda_context_nccl": 0, "fragmentation": 0}
    if device == "cuda":
        out["cuda_context_nccl"] = CUDA_CONTEXT_BYTES + (NCCL_BYTES if gpus > 1 else 0)
        out["fragmentation"] = math.ceil(FRAGMENTATION * (sum(per_rank.values()) + out["optimizer_step"]))
    return out


@dataclass
class MemoryPlan:
    name: str
    param_count: int
    gpus: int
    gpu_memory_gib: float
    micro_batch_tokens: int
    activation_checkpointing: bool
    compute_dtype: str
    device: str
    per_rank: dict[str, int]
    logits_avoided: int
    fits: bool
    suggestions: list[str] = field(default_factory=list)
    micro_batch_size: int = 1      # sequences per micro-batch: > 1 pads them to one width
    estimates: tuple[str, ...] = ESTIMATES


def estimate(config, *, gpus: int, gpu_memory_gib: float, micro_batch_tokens: int, activation_checkpointing: bool,
             compute_dtype: str = "bfloat16", device: str = "cuda", name: str = "",
             layout: ShardLayout | None = None, local_numel: int | None = None,
             micro_batch_size: int = 1) -> MemoryPlan:
    layout = layout or model_layout(config)
    local = local_numel if local_numel is not None else layout.local_numel(gpus)
    elem = torch.empty((), dtype=getattr(torch, compute_dtype)).element_size()
    root = sum(math.prod(s) for s in layout.root_shapes)
    block = max((sum(math.prod(s) for s in b) for b in layout.block_shapes), default=0)
    per_rank = {
        "params": 4 * local, "grads": 4 * local, "optimizer": 8 * local,
        # root group (embedding, head, final norm): its compute copy for the whole step and its
        # unsharded fp32 gradient from the head's backward until the root's reduce-scatter.
        "fsdp_unsharded": (elem + 4) * root + (2 * elem + 4) * block,
        "activations": activation_bytes(config, micro_batch_tokens, elem=elem, checkpointing=activation_checkpointing),
        "head_workspace": head_workspace_bytes(config, micro_batch_tokens, elem=elem, device=device),
        "padded_attention": padded_attention_bytes(config, micro_batch_tokens, micro_batch_size, elem=elem,
                                                   checkpointing=activation_checkpointing),
    }
    per_rank.update(overheads(per_rank, local, gpus=gpus, device=device))
    per_rank["total"] = sum(per_rank[k] for k in COMPONENTS)
    fits = per_rank["total"] <= gpu_memory_gib * GIB
    return MemoryPlan(name=name, param_count=layout.param_count, gpus=gpus, gpu_memory_gib=gpu_memory_gib,
                      micro_batch_tokens=micro_batch_tokens, activation_checkpointing=activation_checkpointing,
                      compute_dtype=compute_dtype, device=device, per_rank=per_rank,
                      logits_avoided=4 * micro_batch_tokens * config.vocab_size, fits=fits,
                      micro_batch_size=micro_batch_size)


def suggest(config, plan: MemoryPlan, layout: ShardLayout) -> list[str]:
    """The smallest single changes that make a plan fit: checkpointing, fewer tokens, more GPUs."""
    base = dict(gpu_memory_gib=plan.gpu_memory_gib, compute_dtype=plan.compute_dtype, device=plan.device,
                layout=layout, micro_batch_size=plan.micro_batch_size)
    args = dict(gpus=plan.gpus, micro_batch_tokens=plan.micro_batch_tokens,
                activation_checkpointing=plan.activation_checkpointing)
    found = []
    if not plan.activation_checkpointing:
        with_ckpt = estimate(config, **{**args, "activation_checkpointing": True}, **base)
        if with_ckpt.fits:
            found.append("add --activation-checkpointing")
        else:  # checkpointing is nearly free of memory cost to try first: what it still needs
            found += [f"add --activation-checkpointing and {s}" for s in suggest(config, with_ckpt, layout)
                      if not s.startswith("no single")]
    tokens = plan.micro_batch_tokens // 2
    while tokens >= 256 and not estimate(config, **{**args, "micro_batch_tokens": tokens}, **base).fits:
        tokens //= 2
    if tokens >= 256:
        found.append(f"lower the tokens per micro-batch to {tokens} (fewer or shorter sequences per micro-batch)")
    for gpus in range(plan.gpus + 1, 8 * max(plan.gpus, 8) + 1):
        if estimate(config, **{**args, "gpus": gpus}, **base).fits:
            found.append(f"use {gpus} GPUs (torchrun --nproc_per_node / more nodes)")
            break
    return found or ["no single change fits: combine --activation-checkpointing, more GPUs and shorter micro-batches"]


def plan_for(config, *, gpus: int, gpu_memory_gib: float, micro_batch_tokens: int, activation_checkpointing: bool,
             compute_dtype: str = "bfloat16", device: str = "cuda", name: str = "",
             micro_batch_size: int = 1) -> MemoryPlan:
    """Shard the meta model over a fake group of `gpus` ranks and estimate; suggestions if it does not fit."""
    layout = model_layout(config)
    plan = estimate(config, gpus=gpus, gpu_memory_gib=gpu_memory_gib, micro_batch_tokens=micro_batch_tokens,
                    activation_checkpointing=activation_checkpointing, compute_dtype=compute_dtype, device=device,
                    name=name, layout=layout, local_numel=fsdp_local_numel(config, gpus, layout),
                    micro_batch_size=micro_batch_size)
    if not plan.fits:
        plan.suggestions = suggest(config, plan, layout)
    return plan


def format_table(plan: MemoryPlan) -> str:
    labels = {"params": "params (fp32 shard)", "grads": "grads (fp32 shard)", "optimizer": "optimizer (AdamW fp32)",
              "fsdp_unsharded": "FSDP unsharded buffers", "activations": "activations",
              "head_workspace": "fused head workspace",
              "padded_attention": "padded [B,1,T,T] mask + repeated K/V (estimate)",
              "optimizer_step": "AdamW foreach temporaries at step()",
              "cuda_context_nccl": "CUDA context + NCCL (estimate)",
              "fragmentation": f"fragmentation headroom {FRAGMENTATION:.0%} (estimate)", "total": "total"}
    count = f"{plan.param_count / 1e9:.2f} B" if plan.param_count >= 1e8 else f"{plan.param_count / 1e6:.2f} M"
    lines = [f"memory plan: {plan.name} ({count} params) on {plan.gpus} x "
             f"{plan.gpu_memory_gib:g} GiB, {plan.micro_batch_tokens} tokens per micro-batch "
             f"({plan.micro_batch_size} sequence{'s' if plan.micro_batch_size > 1 else ''}), {plan.compute_dtype} "
             f"compute, activation checkpointing {'on' if plan.activation_checkpointing else 'off'}",
             "", "| per rank | GiB |", "|---|---:|"]
    lines += [f"| {labels[k]} | {v / GIB:.2f} |" for k, v in plan.per_rank.items()]
    lines.append(f"| GPU memory | {plan.gpu_memory_gib:.2f} |")
    lines.append(f"\nthe fused head avoids [{plan.micro_batch_tokens}, V] fp32 logits: {plan.logits_avoided / GIB:.2f} GiB "
                 f"(its workspace: {plan.per_rank['head_workspace'] / GIB:.2f} GiB)")
    if plan.fits:
        lines.append(f"verdict: fits ({plan.per_rank['total'] / GIB:.1f} of {plan.gpu_memory_gib:g} GiB per rank)")
    else:
        lines.append(f"verdict: does NOT fit ({plan.per_rank['total'] / GIB:.1f} > {plan.gpu_memory_gib:g} GiB per rank); "
                     f"smallest changes that fit: " + "; or ".join(plan.suggestions))
    return "\n".join(lines)


def refuse_if_too_big(plan: MemoryPlan, device_type: str, enforce: bool) -> None:
    """On CUDA a run that will not fit is stopped before any weight is read, naming the fix."""
    if plan.fits or device_type != "cuda" or not enforce:
        return
    raise MemoryError(f"this run needs about {plan.per_rank['total'] / GIB:.1f} GiB per GPU, more than the "
                      f"{plan.gpu_memory_gib:.1f} GiB each has ({plan.param_count / 1e9:.3f} B params on {plan.gpus} "
                      f"GPU(s), {plan.micro_batch_tokens} tokens per micro-batch). To fit: "
                      + "; or ".join(plan.suggestions) + ". (--no-plan-check runs it anyway.)")


def check_memory_plan(cfg, d, data: dict) -> MemoryPlan:
    """The trainer's start-up check: the same estimate as the CLI, before loading weights.

    Writes <out>/memory_plan.json (with the process's RSS so far, for plan-vs-measured comparisons)
    and raises MemoryError on CUDA when the plan does not fit, unless --no-plan-check.
    """
    import os
    import resource

    # Packed rows hold at most the budget; a padded micro-batch is as wide as its longest sequence.
    tokens = cfg.micro_batch_tokens or cfg.micro_batch_size * int(sequence_lengths(data).max())
    cuda = d.device.type == "cuda"
    memory = (torch.cuda.get_device_properties(d.device).total_memory if cuda
              else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / GIB
    bf16 = trainer_dtype(d, cfg.mixed_precision) == torch.bfloat16  # the MixedPrecisionPolicy: FSDP2 on CUDA only
    plan = plan_for(load_config(model=cfg.model), gpus=d.world_size, gpu_memory_gib=memory, micro_batch_tokens=tokens,
                    activation_checkpointing=cfg.activation_checkpointing,
                    compute_dtype="bfloat16" if bf16 else "float32", device=d.device.type, name=cfg.model,
                    micro_batch_size=1 if cfg.micro_batch_tokens else cfg.micro_batch_size)  # a packed row: no mask
    print0(f"memory plan: {plan.per_rank['total'] / GIB:.2f} GiB per rank of {memory:.1f} GiB "
           f"({'fits' if plan.fits else 'does NOT fit'}; python -m pruner.plan --model {cfg.model} for the table)")
    if d.is_main:
        record = {**asdict(plan), "rss_before_model_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        (Path(cfg.out) / "memory_plan.json").write_text(json.dumps(record, indent=2))
    refuse_if_too_big(plan, d.device.type, cfg.plan_check)
    return plan


ArchChoice = Literal[("", *sorted(ARCHITECTURES))]


@dataclass
class PlanConfig:
    """Per-GPU memory of an FSDP2 training run of this trainer, before anything is loaded."""

    arch: ArchChoice = field(default="", metadata={"help": "architecture preset"})
    model: str = field(default="", metadata={"help": "a Hugging Face model folder (instead of --arch)"})
    gpus: int = field(default=1, metadata={"help": "world size (processes, one GPU each)"})
    gpu_memory_gib: float = field(default=80.0, metadata={"help": "memory of one GPU"})
    micro_batch_tokens: int = field(default=16384, metadata={"help": "tokens in one micro-batch on one rank: the trainer's packed budget (its --micro-batch-tokens, which its own start-up check uses); for padded micro-batches, --micro-batch-size x the longest sequence"})
    micro_batch_size: int = field(default=1, metadata={"help": "sequences in that micro-batch, padded to one width (> 1 adds the padded [B,1,T,T] attention-mask estimate)"})
    activation_checkpointing: bool = field(default=False, metadata={"help": "recompute decoder blocks in backward"})
    compute_dtype: Literal["bfloat16", "float32"] = field(default="bfloat16", metadata={"help": "the trainer's compute dtype (bfloat16 = its default MixedPrecisionPolicy on CUDA)"})
    json: bool = field(default=False, metadata={"help": "print one JSON object instead of the table"})


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(PlanConfig, argv, prog="python -m pruner.plan")
    if min(cfg.gpus, cfg.micro_batch_tokens, cfg.micro_batch_size) < 1 or cfg.gpu_memory_gib <= 0:
        sys.exit("--gpus, --micro-batch-tokens, --micro-batch-size and --gpu-memory-gib must be positive")
    try:
        config = load_config(cfg.arch, cfg.model)
    except (ValueError, OSError) as err:
        sys.exit(str(err))
    plan = plan_for(config, gpus=cfg.gpus, gpu_memory_gib=cfg.gpu_memory_gib,
                    micro_batch_tokens=cfg.micro_batch_tokens, activation_checkpointing=cfg.activation_checkpointing,
                    compute_dtype=cfg.compute_dtype, name=cfg.arch or str(Path(cfg.model)),
                    micro_batch_size=cfg.micro_batch_size)
    print(json.dumps(asdict(plan)) if cfg.json else format_table(plan))


if __name__ == "__main__":
    main(sys.argv[1:])
