"""Triton kernels for `fused_linear_logprobs`: logits tiles hidden @ W^T live only in SRAM.

Forward: grid (token tiles, vocabulary splits). Each program streams its share of the vocabulary
in BLOCK_V tiles, builds each [BLOCK_N, BLOCK_V] logits tile with a loop over D (tensor cores,
fp32 accumulation) and keeps an online (max, sum exp[, sum exp * z]) per row; the label logit is
a gathered row dot product after that loop, by the split that holds the label. The few partials
per row are merged on the host side ([N, splits], negligible), which lets short-N/long-V
problems fill the GPU.

Backward: grid (token tiles, vocabulary tiles). Each program recomputes its logits tile, forms
dz = d loss / d logits for the per-token upstream gradients (log-prob and entropy), and either
stores dz for a chunk of tokens, which two GEMMs turn into d_hidden and d_weight (bwd="matmul",
the default), or adds dz @ W_tile into d_hidden and dz^T @ h_tile into d_weight with fp32
atomics (bwd="atomic": no dz buffer, contention at large N * V * D). Nothing is computed for
the backward during the forward (the lesson of Liger's PR 1298): arbitrary per-token upstream
gradients are exact.

Register budget (sm_90, `bench/kernel_resources.py`): what made tiles above 64 x 128 spill was
not the accumulator but the work around it, chiefly a tile-wide compare against a 64-bit column
index for the label gather; hence the gather after the loop, the tile-local int32 label compare
in the backward, the entropy term only when asked (WITH_ENT) and int32 offsets unless a tensor
reaches 2^31 elements (I64, chosen by the launcher).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _flp_configs as fc
from ._backend import interpreting, launch, next_pow2
from ._tl import dlogits, index_range, online_lse_update


@triton.jit
def _mm(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # The CPU interpreter multiplies bf16 operands wrongly (measured: errors of 1e10 on a 16x16
    # tile), so under the interpreter the operands go through fp32; on GPUs bf16 feeds the MMA.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _logits_tile(h_ptr, s_hn, s_hd, w_ptr, s_wv, s_wd, rows, cols, row_ok, col_ok, D,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
                 UPCAST: tl.constexpr):
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        h = tl.load(h_ptr + rows[:, None] * s_hn + ds[None, :] * s_hd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * s_wv + ds[None, :] * s_wd, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = _mm(h, tl.trans(w), acc, PREC, UPCAST)
    return acc


@triton.jit
def _label_logits(h_ptr, s_hn, s_hd, w_ptr, s_wv, s_wd, rows, y, mine, D,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, I64: tl.constexpr):
    """h_i . w_{y_i} in fp32 for the rows in `mine` (0 elsewhere): the label logit as a gathered
    row dot product after the vocabulary loop, instead of a tile-wide compare-and-select in it
    (that select kept a 64-bit column index per logit alive and made 128 x 128 tiles spill)."""
    yy = tl.where(mine, y, 0)
    if not I64:
        yy = yy.to(tl.int32)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        ok = mine[:, None] & (ds < D)[None, :]
        h = tl.load(h_ptr + rows[:, None] * s_hn + ds[None, :] * s_hd, mask=ok, other=0.0)
        w = tl.load(w_ptr + yy[:, None] * s_wv + ds[None, :] * s_wd, mask=ok, other=0.0)
        acc += tl.sum(h.to(tl.float32) * w.to(tl.float32), 1)
    return acc


@triton.jit
def _flp_fwd_kernel(
    h_ptr, s_hn, s_hd, w_ptr, s_wv, s_wd, y_ptr, m_ptr, s_ptr, t_ptr, zy_ptr,
    N, V, D, n_out, inv_t, n_bucket,
    WITH_ENT: tl.constexpr, I64: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # n_bucket (the power of two >= N; N varies batch to batch) is only the autotuner's key.
    split = tl.program_id(1)
    rows = index_range(tl.program_id(0) * BLOCK_N, BLOCK_N, I64)
    row_ok = rows < N
    # The split's share of the vocabulary in whole tiles, from the grid (the autotuner sizes the
    # grid per config); splits past the end of V find an empty range and store neutral partials.
    per_split = tl.cdiv(tl.cdiv(V, BLOCK_V), tl.num_programs(1)) * BLOCK_V
    v_lo = split * per_split
    v_hi = tl.minimum(v_lo + per_split, V)
    m = tl.full((BLOCK_N,), -1.0e30, tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = index_range(v0, BLOCK_V, I64)
        col_ok = cols < v_hi
        z = _logits_tile(h_ptr, s_hn, s_hd, w_ptr, s_wv, s_wd, rows, cols, row_ok, col_ok, D,
                         BLOCK_N, BLOCK_V, BLOCK_D, PREC, UPCAST) * inv_t
        z = tl.where(col_ok[None, :], z, float("-inf"))
        m, s, t = online_lse_update(m, s, t, z, 1, WITH_ENT)
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
    mine = row_ok & (y >= v_lo) & (y < v_hi)  # each valid label lies in exactly one split
    zy = _label_logits(h_ptr, s_hn, s_hd, w_ptr, s_wv, s_wd, rows, y, mine, D, BLOCK_N, BLOCK_D, I64) * inv_t
    out = rows * n_out + split
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(t_ptr + out, t, mask=row_ok)
    tl.store(zy_ptr + out, zy, mask=row_ok)
    # The buffer has n_out columns, the most splits any candidate uses; this launch uses fewer when
    # its tile is larger. The columns it does not own get neutral partials here, in the kernel, so
    # that the buffer is exact whatever ran on it before: while autotuning, candidates with more
    # splits wrote real partials into those columns (a host-side fill before the launch would not
    # survive the benchmark runs, and merging those partials counted the LSE and label logit twice).
    if split == 0:
        for c in range(tl.num_programs(1), n_out):
            extra = rows * n_out + c
            tl.store(m_ptr + extra, tl.full((BLOCK_N,), -1.0e30, tl.float32), mask=row_ok)
            tl.store(s_ptr + extra, tl.zeros((BLOCK_N,), dtype=tl.float32), mask=row_ok)
            tl.store(t_ptr + extra, tl.zeros((BLOCK_N,), dtype=tl.float32), mask=row_ok)
            tl.store(zy_ptr + extra, tl.zeros((BLOCK_N,), dtype=tl.float32), mask=row_ok)


@triton.jit
def _flp_bwd_kernel(
    h_ptr, s_hn, s_hd, w_ptr, s_wv, s_wd, y_ptr, lse_ptr, ent_ptr, gl_ptr, ge_ptr, dh_ptr, dw_ptr, dz_ptr,
    N, V, D, inv_t, n_bucket,
    HAS_ENT_GRAD: tl.constexpr, STORE_DZ: tl.constexpr, NEED_DH: tl.constexpr, NEED_DW: tl.constexpr,
    I64: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    v0 = tl.program_id(1) * BLOCK_V
    rows = index_range(tl.program_id(0) * BLOCK_N, BLOCK_N, I64)
    cols = index_range(v0, BLOCK_V, I64)
    row_ok = rows < N
    col_ok = cols < V
    # Upstream grads are pre-zeroed for ignored tokens by the launcher, so padding rows and
    # ignored rows both produce dz = 0 here.
    g_l = tl.load(gl_ptr + rows, mask=row_ok, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    # The label's column within this tile as int32 (ignored labels are negative: no match), so the
    # compare below is against the tile-local arange, not a 64-bit column index per logit.
    y_local = (tl.load(y_ptr + rows, mask=row_ok, other=-1) - v0).to(tl.int32)
    z = _logits_tile(h_ptr, s_hn, s_hd, w_ptr, s_wv, s_wd, rows, cols, row_ok, col_ok, D,
                     BLOCK_N, BLOCK_V, BLOCK_D, PREC, UPCAST) * inv_t
    p = tl.where(col_ok[None, :], tl.exp(z - lse[:, None]), 0.0)
    g_e = 0.0
    ent = 0.0
    if HAS_ENT_GRAD:
        g_e = tl.load(ge_ptr + rows, mask=row_ok, other=0.0)[:, None]
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)[:, None]
    is_label = tl.arange(0, BLOCK_V)[None, :] == y_local[:, None]
    dz = dlogits(z, p, is_label, g_l[:, None], g_e, lse[:, None], ent, HAS_ENT_GRAD)
    dz = (dz * inv_t).to(h_ptr.dtype.element_ty)
    if STORE_DZ:  # "matmul" mode: the caller turns the dz chunk into d_hidden / d_weight with GEMMs
        tl.store(dz_ptr + rows[:, None] * V + cols[None, :], dz, mask=row_ok[:, None] & col_ok[None, :])
    else:
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            if NEED_DH:
                w = tl.load(w_ptr + cols[:, None] * s_wv + ds[None, :] * s_wd,
                            mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                dh = _mm(dz, w, None, PREC, UPCAST)
                tl.atomic_add(dh_ptr + rows[:, None] * D + ds[None, :], dh, mask=row_ok[:, None] & d_ok[None, :])
            if NEED_DW:  # skipped for a frozen LM head
                h = tl.load(h_ptr + rows[:, None] * s_hn + ds[None, :] * s_hd,
                            mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                dw = _mm(tl.trans(dz), h, None, PREC, UPCAST)
                tl.atomic_add(dw_ptr + cols[:, None] * D + ds[None, :], dw, mask=col_ok[:, None] & d_ok[None, :])


TUNING_KEYS = ("block_n", "block_v", "block_d", "num_warps", "num_stages", "splits", "bwd", "bwd_chunk_bytes", "bwd_chunk")
_TILE_KEYS = ("block_n", "block_v", "block_d", "num_warps", "num_stages")

# Launches without explicit tile options: triton.autotune over the statically budgeted
# candidates (_flp_configs), keyed on the token-count bucket and the model's V and D (Triton adds
# the tensors' dtypes). Every buffer a kernel accumulates into or writes partly is exact after
# tuning: the forward writes every column of its partials, the dz backward writes all of dz, and
# the atomic backward's outputs are zeroed by the tuner before each run (reset_to_zero).
_fwd_tuned = fc.autotune(
    _flp_fwd_kernel, "fwd", key=["n_bucket", "V", "D", "WITH_ENT", "I64"], interpreted=interpreting(),
)
_bwd_dz_tuned = fc.autotune(
    _flp_bwd_kernel, "bwd_dz", key=["n_bucket", "V", "D", "HAS_ENT_GRAD", "I64"], interpreted=interpreting(),
)
_bwd_atomic_tuned = fc.autotune(
    _flp_bwd_kernel, "bwd_atomic", key=["n_bucket", "V", "D", "HAS_ENT_GRAD", "NEED_DH", "NEED_DW", "I64"],
    interpreted=interpreting(), reset_to_zero=["dh_ptr", "dw_ptr"],
)


def check_tuning_keys(tuning: dict) -> None:
    """Either backend's options are accepted (callers pass one set); anything else is a TypeError naming it."""
    unknown = set(tuning) - set(TUNING_KEYS) - {"chunk_size", "chunk_bytes"}
    if unknown:
        raise TypeError(f"unknown tuning options {sorted(unknown)}")


