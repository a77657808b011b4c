"""Log-probs of labels under the LM head, fused: hidden [..., D], weight [V, D] -> logp [...].

The [N, V] logits never exist in memory. Two implementations behind one entry point:

- Triton (`_fused_linear_triton`): logits tiles in SRAM, online log-sum-exp; the backward
  recomputes the logits tiles (by default, per token chunk, a kernel writes dz and two GEMMs
  consume it; `bwd="atomic"`: fp32 atomics, no dz buffer).
- PyTorch (`TorchFusedLinearLogprobs`, the CPU training path): tokens in chunks of
  `chunk_size` rows (default: as many as fit `chunk_bytes` = 32 MiB of fp32 logits). Autograd
  saves only hidden, weight, labels and per-token lse / entropy; backward recomputes each chunk.
  Extra memory is O(chunk * V + N * D + V * D) (the last for the fp32 copy of the weight and
  its fp32 gradient accumulator).

Both return fp32 log-probs and entropies and accept upstream gradients on both.
"""
from __future__ import annotations

import torch

from . import _fused_linear_triton as flt
from ._backend import (
    as_rows,
    check_label_range,
    check_labels,
    check_temperature,
    resolve_backend,
    should_check_labels,
)
from .reference import valid_label_mask

DEFAULT_CHUNK_BYTES = 32 * 2**20


