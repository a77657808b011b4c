"""Every Triton kernel compiles for sm_90a (H100) and fits its register / shared-memory budget.

The interpreter tests check the math but not that the kernels lower to a cubin, nor what that
cubin costs; `bench/kernel_resources.py` compiles ahead of time on the CPU through Triton's own
pipeline (ASTSource -> TTIR -> TTGIR -> LLVM -> PTX -> ptxas) and reads registers and spills
with cuobjdump. It runs in a subprocess because the suite sets TRITON_INTERPRET=1, under which
`triton.jit` returns interpreter objects that cannot be compiled.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MAX_REGS, SMEM_BLOCK_H100 = 255, 227 * 1024

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other kernel tests compile and run them")


def _report(*args: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'kernels'}", TRITON_DEFAULT_FP_FUSION="1")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_resources.py"), "--json", "--arch", "90", *args],
                         env=env, capture_output=True, text=True, timeout=1500)
    if out.returncode != 0 and "ptxas" in out.stderr and "not found" in out.stderr.lower():
        pytest.skip("no ptxas in this Triton install")
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout)


def _over_budget(rows: list[dict]) -> list[str]:
    return [f"{r['kernel']} {r['config']} {r['variant']} {r['dtype']}: {r['registers']} regs, "
            f"{r['spill_bytes']} B spilled, {r['shared_bytes']} B smem"
            for r in rows if r["spill_bytes"] or r["registers"] > MAX_REGS or r["shared_bytes"] > SMEM_BLOCK_H100
            or r["blocks_per_sm"] < 1]


@pytest.mark.slow
def test_default_configs_compile_without_spills_at_large_tiles():
    """The launcher's defaults at N = 16,384, D = 3,584, V = 152,064, bf16, sm_90: no spills, and the
    fused LM-head forward / backward use at least 128 x 128 logits per block."""
    rows = _report("--defaults-only")
    kernels = {r["kernel"] for r in rows}
    assert {"fused_linear.fwd", "fused_linear.bwd_dz", "logprobs.fwd", "logprobs.bwd", "ratio_loss.tok"} <= kernels
    assert all(r["default"] for r in rows)
    assert not _over_budget(rows), _over_budget(rows)
    for r in rows:
        if r["kernel"] in ("fused_linear.fwd", "fused_linear.bwd_dz"):
            assert r["config"]["BLOCK_N"] * r["config"]["BLOCK_V"] >= 128 * 128, r


@pytest.mark.slow
def test_every_autotune_candidate_fits_the_h100_budget():
    """Every candidate the GPU autotuner may pick, in every constexpr variant the launcher passes
    (entropy or not, 32/64-bit offsets, which gradients), bf16 and fp32: within 255 registers,
    no spills, shared memory within a block's 227 KB."""
    rows = _report("--kernel", "fused_linear")
    assert len(rows) >= 40
    assert not _over_budget(rows), _over_budget(rows)
