"""Every Triton kernel, in every constexpr variant the launchers use, compiles for sm_90 (H100).

The interpreter tests check the math but not that the kernels lower to PTX; this does, without a
GPU, through Triton's own ahead-of-time path (ASTSource -> TTIR -> TTGIR -> LLVM -> PTX -> cubin).
It runs in a subprocess because the suite sets TRITON_INTERPRET=1, under which `triton.jit`
returns interpreter objects that cannot be compiled.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent("""
    import sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from o1pruner_kernels import _fused_linear_triton as flt, logprobs as lp, ratio_loss as rl

    FLOATS = {"inv_t", "lo", "hi"}
    INTS = {"y_ptr": "*i64"}

    def sig(fn, elt, out_elt, **const):
        s = {}
        for name in fn.arg_names:
            if name in const:
                s[name] = "constexpr"
            elif name.endswith("_ptr"):
                kind = INTS.get(name)
                if name == "m_ptr" and "s_mb" in fn.arg_names:
                    kind = "*u8"  # the ratio kernels' mask (bool tensors are viewed as uint8)
                if kind is None:
                    kind = "*" + (elt if name in ("x_ptr", "h_ptr", "w_ptr", "lp_ptr", "old_ptr", "dz_ptr", "dx_ptr") else out_elt)
                s[name] = kind
            else:
                s[name] = "fp32" if name in FLOATS else "i32"
        return s

    def build(fn, elt, **const):
        src = ASTSource(fn, sig(fn, elt, "fp32", **const), const)
        triton.compile(src, target=GPUTarget("cuda", 90, 32))

    for elt, prec in (("bf16", "tf32"), ("fp32", "ieee")):
        build(lp._logprobs_fwd_kernel, elt, BLOCK_V=4096)
        for ent in (False, True):
            build(lp._logprobs_bwd_kernel, elt, HAS_ENT_GRAD=ent, BLOCK_V=4096)
        blocks = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, PREC=prec, UPCAST=False)
        build(flt._flp_fwd_kernel, elt, **blocks)
        for store_dz, ent, dh, dw in ((True, True, True, True), (False, True, True, True), (False, False, True, False)):
            build(flt._flp_bwd_kernel, elt, HAS_ENT_GRAD=ent, STORE_DZ=store_dz, NEED_DH=dh, NEED_DW=dw, **blocks)
        build(rl._seq_fwd_kernel, elt, BLOCK_T=1024)
        for bwd in (False, True):
            build(rl._tok_kernel, elt, BACKWARD=bwd, BLOCK_T=1024)
    print("compiled ok")
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other kernel tests compile and run them")
def test_all_triton_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), TRITON_DEFAULT_FP_FUSION="1")
    out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0 and ("ptxas" in out.stderr and "not found" in out.stderr.lower()):
        pytest.skip("no ptxas in this Triton install")
    assert out.returncode == 0, out.stderr[-4000:]
    assert "compiled ok" in out.stdout