def _chunk_rows(n: int, vocab: int, chunk_size: int | None, chunk_bytes: int | None) -> int:
    if chunk_size is not None:
        return max(1, int(chunk_size))
    budget = DEFAULT_CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    return max(1, min(max(n, 1), budget // (4 * vocab)))


def _chunk_logits(h: torch.Tensor, w32: torch.Tensor, inv_t: float) -> torch.Tensor:
    z = h.float() @ w32.T
    return z.mul_(inv_t) if inv_t != 1.0 else z


def _zero_ignored(logp, ent, valid):
    """Both backends' outputs: 0 at ignored tokens, and log-probs never positive (rounding can push
    z_y - lse a hair above 0) with NaN kept (`where`, not max)."""
    zero = torch.zeros((), device=logp.device)
    return torch.where(valid, torch.where(logp > 0, zero, logp), zero), torch.where(valid, ent, zero)


def _masked_upstream(g_logp, g_ent, valid, lse):
    """fp32 upstream gradients, zero at ignored tokens; a missing g_logp becomes zeros, a missing
    g_ent stays None (the backward then skips the entropy term)."""
    zero = torch.zeros((), device=lse.device)
    g_logp = torch.zeros_like(lse) if g_logp is None else torch.where(valid, g_logp.float(), zero).contiguous()
    g_ent = None if g_ent is None else torch.where(valid, g_ent.float(), zero).contiguous()
    return g_logp, g_ent


def _input_grads(dh, dw, h, w) -> tuple:
    """Both backwards' results: d_hidden and d_weight in the inputs' dtypes (None when not needed),
    None for the labels and the four options."""
    return (None if dh is None else dh.to(h.dtype), None if dw is None else dw.to(w.dtype)) + (None,) * 5


class TorchFusedLinearLogprobs(torch.autograd.Function):
    """Chunked PyTorch implementation; outputs (logp, entropy) [N] fp32, both differentiable."""

    @staticmethod
    def forward(ctx, h, w, y, inv_t: float, ignore_index: int, chunk: int, with_entropy: bool):
        N = h.shape[0]
        valid = valid_label_mask(y, ignore_index)
        safe_y = torch.where(valid, y, torch.zeros_like(y))
        w32 = w.float()
        logp = torch.empty(N, dtype=torch.float32, device=h.device)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp) if with_entropy else torch.zeros_like(logp)
        for a in range(0, N, chunk):
            b = min(a + chunk, N)
            z = _chunk_logits(h[a:b], w32, inv_t)
            lse[a:b] = torch.logsumexp(z, -1)
            logp[a:b] = z.gather(1, safe_y[a:b, None]).squeeze(1) - lse[a:b]
            if with_entropy:  # two more passes over the chunk, skipped when nobody asks
                z = z.sub_(lse[a:b, None])  # now log p, in place
                # vecdot avoids a third chunk-sized temporary for p * log p.
                ent[a:b] = -torch.linalg.vecdot(torch.exp(z), z)
            del z
        logp, ent = _zero_ignored(logp, ent, valid)
        ctx.save_for_backward(h, w, safe_y, valid, lse, ent)
        ctx.args = (inv_t, chunk)
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        h, w, y, valid, lse, ent = ctx.saved_tensors
        inv_t, chunk = ctx.args
        if g_logp is None and g_ent is None:
            return (None,) * 7
        g_logp, g_ent = _masked_upstream(g_logp, g_ent, valid, lse)
        w32 = w.float()
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty(h.shape, dtype=torch.float32, device=h.device) if need_h else None
        dw = torch.zeros(w32.shape, dtype=torch.float32, device=h.device) if need_w else None
        for a in range(0, h.shape[0], chunk):
            b = min(a + chunk, h.shape[0])
            logp_all = _chunk_logits(h[a:b], w32, inv_t).sub_(lse[a:b, None])
            p = torch.exp(logp_all)
            if g_ent is not None:
                # dH/dz = -p (z - lse + H) = -p (log p + H)
                logp_all.add_(ent[a:b, None]).mul_(p).mul_(-g_ent[a:b, None])
            dz = p.mul_(-g_logp[a:b, None])
            dz.scatter_add_(1, y[a:b, None], g_logp[a:b, None])
            if g_ent is not None:
                dz.add_(logp_all)
            del logp_all
            if inv_t != 1.0:
                dz.mul_(inv_t)
            if need_h:
                dh[a:b] = dz @ w32
            if need_w:
                dw.addmm_(dz.T, h[a:b].float())
            del dz
        return _input_grads(dh, dw, h, w)


class TritonFusedLinearLogprobs(torch.autograd.Function):
    """Triton implementation; outputs (logp, entropy) [N] fp32, both differentiable."""

    @staticmethod
    def forward(ctx, h, w, y, inv_t: float, ignore_index: int, cfg: dict, with_entropy: bool):
        valid = valid_label_mask(y, ignore_index)
        # Without entropy the kernel skips its tile-sized entropy term (entropy is then 0).
        logp, lse, ent = flt.flp_forward(h, w, y, inv_t, cfg, with_entropy)
        logp, ent = _zero_ignored(logp, ent, valid)
        ctx.save_for_backward(h, w, y, valid, lse, ent)
        ctx.args = (inv_t, cfg)
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        h, w, y, valid, lse, ent = ctx.saved_tensors
        inv_t, cfg = ctx.args
        if g_logp is None and g_ent is None:
            return (None,) * 7
        g_logp, g_ent = _masked_upstream(g_logp, g_ent, valid, lse)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh, dw = flt.flp_backward(h, w, y, lse, ent, g_logp, g_ent, inv_t, cfg, need_h, need_w)
        return _input_grads(dh, dw, h, w)


def _scored_rows_only(h, w, y, valid, inv_t, ignore_index, chunk, with_entropy):
    """The torch backend on the rows that carry a label, scattered back to all N rows (0 elsewhere).
    Prompt and padding rows cost an [N, V] GEMM each way but contribute nothing (their gradient is 0),
    so they are dropped before it, as Cut Cross-Entropy does; copying N x D rows is cheap next to
    the logits' N x V. The index ops are differentiable: ignored rows get d_hidden 0."""
    rows = valid.nonzero().squeeze(1)
    if rows.numel() == valid.numel():
        return TorchFusedLinearLogprobs.apply(h, w, y, inv_t, ignore_index, chunk, with_entropy)
    logp, ent = TorchFusedLinearLogprobs.apply(h.index_select(0, rows), w, y.index_select(0, rows), inv_t,
                                               ignore_index, chunk, with_entropy)
    scatter = lambda t: t.new_zeros(valid.shape).index_copy(0, rows, t)  # noqa: E731
    return scatter(logp), scatter(ent)


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
    **tuning,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log softmax(hidden @ weight.T / temperature)[label] per token, fp32, shape labels.shape.

    Never builds the [N, V] logits. Ignored labels give log-prob 0, entropy 0, gradient 0 (the torch
    backend computes only the rows with a label: prompt and padding rows cost nothing).
    `return_entropy=True` also returns the (differentiable) entropy of the tempered softmax.
    Tuning: torch backend `chunk_size` (rows per chunk) or `chunk_bytes` (fp32 logits budget per
    chunk); Triton backend `block_n`, `block_v`, `block_d`, `splits`, `num_warps`, `num_stages`,
    `bwd` ("matmul": a kernel writes dz for a chunk of tokens, of at most `bwd_chunk` rows or
    `bwd_chunk_bytes` (1 GiB), and two GEMMs consume it; "atomic": no dz buffer, fp32 atomics).
    Without tile options (`block_*`, `num_warps`, `num_stages`) GPU launches autotune over a short
    list of spill-free candidates per shape bucket (O1PRUNER_AUTOTUNE=0: the first candidate; the CPU
    interpreter tunes only with O1PRUNER_AUTOTUNE=1).
    Options of the other backend are accepted and ignored, so callers can pass one set.
    Hidden and weight of different float dtypes are promoted to a common dtype.
    """
    temperature = check_temperature(temperature)
    if hidden.shape[-1] != weight.shape[-1] or weight.dim() != 2:
        raise ValueError(f"hidden [..., D] and weight [V, D] disagree: {tuple(hidden.shape)} vs {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight has V = 0 rows: log-probs need a vocabulary of at least one token")
    check_labels(labels, hidden.shape[:-1], "hidden.shape[:-1]")
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise TypeError("hidden and weight must be floating point")
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    h = as_rows(hidden).to(dtype)
    w = weight.to(dtype)
    y = labels.reshape(-1).to(torch.int64)
    V = w.shape[0]
    if resolve_backend(backend, hidden, weight, labels) == "torch":
        flt.check_tuning_keys(tuning)
        chunk = _chunk_rows(h.shape[0], V, tuning.get("chunk_size"), tuning.get("chunk_bytes"))
        valid = valid_label_mask(y, ignore_index)
        check_label_range(y, valid, V)
        logp, ent = _scored_rows_only(h, w, y, valid, 1.0 / temperature, ignore_index, chunk, return_entropy)
    else:
        cfg = flt._config(tuning, dtype)
        if should_check_labels(h):
            check_label_range(y, valid_label_mask(y, ignore_index), V)
        logp, ent = TritonFusedLinearLogprobs.apply(h, w, y.contiguous(), 1.0 / temperature, ignore_index, cfg,
                                                   return_entropy)
    logp, ent = logp.view(labels.shape), ent.view(labels.shape)
    return (logp, ent) if return_entropy else logp
