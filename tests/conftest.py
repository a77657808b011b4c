"""Test-wide set-up. Without a GPU the Triton kernels run in Triton's interpreter on the CPU.

TRITON_INTERPRET must be set before any `triton.jit` decoration runs, i.e. before `kernels` is
imported by any test module, so it lives here at the root of the suite.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
