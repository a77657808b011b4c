"""The embedded default: a synthetic long-thought math task and a tiny model trained on it.

Both are the default of every entry point, so the method can be seen working on a laptop CPU
with nothing downloaded. Importing this package is cheap: the task is pure Python, and torch,
transformers and the build only load when the model has to be built.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

from pruner.embedded.task import make_problems

SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "assets" / "default_model"
_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


@functools.lru_cache(maxsize=None)
def _problems(split: str) -> tuple[dict, ...]:
    return tuple(make_problems(split))


def default_problems(split: str) -> list[dict]:
    """Records {"id", "problem", "answer", "min_tokens", "difficulty"} of "train" or "test"."""
    return [dict(r) for r in _problems(split)]


def is_complete_model(folder: Path) -> bool:
    """Whether `folder` holds every file the default model is loaded from (config, weights, tokenizer)."""
    return all((folder / name).is_file() for name in _MODEL_FILES)


def default_model_path() -> Path:
    """The default model's folder; builds it there first (10-15 minutes on 2 cores) if it is missing.

    Where the package folder is read-only, the model is built under
    $O1_PRUNER_CACHE (default ~/.cache/o1-pruner) instead.
    """
    if is_complete_model(SHIPPED_MODEL):
        return SHIPPED_MODEL
    from pruner.embedded.build import build

    target = SHIPPED_MODEL
    if not os.access(target.parent if target.parent.exists() else target.parent.parent, os.W_OK):
        cache = Path(os.environ.get("O1_PRUNER_CACHE", Path.home() / ".cache" / "o1-pruner"))
        target = cache / "default_model"
        if is_complete_model(target):
            return target
    print(f"building the embedded default model into {target} (one time, 10-15 minutes on 2 cores)")
    build(target)
    return target


__all__ = ["default_problems", "default_model_path", "SHIPPED_MODEL"]