def _config(tuning: dict, dtype: torch.dtype) -> dict:
    small = interpreting()
    cfg = {
        **{k: None for k in _TILE_KEYS},
        "splits": None,
        # "matmul": per token chunk, a kernel writes dz [chunk, V] and two GEMMs consume it
        # (extra memory chunk * V * itemsize, no atomics); "atomic": no extra memory, fp32
        # atomics into d_hidden / d_weight (slower for large N * V * D: contention).
        "bwd": "matmul",
        "bwd_chunk_bytes": 1 << 30,
        "bwd_chunk": None,
    }
    check_tuning_keys(tuning)
    cfg.update({k: v for k, v in tuning.items() if k in cfg and v is not None})
    if cfg["bwd"] not in ("matmul", "atomic"):
        raise ValueError(f"bwd must be 'matmul' or 'atomic', got {cfg['bwd']!r}")
    # Tiles: autotuned unless some tile option is given (then the rest come from the kernel's
    # default candidate, or the interpreter's small blocks) or autotuning is off (on GPUs unless
    # O1PRUNER_AUTOTUNE=0; in the interpreter only with O1PRUNER_AUTOTUNE=1).
    cfg["autotune"] = fc.autotune_enabled(small) and all(cfg[k] is None for k in _TILE_KEYS)
    # IEEE fp32 dot: TF32 would lose ~3 decimal digits of the logits for fp32 inputs.
    cfg["prec"] = "ieee" if dtype in (torch.float32, torch.float64) else "tf32"
    cfg["upcast"] = small
    return cfg


