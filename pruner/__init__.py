"""O1-Pruner: Length-Harmonizing Fine-Tuning of long-thought reasoning models.

Import-light on purpose: importing `pruner` loads no torch, vLLM or model. The embedded
default task and model are reached lazily through `default_problems` / `default_model_path`.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["default_problems", "default_model_path"]


def default_problems(split: str) -> list[dict]:
    """Records {"id", "problem", "answer", "min_tokens", "difficulty"} of the embedded task's
    "train" (1,200) or "test" (400) split."""
    from pruner.embedded import default_problems as _impl

    return _impl(split)


def default_model_path() -> Path:
    """Folder of the embedded default model (a tiny Llama-architecture network), built first if it is missing."""
    from pruner.embedded import default_model_path as _impl

    return _impl()
