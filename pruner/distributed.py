"""Process-group set-up and the ONLY place that calls torch.distributed collectives.

`python pruner/train.py` (no torchrun) runs as a world of one: on the CPU without a process group,
on a GPU in a process group of one (NCCL), so FSDP2 and its bf16 MixedPrecisionPolicy apply there
too. The same loop serves a laptop, `torchrun --nproc_per_node 2` on a CPU (gloo) and a GPU cluster.

Every collective goes through a helper here, because the backends disagree on where a tensor may
live: NCCL takes only CUDA tensors ("No backend type associated with device type cpu"), gloo
takes CPU tensors. A helper moves its input to the group's device, runs the collective there
and hands back a NEW tensor on the caller's device and dtype, so no call site can get it wrong
(tests/test_distributed.py scans the package for direct calls).
"""
from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return initialized()


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init(device: str = "auto") -> Dist:
    """Initialise torch.distributed from torchrun's environment (or a single process without it)."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local_rank)  # before any CUDA work: NCCL binds a communicator per device
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)
    if "RANK" in os.environ and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        # gloo is slow to start on busy CPUs; a generous timeout keeps the first collective alive.
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30),
                                device_id=dev if dev.type == "cuda" else None)
    elif wants_world_of_one(dev, os.environ) and not dist.is_initialized():
        start_world_of_one(dev)
    return Dist(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def wants_world_of_one(device: torch.device, env: Mapping[str, str]) -> bool:
    """A CUDA process started without torchrun: without a group there is no FSDP2 and no bf16 policy,
    so one GPU would train in fp32 (twice the activations, no bf16 tensor cores)."""
    return device.type == "cuda" and "RANK" not in env


def start_world_of_one(device: torch.device) -> None:
    """A process group of this process alone (NCCL on a GPU, gloo on the CPU), through an in-memory
    store: no port, no MASTER_ADDR, nothing another process could join by accident."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                            device_id=device if device.type == "cuda" else None)


def device_for_backend(backend: str, tensor_device: torch.device | None = None) -> torch.device:
    """Where a collective of `backend` needs its tensors: CUDA for NCCL, the CPU for gloo/fake.

    A mixed backend ("cpu:gloo,cuda:nccl") takes either, so the tensor stays where it is.
    """
    names = backend.lower()
    if "nccl" in names:
        if "cpu:" in names and tensor_device is not None:
            return tensor_device
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
        return torch.device("cuda", index)
    return torch.device("cpu")


def group_device(tensor_device: torch.device | None = None) -> torch.device:
    """The device the default process group's collectives run on."""
    return device_for_backend(str(dist.get_backend()), tensor_device)


def _on_group(tensor: torch.Tensor) -> torch.Tensor:
    """A private copy of `tensor` on the group's device (never the caller's storage)."""
    target = group_device(tensor.device)
    if tensor.dtype == torch.bool:  # NCCL has no bool reductions; uint8 sums/maxes are the same here
        return tensor.detach().to(target, torch.uint8, copy=True)
    return tensor.detach().to(target, copy=True)


def _collective(tensor: torch.Tensor, run: Callable[[torch.Tensor], object]) -> torch.Tensor:
    """`run` (an in-place collective) on a private copy of `tensor` on the group's device; the result
    as a new tensor on the caller's device and dtype (a copy in a world of one)."""
    if not initialized():
        return tensor.clone()
    work = _on_group(tensor)
    run(work)
    return work.to(tensor.device, tensor.dtype)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, as a new tensor on the caller's device and dtype (a copy in a world of one)."""
    return _collective(tensor, lambda work: dist.all_reduce(work, op=dist.ReduceOp.SUM))


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise max over ranks, as a new tensor on the caller's device and dtype."""
    return _collective(tensor, lambda work: dist.all_reduce(work, op=dist.ReduceOp.MAX))


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank `src`'s values, as a new tensor on the caller's device and dtype."""
    return _collective(tensor, lambda work: dist.broadcast(work, src=src))


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> int:
    """Overwrite every buffer of `module` with rank `src`'s (non-persistent buffers such as rotary
    frequencies are not in the state dict that meta-device init broadcasts). Returns the count."""
    count = 0
    for buf in module.buffers():
        buf.data.copy_(broadcast(buf.data, src=src))
        count += 1
    return count


def broadcast_object(obj: object, src: int = 0) -> object:
    """A picklable object from rank `src` (NCCL moves it through the current CUDA device)."""
    if not initialized():
        return obj
    box = [obj]
    device = group_device()
    dist.broadcast_object_list(box, src=src, device=device if device.type == "cuda" else None)
    return box[0]


def all_gather_object(obj: object) -> list:
    """Every rank's picklable `obj`, in rank order (`[obj]` in a world of one)."""
    if not initialized():
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def decided_by_main(decide: Callable[[], T]) -> T:
    """`decide()` run on rank 0 only, its result (or its exception) handed to every rank.

    For every choice made by looking at the filesystem (is a cache there, which checkpoint is the
    latest): without a shared filesystem, or with NFS lag, ranks looking on their own would see
    different things, take different paths and then wait forever in collectives the others never
    call. Every rank must call this at the same point."""
    result, error = None, None
    if not initialized() or dist.get_rank() == 0:
        try:
            result = decide()
        except Exception as exc:  # handed over and raised on every rank alike
            error = exc
    result, error = broadcast_object((result, error))  # type: ignore[misc]
    if error is not None:
        raise error
    return result  # type: ignore[return-value]


def raise_together(error: BaseException | None) -> None:
    """Raise on every rank when any rank has an error; return on every rank when none has.

    Every rank calls this at the same point with its own outcome, so a rank that found a problem
    (a NaN, a file it cannot read) never raises alone while the others wait in the next collective
    until the timeout. The error raised names each failing rank, with the first one's type."""
    if not initialized():
        if error is not None:
            raise error
        return
    failures = [(rank, e) for rank, e in enumerate(all_gather_object(error)) if e is not None]
    if not failures:
        return
    first = failures[0][1]
    message = "; ".join(f"rank {rank}: {e}" for rank, e in failures)
    try:
        combined = type(first)(message)
    except Exception:  # an exception type that takes other arguments
        combined = RuntimeError(f"{type(first).__name__}: {message}")
    raise combined from (error if error is not None else None)


def barrier() -> None:
    if initialized():
        if group_device().type == "cuda":  # without device_ids NCCL guesses a device and warns
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def shutdown() -> None:
    if initialized():
        barrier()
        dist.destroy_process_group()


def decoder_blocks(lm: torch.nn.Module) -> list[torch.nn.Module]:
    """The units FSDP2 shards one by one (the trainer and the memory planner agree on them): the
    blocks a Hugging Face model declares unsplittable, else its decoder's layer list."""
    names = set(getattr(lm, "_no_split_modules", None) or [])
    blocks = [m for m in lm.modules() if type(m).__name__ in names]
    if not blocks:  # architectures that do not declare their blocks: the body's layer list
        layers = getattr(lm.get_decoder(), "layers", None)
        blocks = list(layers) if layers is not None else []
    return blocks


def print0(*args: object, **kwargs: object) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)  # type: ignore[call-overload]


def compute_dtype(d: Dist, mixed_precision: bool) -> torch.dtype:
    """The dtype the policy computes in: bf16 under the trainer's MixedPrecisionPolicy (FSDP2 on CUDA with
    mixed precision, pruner.modeling.shard_policy), else the weights' fp32."""
    return torch.bfloat16 if d.enabled and d.device.type == "cuda" and mixed_precision else torch.float32