def _tiles(cfg: dict, kind: str, elt_bytes: int) -> dict:
    """Explicit tiles for a non-autotuned launch: the user's options over the default candidate."""
    base = fc.as_dict(fc.INTERPRETER) if interpreting() else fc.candidates(kind, elt_bytes)[0]
    return {k: base[k] if cfg[k] is None else cfg[k] for k in _TILE_KEYS}


def _max_offset(t: torch.Tensor) -> int:
    return sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()) if n > 0)


def _needs_i64(*extents: int) -> bool:
    """64-bit offsets only when some element offset a kernel forms reaches 2^31."""
    return max(extents) >= 2**31 - 1


def _n_splits(n_tiles: int, v_tiles: int, splits: int | None, device: torch.device, tuned: bool) -> int:
    """Vocabulary splits: enough programs for about 4 per multiprocessor, at most one per tile."""
    if splits is not None:
        return max(1, min(int(splits), v_tiles))
    if device.type != "cuda":
        if not tuned:
            return min(2, v_tiles)  # exercises the partial merge under the interpreter
        # Autotuning in the interpreter: the GPU rule with a stand-in multiprocessor count, so
        # that candidates of different tile sizes get different split counts, as on a GPU.
        sms = fc.INTERPRETER_SMS
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(v_tiles, triton.cdiv(4 * sms, n_tiles)))


