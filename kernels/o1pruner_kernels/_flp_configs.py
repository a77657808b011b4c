"""Tile configurations of the fused LM-head kernels: the GPU autotuning candidates and the
interpreter's small blocks.

Every candidate below compiles for sm_90a without register spills and within the H100's
register and shared-memory budget in every constexpr variant the launcher can pick (entropy or
not, 32- or 64-bit offsets, which gradients): `bench/kernel_resources.py` measures that on a CPU
(ahead-of-time compile + ptxas / cuobjdump) and `tests/test_kernels_compile.py` guards it.
The first candidate of each list is the static default (the choice when autotuning is off).
Lists are per operand size: fp32 operands take twice the shared memory per tile and their IEEE
fp32 dot runs on FMA units with its operands in registers, so they get smaller tiles (measured:
64 x 128 x 32 with 3 stages, or the atomic backward at 64 x 64 x 32 with 4 warps, spill).
"""
from __future__ import annotations

import inspect
import os
import time

import triton


# (block_n, block_v, block_d, num_warps, num_stages)
_FWD = {
    2: [(128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 8, 4)],
    4: [(64, 128, 32, 8, 2), (64, 64, 32, 4, 3)],
}
_BWD_DZ = {  # "matmul" backward: the kernel writes dz, GEMMs consume it
    2: [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 256, 64, 8, 3)],
    4: [(64, 128, 32, 8, 3), (64, 64, 32, 4, 3)],
}
_BWD_ATOMIC = {  # "atomic" backward: dz @ W and dz^T @ h in the kernel, fp32 atomics
    2: [(128, 128, 64, 8, 3), (64, 128, 64, 8, 3)],
    4: [(64, 64, 32, 8, 2), (32, 64, 32, 4, 2)],
}
CANDIDATES = {"fwd": _FWD, "bwd_dz": _BWD_DZ, "bwd_atomic": _BWD_ATOMIC}

# The CPU interpreter: small blocks keep the tests fast; masks at tile edges are still exercised.
INTERPRETER = (16, 32, 16, 4, None)
# Autotuning in the interpreter (O1PRUNER_AUTOTUNE=1): the multiprocessor count the forward's split
# rule assumes there. Small, so that at test shapes the candidates get different split counts.
INTERPRETER_SMS = 2


def as_dict(cfg: tuple) -> dict:
    bn, bv, bd, warps, stages = cfg
    return {"block_n": bn, "block_v": bv, "block_d": bd, "num_warps": warps, "num_stages": stages}


def candidates(kind: str, elt_bytes: int) -> list[dict]:
    """The autotuning candidates of one kernel ("fwd", "bwd_dz", "bwd_atomic") for an operand size."""
    return [as_dict(c) for c in CANDIDATES[kind][2 if elt_bytes <= 2 else 4]]


def launch_meta(cfg: dict) -> dict:
    """A tile as a kernel launch's keywords: BLOCK_N/V/D, num_warps and (when set) num_stages."""
    meta = {"BLOCK_N": cfg["block_n"], "BLOCK_V": cfg["block_v"], "BLOCK_D": cfg["block_d"],
            "num_warps": cfg["num_warps"]}
    if cfg["num_stages"] is not None:
        meta["num_stages"] = cfg["num_stages"]
    return meta


def triton_config(cfg: dict) -> triton.Config:
    blocks = {k: v for k, v in launch_meta(cfg).items() if k.startswith("BLOCK_")}
    return triton.Config(blocks, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def triton_configs(kind: str) -> list[triton.Config]:
    """Every candidate of a kernel for every operand size; `prune_for_dtype` keeps the right ones."""
    return [triton_config(as_dict(c)) for size in (2, 4) for c in CANDIDATES[kind][size]]


def prune_for_dtype(kind: str):
    def prune(configs, named_args, **_):
        allowed = {triton_config(c) for c in candidates(kind, named_args["h_ptr"].element_size())}
        return [c for c in configs if c in allowed]
    return prune


def autotune_enabled(interpreted: bool) -> bool:
    """Whether launches without tile options autotune: on GPUs unless O1PRUNER_AUTOTUNE=0; in the
    CPU interpreter only with O1PRUNER_AUTOTUNE=1 (slow: every candidate runs, interpreted)."""
    flag = os.environ.get("O1PRUNER_AUTOTUNE", "")
    return flag == "1" if interpreted else flag != "0"


def host_clock_bench(kernel_call, quantiles=None, **_) -> float | list[float]:
    """Triton's benchmark, timed with the host clock: `triton.testing.do_bench` needs CUDA events,
    which the interpreter does not have. One warm-up run and one timed run per candidate are
    enough there: the point is to run every candidate on the real buffers, as a GPU tuner does."""
    kernel_call()
    start = time.perf_counter()
    kernel_call()
    ms = (time.perf_counter() - start) * 1e3
    return [ms] * len(quantiles) if quantiles else ms


# Triton >= 3.3 can keep each key's winner on disk (under TRITON_CACHE_DIR, keyed on the Triton
# version, the GPU target, the kernel source, the key and the candidates): later processes skip
# the benchmark. Older Tritons re-tune in every process.
_CACHE_RESULTS = "cache_results" in inspect.signature(triton.autotune).parameters


def autotune(kernel, kind: str, key: list[str], interpreted: bool, reset_to_zero: list[str] | None = None):
    """`triton.autotune` of one fused LM-head kernel over its candidates (pruned to the operand size),
    with winners cached on disk where Triton supports it and the host-clock timer in the interpreter."""
    extra = {"cache_results": True} if _CACHE_RESULTS else {}
    if interpreted:
        extra["do_bench"] = host_clock_bench
    return triton.autotune(configs=triton_configs(kind), key=key, reset_to_zero=reset_to_zero,
                           prune_configs_by={"early_config_prune": prune_for_dtype(kind)}, **extra)(kernel)
