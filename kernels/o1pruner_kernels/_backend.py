"""Backend dispatch and argument checks shared by every op.

No kernels here; the op modules hold them and import Triton, a dependency of the package (the
CPU path needs no GPU, but it does need `triton` installed: the kernels are defined at import).
"""
from __future__ import annotations

import contextlib
import os

import torch

BACKENDS = ("auto", "triton", "torch")


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (tests on GPU-less machines)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Map "auto" to "triton" for CUDA tensors and "torch" otherwise; validate explicit choices.

    "triton" on CPU tensors is allowed only under TRITON_INTERPRET=1, which is how the kernels
    are tested without a GPU.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return "triton" if on_cuda else "torch"
    if backend == "triton" and not on_cuda and not interpreting():
        raise RuntimeError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1)")
    return backend


def check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not temperature > 0.0:  # also rejects NaN
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return temperature


def check_labels(labels: torch.Tensor, lead_shape: torch.Size, what: str) -> None:
    if labels.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != lead_shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal {what} {tuple(lead_shape)}")


def check_label_range(labels: torch.Tensor, valid: torch.Tensor, vocab: int) -> None:
    """Out-of-range labels would read past the row in a kernel; fail loudly instead.

    One small reduction; on CUDA it costs a host sync, which is why the Triton path calls it
    only when `KERNELS_CHECK_LABELS=1` (see `should_check_labels`); the torch path always calls it.
    """
    if labels.numel() and bool(((labels >= vocab) & valid).any()):
        raise IndexError(f"label >= vocabulary size {vocab}")


def should_check_labels(t: torch.Tensor) -> bool:
    return not t.is_cuda or os.environ.get("KERNELS_CHECK_LABELS", "0") == "1"


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., K] -> [N, K], a view whenever strides allow (kernels take both strides)."""
    return x.reshape(-1, x.shape[-1])


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """`torch.cuda.device(device)` for a CUDA device, else a no-op.

    Triton launches on the *current* CUDA device and its current stream, not on the device of the
    tensors it is given: a model on cuda:1 while cuda:0 is current would be an illegal access."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def launch(kernel, grid, *args, **kwargs) -> None:
    """`kernel[grid](*args, **kwargs)` on the device of its tensor arguments: every Triton launch
    of the package goes through here (tests/test_kernels_devices.py checks that).

    The tensors must share one device (a clear error instead of an illegal memory access)."""
    devices = {a.device for a in args if isinstance(a, torch.Tensor)}
    if len(devices) != 1:
        raise ValueError(f"a kernel's tensors must be on one device, got {sorted(map(str, devices))}")
    with device_guard(devices.pop()):
        kernel[grid](*args, **kwargs)