def flp_forward(h, w, y, inv_t: float, cfg: dict, with_entropy: bool = True):
    """Returns logp (ignored rows not yet zeroed), lse and entropy (zeros unless with_entropy), each [N] fp32."""
    N, D = h.shape
    V = w.shape[0]
    if N == 0:
        empty = torch.empty(0, dtype=torch.float32, device=h.device)
        return empty, empty, empty
    # Autotuned: the grid, and so the number of vocabulary splits, depends on the chosen tile.
    tiles = fc.candidates("fwd", h.element_size()) if cfg["autotune"] else [_tiles(cfg, "fwd", h.element_size())]

    def splits(meta_bn: int, meta_bv: int) -> int:
        return _n_splits(triton.cdiv(N, meta_bn), triton.cdiv(V, meta_bv), cfg["splits"], h.device, cfg["autotune"])

    n_out = max(splits(t["block_n"], t["block_v"]) for t in tiles)
    part = torch.empty((4, N, n_out), dtype=torch.float32, device=h.device)  # the kernel writes every column
    args = (h, h.stride(0), h.stride(1), w, w.stride(0), w.stride(1), y, part[0], part[1], part[2], part[3],
            N, V, D, n_out, inv_t, next_pow2(N))
    const = dict(WITH_ENT=with_entropy, I64=_needs_i64(_max_offset(h), _max_offset(w), N * n_out),
                 PREC=cfg["prec"], UPCAST=cfg["upcast"])
    if cfg["autotune"]:
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), splits(meta["BLOCK_N"], meta["BLOCK_V"]))  # noqa: E731
        launch(_fwd_tuned, grid, *args, **const)
    else:
        t = tiles[0]
        launch(_flp_fwd_kernel, (triton.cdiv(N, t["block_n"]), n_out), *args, **const, **fc.launch_meta(t))
    m, s, t, zy = part.unbind(0)
    big_m = m.amax(1, keepdim=True)
    scale = torch.exp(m - big_m)
    s_tot = (s * scale).sum(1)
    lse = big_m.squeeze(1) + torch.log(s_tot)
    ent = lse - (t * scale).sum(1) / s_tot if with_entropy else torch.zeros_like(lse)
    return zy.sum(1) - lse, lse, ent


