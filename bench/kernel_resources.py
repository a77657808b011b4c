"""Static resource report of every Triton kernel of o1pruner_kernels, without a GPU.

Each kernel is compiled ahead of time for sm_90a (H100) and sm_80 (A100) through Triton's own
pipeline (ASTSource -> TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin), specialised the way the JIT
specialises a launch at the target shape (contiguous inputs: unit strides become constants;
16-byte aligned pointers and sizes divisible by 16 get divisibility hints). The cubin's registers
per thread and stack frame (spills) come from `cuobjdump --dump-resource-usage` (shipped inside
Triton); shared memory from the compiled kernel's metadata. Blocks per SM and occupancy follow
from the per-SM budgets below.

    python bench/kernel_resources.py [--json] [--arch 90 80] [--dtype bf16 fp32] [--kernel fused_linear] [--defaults-only]

`--json` prints a list of objects: kernel, config (block sizes, warps, stages), variant (the
other constexprs), dtype, arch, registers, spill_bytes, shared_bytes, blocks_per_sm, occupancy,
fits, default (the launcher's config at N = 16,384, D = 3,584, V = 152,064, bf16, sm_90). Output goes
to stdout only (docs/kernels.md's table is a curated excerpt).
"""
from __future__ import annotations

import os

if __name__ == "__main__":
    # Compiled kernels, not interpreter objects: this must hold before o1pruner_kernels defines them. Only as a
    # script: imported (a docs or CLI check in the test process) it must not switch the interpreter off for
    # everything else that process runs.
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import itertools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Literal  # noqa: E402

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from o1pruner_kernels import _flp_configs as fc  # noqa: E402
from o1pruner_kernels import _fused_linear_triton as flt  # noqa: E402
from o1pruner_kernels import logprobs as lp  # noqa: E402
from o1pruner_kernels import ratio_loss as rl  # noqa: E402
from o1pruner_kernels._tl import num_warps_for  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/kernel_resources.py` from a checkout
from pruner.cli import parse_config  # noqa: E402

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
# Per-SM budgets: registers, shared memory (usable by blocks), threads, resident blocks.
SM = {
    90: dict(regs=65536, smem=228 * 1024, smem_block=227 * 1024, threads=2048, blocks=32),
    80: dict(regs=65536, smem=164 * 1024, smem_block=163 * 1024, threads=2048, blocks=32),
}
MAX_REGS = 255
TARGET = dict(N=16384, D=3584, V=152064)  # Qwen2.5-7B LM head, 16k tokens
PREC = {"bf16": "tf32", "fp32": "ieee"}  # the launcher's choice (_fused_linear_triton._config)


@dataclass
class KernelResourcesConfig:
    """Registers, spills, shared memory and occupancy of every Triton kernel, compiled ahead of time on the CPU."""

    json: bool = field(default=False, metadata={"help": "print a JSON list instead of a table"})
    arch: list[Literal[90, 80]] = field(default_factory=lambda: [90, 80], metadata={
        "help": "compute capabilities to compile for (90: H100 sm_90a, 80: A100)"})
    dtype: list[Literal["bf16", "fp32"]] = field(default_factory=lambda: ["bf16", "fp32"], metadata={
        "help": "operand dtypes of the kernels"})
    kernel: str | None = field(default=None, metadata={
        "help": "only kernels whose name starts with this (e.g. fused_linear.fwd)"})
    defaults_only: bool = field(default=False, metadata={"help": "only the configs marked default"})


@dataclass
class Build:
    kernel: str
    fn: object
    config: dict  # BLOCK_* constexprs + num_warps + num_stages
    variant: dict  # the other constexprs
    dtype: str
    elt_args: tuple = ()  # pointer args of the operand dtype; other pointers are fp32
    int_ptrs: dict = field(default_factory=dict)
    unit_strides: tuple = ()
    default: bool = False


def _signature(b: Build) -> tuple[dict, dict, dict]:
    const = {**{k: v for k, v in b.config.items() if k.isupper()}, **b.variant}
    const.update({s: 1 for s in b.unit_strides})
    sig, attrs = {}, {}
    for i, name in enumerate(b.fn.arg_names):
        if name in const:
            sig[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            sig[name] = b.int_ptrs.get(name) or "*" + (b.dtype if name in b.elt_args else "fp32")
        else:
            sig[name] = "fp32" if name in ("inv_t", "lo", "hi") else "i32"
        if sig[name] != "fp32":  # aligned pointers and sizes / strides divisible by 16 at the target
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, const, attrs


def _cuobjdump(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"unexpected cuobjdump output:\n{out}")
    reg, stack, shared, local = map(int, m.groups())
    return dict(registers=reg, spill_bytes=stack + local, static_shared=shared)


def occupancy(arch: int, registers: int, shared: int, warps: int) -> tuple[int, float]:
    """Resident blocks per SM and the fraction of the SM's threads they occupy."""
    sm = SM[arch]
    threads = 32 * warps
    regs_per_warp = -(-registers * 32 // 256) * 256  # allocation unit: 256 registers per warp
    by_regs = sm["regs"] // (regs_per_warp * warps)
    by_smem = sm["smem"] // (shared + 1024) if shared <= sm["smem_block"] else 0  # 1 KB reserved per block
    blocks = min(by_regs, by_smem, sm["threads"] // threads, sm["blocks"])
    return blocks, blocks * threads / sm["threads"]


def measure(b: Build, arch: int) -> dict:
    sig, const, attrs = _signature(b)
    opts = {"num_warps": b.config["num_warps"]}
    if b.config.get("num_stages") is not None:
        opts["num_stages"] = b.config["num_stages"]
    k = triton.compile(ASTSource(b.fn, sig, const, attrs), target=GPUTarget("cuda", arch, 32), options=opts)
    res = _cuobjdump(k.asm["cubin"])
    shared = k.metadata.shared + res.pop("static_shared")
    blocks, occ = occupancy(arch, res["registers"], shared, b.config["num_warps"])
    return dict(kernel=b.kernel, config=b.config, variant=b.variant, dtype=b.dtype, arch=f"sm_{arch}",
                **res, shared_bytes=shared, blocks_per_sm=blocks, occupancy=round(occ, 4),
                fits=res["spill_bytes"] == 0 and res["registers"] <= MAX_REGS and blocks >= 1,
                default=b.default and arch == 90)


def fused_linear_builds(dtype: str) -> list[Build]:
    """Every candidate tile of the three fused-linear kernels x every constexpr variant the launcher
    passes. `default`: the static default (first candidate) in the variant the trainer uses at the
    target shape (bf16, no entropy, 32-bit offsets)."""
    elt_bytes = 2 if dtype == "bf16" else 4
    common = dict(elt_args=("h_ptr", "w_ptr", "dz_ptr"), int_ptrs={"y_ptr": "*i64"},
                  unit_strides=("s_hd", "s_wd"), dtype=dtype)
    base = dict(PREC=PREC[dtype], UPCAST=False)
    out = []
    flags = list(itertools.product((False, True), repeat=2))  # (entropy, 64-bit offsets)
    grads = ((True, True), (True, False), (False, True))  # (NEED_DH, NEED_DW) of the atomic backward
    kinds = {
        "fused_linear.fwd": (flt._flp_fwd_kernel, [dict(WITH_ENT=e, I64=i) for e, i in flags]),
        "fused_linear.bwd_dz": (flt._flp_bwd_kernel, [
            dict(HAS_ENT_GRAD=e, STORE_DZ=True, NEED_DH=True, NEED_DW=True, I64=i) for e, i in flags]),
        "fused_linear.bwd_atomic": (flt._flp_bwd_kernel, [
            dict(HAS_ENT_GRAD=e, STORE_DZ=False, NEED_DH=dh, NEED_DW=dw, I64=i) for e, i in flags for dh, dw in grads]),
    }
    for name, (fn, variants) in kinds.items():
        for j, tile in enumerate(fc.candidates(name.split(".")[1], elt_bytes)):
            for v in variants:
                target_variant = not v["I64"] and not v.get("WITH_ENT") and not v.get("HAS_ENT_GRAD") and \
                    v.get("NEED_DH", True) and v.get("NEED_DW", True)
                is_default = j == 0 and dtype == "bf16" and target_variant and name != "fused_linear.bwd_atomic"
                out.append(Build(name, fn, fc.launch_meta(tile), {**v, **base}, default=is_default, **common))
    return out


def other_builds(dtype: str) -> list[Build]:
    """logprobs-from-logits (one row per program, BLOCK_V 4096 at large V) and the ratio-loss kernels."""
    bv = min(triton.next_power_of_2(TARGET["V"]), 4096)
    lp_cfg = {"BLOCK_V": bv, "num_warps": num_warps_for(bv), "num_stages": None}
    common = dict(elt_args=("x_ptr", "dx_ptr"), int_ptrs={"y_ptr": "*i64"}, unit_strides=("stride_xv",), dtype=dtype)
    out = [Build("logprobs.fwd", lp._logprobs_fwd_kernel, lp_cfg, {}, default=dtype == "bf16", **common)]
    out += [Build("logprobs.bwd", lp._logprobs_bwd_kernel, lp_cfg, {"HAS_ENT_GRAD": e}, default=dtype == "bf16" and not e,
                  **common) for e in (False, True)]
    if dtype == "fp32":  # the ratio loss works on fp32 log-probs
        rcfg = {"BLOCK_T": 1024, "num_warps": 4, "num_stages": None}
        rcommon = dict(elt_args=(), int_ptrs={"m_ptr": "*u8"}, unit_strides=("s_lt", "s_ot", "s_mt"), dtype=dtype)
        out.append(Build("ratio_loss.seq_fwd", rl._seq_fwd_kernel, rcfg, {}, default=True, **rcommon))
        out += [Build("ratio_loss.tok", rl._tok_kernel, rcfg, {"BACKWARD": bw}, default=True, **rcommon)
                for bw in (False, True)]
    return out


def all_builds(dtypes, kernels: str | None = None) -> list[Build]:
    builds = [b for d in dtypes for b in fused_linear_builds(d) + other_builds(d)]
    return [b for b in builds if kernels is None or b.kernel.startswith(kernels)]


def _fmt_config(c: dict) -> str:
    blocks = " x ".join(str(v) for k, v in c.items() if k.startswith("BLOCK"))
    stages = c.get("num_stages")
    return f"{blocks}, {c['num_warps']}w" + (f", {stages}s" if stages else "")


def _fmt_variant(v: dict) -> str:
    flags = [k for k, x in v.items() if x is True and k not in ("STORE_DZ",)]
    return " ".join(flags) or "-"


def table(rows: list[dict]) -> str:
    head = ("| kernel | tiles, warps, stages | variant | dtype | arch | regs | spill B | smem KB | blocks/SM | occupancy "
            "| default |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['kernel']} | {_fmt_config(r['config'])} | {_fmt_variant(r['variant'])} | {r['dtype']} | "
                     f"{r['arch']} | {r['registers']} | {r['spill_bytes']} | {r['shared_bytes'] / 1024:.0f} | "
                     f"{r['blocks_per_sm']} | {100 * r['occupancy']:.1f}% | {'yes' if r['default'] else ''} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    cfg = parse_config(KernelResourcesConfig, argv, prog="bench/kernel_resources.py")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("bench/kernel_resources.py compiles real kernels: run it as a script of its own, "
                         "without TRITON_INTERPRET=1")
    rows = []
    if not cfg.json:
        print("\n".join(table([]).splitlines()[:2]))
    for b in all_builds(cfg.dtype, cfg.kernel):
        if cfg.defaults_only and not b.default:
            continue
        for arch in cfg.arch:
            rows.append(measure(b, arch))
            if not cfg.json:
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    if cfg.json:
        print(json.dumps(rows, indent=1))
    bad = [r for r in rows if r["arch"] == "sm_90" and not r["fits"]]
    print(f"{len(rows)} compiled; {len(bad)} over the sm_90 budget (spills or no block fits)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
