"""Attention over packed rows that never crosses a sequence boundary (`--micro-batch-tokens`).

Registered in transformers' `AttentionInterface` as `o1pruner_packed_sdpa`. A packed row arrives
with `cu_seq_lens_q` (pruner/packing.py passes transformers' flash-attention varlen names, which
every decoder layer hands to its attention call). One backend runs it, chosen by `select_path`:

  GPU  flash-attn `flash_attn_varlen_func` when installed (bf16/fp16), else FlexAttention with a
       document mask (block-sparse: cross-sequence blocks are skipped), else SDPA with a
       [1, 1, N, N] block-diagonal causal mask;
  CPU  one causal SDPA call per sequence: measured fastest on the CPU (one layer's attention, forward +
       backward: 5-7x faster than SDPA with a block mask, 2-4x than one padded [k, Lmax] SDPA call;
       docs/trainer.md#packing); FlexAttention has no CPU backward.

A call without `cu_seq_lens_q` (a padded micro-batch) is plain transformers SDPA, with the padding
mask that the registered mask function builds (none when nothing is padded: then SDPA is causal).
"""
from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F

NAME = "o1pruner_packed_sdpa"
PATHS = ("flash-attn varlen", "FlexAttention document mask", "SDPA block mask", "per-sequence SDPA")
_forced: str | None = None   # tests pin a path (set_path) to compare every backend on the CPU
_mask_cache: dict[str, tuple[torch.Tensor, object]] = {}  # per kind: (the row's cu_seq_lens, its mask), for all layers


@functools.cache
def _installed(module: str) -> bool:
    """Looked up once per process: select_path runs in every layer's attention call."""
    return importlib.util.find_spec(module) is not None


def select_path(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str:
    """The backend a packed row runs on `device` in `dtype` (what the trainer logs)."""
    if _forced is not None:
        return _forced
    if device.type != "cuda":
        return "per-sequence SDPA"
    if dtype in (torch.bfloat16, torch.float16) and _installed("flash_attn"):
        return "flash-attn varlen"
    if _installed("torch.nn.attention.flex_attention"):
        return "FlexAttention document mask"
    return "SDPA block mask"


def set_path(path: str | None) -> None:
    """Pin the backend (None: choose by device); for tests and benchmarks."""
    if path is not None and path not in PATHS:
        raise ValueError(f"unknown packed attention path {path!r}; choose one of {PATHS}")
    global _forced
    _forced = path


def _document_ids(cu: torch.Tensor, total: int) -> torch.Tensor:
    lengths = (cu[1:] - cu[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu.device), lengths, output_size=total)


def _cached(kind: str, cu: torch.Tensor, build: Callable[[], object]) -> object:
    """The row's mask, built once per forward: every layer of the row (and its recomputation under
    activation checkpointing) gets the same `cu` object. The cache holds that object, so its memory
    cannot be reused by the next row's boundaries while the entry lives (an address would be unsafe)."""
    hit = _mask_cache.get(kind)
    if hit is None or hit[0] is not cu:
        hit = (cu, build())
        _mask_cache[kind] = hit
    return hit[1]


def _per_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float | None,
                  gqa: bool) -> torch.Tensor:
    bounds = cu.tolist()
    parts = [F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True, scale=scale,
                                            enable_gqa=gqa)
             for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    return torch.cat(parts, dim=2)


def _block_mask_sdpa(q, k, v, cu, scale, gqa) -> torch.Tensor:
    total = q.shape[2]

    def build() -> torch.Tensor:
        doc = _document_ids(cu, total)
        return ((doc[:, None] == doc[None, :]) & torch.ones(total, total, dtype=torch.bool, device=q.device).tril())
    mask = _cached("sdpa", cu, build)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


_compiled_flex: Callable | None = None


def _flex(q, k, v, cu, scale, gqa) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _compiled_flex
    total = q.shape[2]

    def build() -> object:
        doc = _document_ids(cu, total)
        return create_block_mask(lambda b, h, qi, ki: (doc[qi] == doc[ki]) & (qi >= ki), None, None, total, total,
                                 device=q.device)
    block_mask = _cached("flex", cu, build)
    if q.device.type == "cuda" and _compiled_flex is None:  # eager flex materialises scores; compiled it does not
        _compiled_flex = torch.compile(flex_attention, dynamic=True)
    run = _compiled_flex if q.device.type == "cuda" else flex_attention
    return run(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)


def _flash(q, k, v, cu, scale, max_length) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    rows = lambda t: t[0].transpose(0, 1)  # noqa: E731 - [1, H, N, D] -> [N, H, D]
    out = flash_attn_varlen_func(rows(q), rows(k), rows(v), cu, cu, max_length, max_length, softmax_scale=scale,
                                 causal=True)
    return out.transpose(0, 1).unsqueeze(0)  # back to [1, H, N, D]


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seq_lens: torch.Tensor, *,
                     scale: float | None = None, max_length: int | None = None) -> torch.Tensor:
    """Causal attention of a packed row, each sequence on its own: q [1, H, N, D], k/v [1, Hkv, N, D]
    (grouped-query heads allowed), `cu_seq_lens` [k + 1] int32 boundaries -> [1, H, N, D]."""
    if q.shape[0] != 1:
        raise ValueError(f"a packed row has batch size 1, got {q.shape[0]}")
    gqa = q.shape[1] != k.shape[1]
    path = select_path(q.device, q.dtype)
    if path == "flash-attn varlen":
        return _flash(q, k, v, cu_seq_lens.int(), scale, max_length or int((cu_seq_lens[1:] - cu_seq_lens[:-1]).max()))
    if path == "FlexAttention document mask":
        return _flex(q, k, v, cu_seq_lens, scale, gqa)
    if path == "SDPA block mask":
        return _block_mask_sdpa(q, k, v, cu_seq_lens, scale, gqa)
    return _per_sequence(q, k, v, cu_seq_lens, scale, gqa)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: packed rows here, everything else through its own SDPA."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout:
        raise ValueError("packed attention has no dropout (the trainer trains without it)")
    out = packed_attention(query, key, value, cu, scale=scaling, max_length=kwargs.get("max_length_q"))
    return out.transpose(1, 2).contiguous(), None


def _mask(*, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """No mask without padding (a packed row carries its boundaries; a full row is causal SDPA);
    transformers' SDPA mask for a padded batch."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(attention_mask=attention_mask, **kwargs)


def enable(lm: torch.nn.Module) -> None:
    """Register the attention and switch `lm` (a transformers model) to it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, _mask)
    lm.config._attn_implementation = NAME