def flp_backward(h, w, y, lse, ent, g_logp, g_ent, inv_t: float, cfg: dict, need_dh: bool = True, need_dw: bool = True):
    """(d_hidden [N, D], d_weight [V, D]) in h.dtype or fp32, None when not needed.

    g_* must be zero on ignored rows."""
    N, D = h.shape
    V = w.shape[0]
    has_ent = g_ent is not None
    g_ent = g_ent if has_ent else g_logp
    if N == 0:
        return (torch.zeros_like(h) if need_dh else None), (torch.zeros_like(w) if need_dw else None)
    kind = "bwd_atomic" if cfg["bwd"] == "atomic" else "bwd_dz"
    tiles = None if cfg["autotune"] else _tiles(cfg, kind, h.element_size())

    def run(rows: slice, dh, dw, dz, store_dz: bool):
        n = rows.stop - rows.start
        hc = h[rows]
        args = (hc, hc.stride(0), hc.stride(1), w, w.stride(0), w.stride(1), y[rows], lse[rows], ent[rows],
                g_logp[rows], g_ent[rows], dh, dw, dz, n, V, D, inv_t, next_pow2(n))
        # The dz variant ignores NEED_*: fixed, so they make no extra compiled variants.
        const = dict(HAS_ENT_GRAD=has_ent, STORE_DZ=store_dz, NEED_DH=need_dh or store_dz, NEED_DW=need_dw or store_dz,
                     I64=_needs_i64(_max_offset(hc), _max_offset(w), n * V, N * D, V * D),
                     PREC=cfg["prec"], UPCAST=cfg["upcast"])
        if tiles is None:
            tuned = _bwd_dz_tuned if store_dz else _bwd_atomic_tuned
            launch(tuned, lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(V, meta["BLOCK_V"])), *args, **const)
        else:
            grid = (triton.cdiv(n, tiles["block_n"]), triton.cdiv(V, tiles["block_v"]))
            launch(_flp_bwd_kernel, grid, *args, **const, **fc.launch_meta(tiles))

    if cfg["bwd"] == "atomic":
        dh = torch.zeros((N, D) if need_dh else (1, 1), dtype=torch.float32, device=h.device)
        dw = torch.zeros((V, D) if need_dw else (1, 1), dtype=torch.float32, device=h.device)
        run(slice(0, N), dh, dw, dh, False)
        return (dh if need_dh else None), (dw if need_dw else None)

    chunk = cfg["bwd_chunk"] or cfg["bwd_chunk_bytes"] // (V * h.element_size())
    chunk = max(1, min(N, int(chunk)))
    dz = torch.empty((chunk, V), dtype=h.dtype, device=h.device)
    dh = torch.empty((N, D), dtype=h.dtype, device=h.device) if need_dh else None
    dw = torch.zeros((V, D), dtype=torch.float32, device=h.device) if need_dw and N > chunk else None
    for a in range(0, N, chunk):
        b = min(N, a + chunk)
        dzc = dz[: b - a]
        run(slice(a, b), dz, dz, dzc, True)
        if need_dh:
            torch.mm(dzc, w, out=dh[a:b])  # fp32 accumulation inside the GEMM, one rounding out
        if need_dw:
            if dw is None:  # single chunk: one rounding, like the final cast to weight.dtype
                dw = dzc.T @ h[a:b]
            else:  # several chunks: partial sums must not be rounded to bf16 one by one
                _add_mm_fp32(dw, dzc.T, h[a:b])
    return dh, dw


# fp32 temporaries of _add_mm_fp32: a whole [V, D] product would double d_weight's memory
# (5.8 GiB instead of 2.9 at V = 152,064, D = 5,120); row slices of this size keep GEMMs large.
DW_SLICE_BYTES = 64 * 2**20


def _add_mm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b accumulated in fp32, with at most DW_SLICE_BYTES of temporaries."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    rows = max(1, DW_SLICE_BYTES // (4 * b.shape[1]))
    for r in range(0, acc.shape[0], rows):
        acc[r:r + rows].add_(_mm_fp32(a[r:r + rows], b))


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result (fp32 accumulation) for low-precision operands (fp32 ones never get here)."""
    if a.is_cuda:
        try:  # torch >= 2.8 on CUDA: no upcast copies
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            pass
    return a.float() @ b.float()
