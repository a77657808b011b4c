"""Triton device helpers shared by the log-prob kernels (from logits and fused with the LM head)."""
from __future__ import annotations

import triton
import triton.language as tl

# Kernels start the running max at -1e30, not -inf: exp(-inf - (-inf)) would be NaN for tiles
# that are entirely masked (-inf), while exp(-inf - (-1e30)) is a clean 0.


@triton.jit
def online_lse_update(m, s, t, z, AXIS: tl.constexpr, WITH_T: tl.constexpr = True):
    """One step of the streaming log-sum-exp along AXIS.

    m: running max, s: sum exp(z - m), t: sum exp(z - m) * z (for the entropy, since
    H = lse - sum_j p_j z_j). Masked entries of z are -inf and contribute exactly 0.
    WITH_T=False leaves t alone (callers that need no entropy save a tile-sized product).
    """
    m_new = tl.maximum(m, tl.max(z, AXIS))
    alpha = tl.exp(m - m_new)
    if AXIS == 0:
        e = tl.exp(z - m_new)
    else:
        e = tl.exp(z - m_new[:, None])
    s = s * alpha + tl.sum(e, AXIS)
    if WITH_T:
        ez = e * tl.where(e > 0, z, 0.0)
        t = t * alpha + tl.sum(ez, AXIS)
    return m_new, s, t


@triton.jit
def dlogits(z, p, is_label, g_logp, g_ent, lse, ent, HAS_ENT_GRAD: tl.constexpr):
    """d(g_logp * logp_y + g_ent * H) / dz for scaled logits z (callers broadcast the scalars).

    d logp_y / dz_j = 1[j = y] - p_j;  dH / dz_j = -p_j (z_j - sum_k p_k z_k) = -p_j (z_j - lse + H).
    """
    dz = tl.where(is_label, g_logp, 0.0) - g_logp * p
    if HAS_ENT_GRAD:
        zf = tl.where(p > 0, z, 0.0)  # p = 0 where z = -inf: keep 0 * inf out
        dz -= g_ent * p * (zf - lse + ent)
    return dz


@triton.jit
def index_range(start, BLOCK: tl.constexpr, I64: tl.constexpr):
    """start + arange(BLOCK): int32 when every offset the kernel forms fits (cheaper addresses,
    fewer registers), int64 on the guarded path the launcher picks for larger tensors."""
    idx = start + tl.arange(0, BLOCK)
    if I64:
        idx = idx.to(tl.int64)
    return idx


def num_warps_for(block: int) -> int:
    return 4 if block <= 1024 else (8 if block <= 4096 else 16)
