"""Per-step metrics: a progress bar on rank 0, a JSONL file, optional TensorBoard, PNG curves."""
from __future__ import annotations

import json
import math
import os
import resource
from pathlib import Path

import torch


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsLogger:
    """Rank 0 writes; other ranks hold a logger that does nothing, so the loop needs no rank branches."""

    def __init__(self, path: Path, *, enabled: bool, total_steps: int, start_step: int = 0,
                 tensorboard: bool = False):
        self.enabled = enabled
        self.path = path
        self.bar = None
        self.writer = None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(path.parent / "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        """A resumed run rewrites the steps after its checkpoint, so the file never repeats a step; a torn
        last line (a kill mid-write) is cut, and the log says so."""
        if not self.path.exists():
            return
        rows, torn = read_metrics(self.path)
        if torn:
            print(f"{self.path}: dropped a torn last line (a run killed mid-write): {torn[:80]!r}", flush=True)
        kept = [row for row in rows if row.get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
        os.replace(tmp, self.path)  # a kill here leaves the old file or the new, never half of one

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, row["step"])
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                             tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)

    def write(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> tuple[list[dict], str]:
    """The rows of a metrics.jsonl, and its torn last line ('' if none). Each row is written with one
    append, so only the last line can be cut short by a kill; a bad line anywhere else is an error
    naming file:line."""
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    rows, torn = [], ""
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    for index, (lineno, line) in enumerate(numbered):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"a {type(row).__name__}, not an object")
        except ValueError as exc:
            if index == len(numbered) - 1:
                torn = line
                break
            raise ValueError(f"{path}:{lineno}: not a metrics row ({exc}); delete that line, or the file "
                             "(a log: deleting it loses only the curves of the steps before)") from None
        rows.append(row)
    return rows, torn


def plot_metrics(jsonl: Path, png: Path, keys: tuple[str, ...] = (
        "loss", "mean_advantage", "mean_ratio", "clip_fraction", "grad_norm", "lr",
        "mean_response_tokens", "tokens_per_s")) -> Path | None:
    try:
        import matplotlib
    except ImportError:  # e.g. a bare GPU machine: the curves are optional, metrics.jsonl has the numbers
        print(f"matplotlib not installed; no {png.name} (the numbers are in {jsonl})")
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(jsonl)[0]
    keys = tuple(k for k in keys if any(k in r for r in rows))
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(keys) / cols), cols, figsize=(4 * cols, 3 * math.ceil(len(keys) / cols)),
                             squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts])
        ax.set_title(key)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
