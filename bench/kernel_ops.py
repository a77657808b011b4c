"""Benchmark the `o1pruner_kernels` ops against eager PyTorch, torch.compile, Liger-Kernel and Cut Cross-Entropy.

    python bench/kernel_ops.py                       # CUDA: D=3584,5120 x N=1k..32k, V=152064, bf16
    python bench/kernel_ops.py --n 4096 --d 3584 --ops fused_linear --providers kernels-triton liger
    python bench/kernel_ops.py --memory-ratio        # CPU: peak-RSS ratio fused(torch) / naive

On CUDA: forward, backward and total time (median over --reps warmed-up runs, CUDA events),
achieved TFLOP/s next to a plain matmul of the same size measured in the same run, and peak
memory (torch.cuda.max_memory_allocated above the inputs). On the CPU only the PyTorch paths
run, at small shapes, followed by the N=8192/D=512/V=32000 peak-RSS comparison (each side in its
own fresh subprocess, ru_maxrss growth over one forward+backward). One CSV row per
(op, provider, shape, dtype, device, commit) is appended to runs/kernels/kernels_<device>.csv
(--out). The curated CPU table of docs/benchmarks.md is `bench/readme_figures.py --only kernels`'s copy in
docs/results/kernels/.
"""
from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/kernel_ops.py` from a checkout: the repository's modules

import torch  # noqa: E402

import o1pruner_kernels  # noqa: E402
from o1pruner_kernels.reference import clipped_ratio_loss_reference  # noqa: E402
from pruner.cli import parse_config  # noqa: E402

Op = Literal["fused_linear", "logprobs", "ratio_loss"]
Provider = Literal["eager", "compile", "kernels-torch", "kernels-triton", "kernels-triton-atomic", "liger", "cce"]


@dataclass
class KernelOpsConfig:
    """Time and memory of the kernel ops against eager PyTorch, torch.compile, Liger-Kernel and CCE."""

    ops: list[Op] = field(default_factory=lambda: ["fused_linear", "logprobs", "ratio_loss"],
                          metadata={"help": "ops to benchmark"})
    n: list[int] = field(default_factory=list, metadata={
        "help": "token counts (default: 1024 4096 8192 16384 32768 on CUDA, 1024 on the CPU)"})
    d: list[int] = field(default_factory=list, metadata={
        "help": "hidden sizes of fused_linear (default: 3584 5120 on CUDA, 256 on the CPU)"})
    v: int | None = field(default=None, metadata={"help": "vocabulary size (default: 152064 on CUDA, 8192 on the CPU)"})
    dtype: Literal["bfloat16", "float16", "float32"] = field(default="bfloat16", metadata={
        "help": "input dtype on CUDA (the CPU always runs float32)"})
    providers: list[Provider] = field(default_factory=list, metadata={
        "help": "only these providers (default: every one available on the device)"})
    reps: int = field(default=10, metadata={"help": "timed repetitions, median reported (at most 3 on the CPU)"})
    warmup: int = field(default=3, metadata={"help": "untimed repetitions first (1 on the CPU)"})
    out: str = field(default="", metadata={"help": "CSV to append rows to (default: runs/kernels/kernels_<device>.csv)"})
    memory_ratio: bool = field(default=False, metadata={
        "help": "only the CPU peak-RSS comparison (fused torch path vs naive, N=8192 D=512 V=32000)"})
    skip_memory_ratio: bool = field(default=False, metadata={
        "help": "on the CPU, skip the peak-RSS comparison that otherwise follows the timings (about a minute)"})

    def check(self) -> None:
        """Refuse impossible flags before any benchmark runs."""
        for flag, values in (("--n", self.n), ("--d", self.d), ("--v", [self.v or 1]), ("--reps", [self.reps])):
            if min(values, default=1) < 1:
                raise SystemExit(f"kernel_ops.py: {flag} must be >= 1, got {values}")
        if self.warmup < 0:
            raise SystemExit(f"kernel_ops.py: --warmup must be >= 0, got {self.warmup}")

FIELDS = ["op", "provider", "N", "D", "V", "dtype", "device", "commit", "fwd_ms", "bwd_ms", "total_ms",
          "tflops", "matmul_tflops", "frac_of_matmul", "peak_mem_mib", "status"]


# ----------------------------------------------------------------------------- providers
def _naive_logp(h, w, y, t=1.0):
    z = (h @ w.T).float() / t
    return torch.log_softmax(z, -1).gather(-1, y.clamp(min=0)[:, None]).squeeze(-1) * (y >= 0)


def _naive_logits_logp(x, y):
    return torch.log_softmax(x.float(), -1).gather(-1, y.clamp(min=0)[:, None]).squeeze(-1) * (y >= 0)


def fused_linear_providers(device: str) -> dict:
    p = {"eager": _naive_logp, "compile": torch.compile(_naive_logp, dynamic=False)}
    if device == "cpu":  # the chunked torch path is the CPU path; at V=152k on a GPU it is a slow loop
        p["kernels-torch"] = lambda h, w, y: o1pruner_kernels.fused_linear_logprobs(h, w, y, backend="torch")
    if device == "cuda":
        p["kernels-triton"] = lambda h, w, y: o1pruner_kernels.fused_linear_logprobs(h, w, y, backend="triton")
        p["kernels-triton-atomic"] = lambda h, w, y: o1pruner_kernels.fused_linear_logprobs(h, w, y, backend="triton", bwd="atomic")
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as lfce

            p["liger"] = lambda h, w, y: -lfce(h, w, y, reduction="none")
        except Exception:
            pass
        try:
            from cut_cross_entropy import linear_cross_entropy as cce

            p["cce"] = lambda h, w, y: -cce(h, w, y, reduction="none")
        except Exception:
            pass
    return p


def logprobs_providers(device: str) -> dict:
    p = {"kernels-torch": lambda x, y: o1pruner_kernels.logprobs_from_logits(x, y, backend="torch"), "eager": _naive_logits_logp,
         "compile": torch.compile(_naive_logits_logp, dynamic=False)}
    if device == "cuda":
        p["kernels-triton"] = lambda x, y: o1pruner_kernels.logprobs_from_logits(x, y, backend="triton")
        try:
            from liger_kernel.transformers.functional import liger_cross_entropy

            p["liger"] = lambda x, y: -liger_cross_entropy(x, y, reduction="none")
        except Exception:
            pass
    return p


def ratio_providers(device: str) -> dict:
    def ref(lp, old, adv, m):
        return clipped_ratio_loss_reference(lp.float(), old.float(), adv.float(), m)[0]

    p = {"kernels-torch": lambda *a: o1pruner_kernels.clipped_ratio_loss(*a, backend="torch")[0], "eager": ref,
         "compile": torch.compile(ref, dynamic=False)}
    if device == "cuda":
        p["kernels-triton"] = lambda *a: o1pruner_kernels.clipped_ratio_loss(*a, backend="triton")[0]
    return p


# ----------------------------------------------------------------------------- timing
class Timer:
    """CUDA events on GPU, perf_counter on CPU; returns milliseconds."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __call__(self, fn):
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = fn()
            b.record()
            torch.cuda.synchronize()
            return out, a.elapsed_time(b)
        import time

        t0 = time.perf_counter()
        out = fn()
        return out, (time.perf_counter() - t0) * 1e3


def measure(fn, inputs, grad_inputs, reps: int, warmup: int, device: str) -> dict:
    """Median fwd / bwd / total ms and peak memory above the inputs for one provider."""
    timer = Timer(device)
    fwd, bwd, tot = [], [], []
    gen = torch.Generator(device=device).manual_seed(0)
    for i in range(warmup + reps):
        for t in grad_inputs:
            t.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        out, f_ms = timer(lambda: fn(*inputs))
        # a non-uniform per-token upstream gradient, like a PPO loss sends
        g = torch.rand(out.shape, generator=gen, device=device) if out.dim() else torch.ones((), device=device)
        _, b_ms = timer(lambda: out.backward(g))
        if i >= warmup:
            fwd.append(f_ms)
            bwd.append(b_ms)
            tot.append(f_ms + b_ms)
        del out, g
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else float("nan")
    return {"fwd_ms": statistics.median(fwd), "bwd_ms": statistics.median(bwd),
            "total_ms": statistics.median(tot), "peak_mem_mib": peak}


def matmul_tflops(n: int, d: int, v: int, dtype, device: str, reps: int) -> float:
    a = torch.randn(n, d, dtype=dtype, device=device)
    b = torch.randn(v, d, dtype=dtype, device=device)
    timer = Timer(device)
    for _ in range(2):
        timer(lambda: a @ b.T)
    ms = statistics.median(timer(lambda: a @ b.T)[1] for _ in range(reps))
    return 2 * n * d * v / (ms * 1e-3) / 1e12


# ----------------------------------------------------------------------------- driver
def bench_shape(op: str, shape: tuple[int, int, int], dtype, device: str, cfg: KernelOpsConfig, providers: dict,
                stamp: dict) -> list[dict]:
    """One row per provider at one (N, D, V); `stamp` holds the device name and commit of every row."""
    n, d, v = shape
    torch.manual_seed(0)
    if op == "fused_linear":
        h = (torch.randn(n, d, device=device) * 0.5).to(dtype).requires_grad_()
        w = (torch.randn(v, d, device=device) * 0.02).to(dtype).requires_grad_()
        y = torch.randint(0, v, (n,), device=device)
        inputs, grads, flops = (h, w, y), (h, w), 6 * n * d * v  # fwd 2NDV + bwd 4NDV (useful work)
    elif op == "logprobs":
        x = torch.randn(n, v, device=device).to(dtype).requires_grad_()
        y = torch.randint(0, v, (n,), device=device)
        inputs, grads, flops = (x, y), (x,), 0
    else:
        b = max(1, n // 1024)
        lp = (-torch.rand(b, 1024, device=device) * 3).requires_grad_()
        old = lp.detach() + 0.1 * torch.randn_like(lp)
        inputs, grads, flops = (lp, old, torch.randn(b, device=device), torch.rand(b, 1024, device=device) > 0.1), (lp,), 0
    mm = matmul_tflops(n, d, v, dtype, device, cfg.reps) if flops else float("nan")
    rows = []
    for name, fn in providers.items():
        if cfg.providers and name not in cfg.providers:
            continue
        row = {"op": op, "provider": name, "N": n, "D": d if op == "fused_linear" else "",
               "V": v if op != "ratio_loss" else "",
               "dtype": str(dtype).replace("torch.", ""), **stamp,
               "matmul_tflops": round(mm, 3) if flops else ""}
        try:
            res = measure(fn, inputs, grads, cfg.reps, cfg.warmup, device)
            row.update({k: round(val, 3) for k, val in res.items()}, status="ok")
            if flops:
                row["tflops"] = round(flops / (res["total_ms"] * 1e-3) / 1e12, 3)
                row["frac_of_matmul"] = round(row["tflops"] / mm, 3)
        except torch.cuda.OutOfMemoryError:
            row["status"] = "oom"
        except Exception as e:  # a provider's API drift must not end the run
            row["status"] = f"error: {type(e).__name__}: {str(e)[:80]}"
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        print(" | ".join(f"{row.get(k, '')}" for k in ("op", "provider", "N", "D", "V", "dtype", "fwd_ms", "bwd_ms",
                                                      "total_ms", "tflops", "frac_of_matmul", "peak_mem_mib", "status")),
              flush=True)
    return rows


_RSS_CHILD = """
import json, resource, sys, torch
sys.path.insert(0, {kernels!r})
import o1pruner_kernels
which = {which!r}
N, D, V = {n}, {d}, {v}
torch.manual_seed(0)
h = torch.empty(N, D).normal_().requires_grad_()
w = torch.empty(V, D).normal_().mul_(0.02).requires_grad_()
y = torch.randint(0, V, (N,))
g = torch.empty(N).uniform_()
def run(h, w, y):
    if which == "fused":
        return o1pruner_kernels.fused_linear_logprobs(h, w, y, backend="torch")
    return torch.log_softmax(h @ w.T, -1).gather(-1, y[:, None]).squeeze(-1)
run(h[:64], w, y[:64]).sum().backward()  # load libraries before the baseline
h.grad = w.grad = None
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
before = peak()
(run(h, w, y) * g).sum().backward()
print(json.dumps({{"growth": peak() - before}}))
"""


def rss_growth(which: str, n: int, d: int, v: int) -> int:
    code = _RSS_CHILD.format(kernels=str(ROOT / "kernels"), which=which, n=n, d=d, v=v)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["growth"]


def memory_ratio(commit: str) -> list[dict]:
    n, d, v = 8192, 512, 32000
    fused, naive = rss_growth("fused", n, d, v), rss_growth("naive", n, d, v)
    logits = n * v * 4
    print(f"\nCPU peak RSS growth, forward+backward, N={n} D={d} V={v} fp32 (logits alone = {logits / 2**20:.0f} MiB):")
    print(f"  fused_linear_logprobs(backend='torch'): {fused / 2**20:8.1f} MiB")
    print(f"  naive log_softmax(h @ W.T).gather    : {naive / 2**20:8.1f} MiB")
    print(f"  ratio fused / naive                  : {fused / naive:8.3f}")
    base = {"op": "fused_linear", "N": n, "D": d, "V": v, "dtype": "float32", "device": "cpu-rss",
            "commit": commit, "status": "ok"}
    return [{**base, "provider": "kernels-torch", "peak_mem_mib": round(fused / 2**20, 1)},
            {**base, "provider": "eager", "peak_mem_mib": round(naive / 2**20, 1)}]


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def timing_rows(cfg: KernelOpsConfig, device: str, stamp: dict) -> list[dict]:
    """Every (op, shape, provider) timing; on the CPU small shapes, float32 and few repetitions."""
    cuda = device == "cuda"
    if not cuda:
        print("No CUDA device: running only the PyTorch paths (eager, torch.compile, the kernels' torch backend) "
              "at small shapes; timings are CPU wall-clock.")
        cfg = replace(cfg, reps=min(cfg.reps, 3), warmup=1)
    ns = cfg.n or ([1024, 4096, 8192, 16384, 32768] if cuda else [1024])
    ds = cfg.d or ([3584, 5120] if cuda else [256])
    v = cfg.v or (152064 if cuda else 8192)
    dtype = getattr(torch, cfg.dtype if cuda else "float32")
    print("op | provider | N | D | V | dtype | fwd_ms | bwd_ms | total_ms | TFLOP/s | of matmul | peak MiB | status")
    table = {"fused_linear": fused_linear_providers, "logprobs": logprobs_providers, "ratio_loss": ratio_providers}
    rows: list[dict] = []
    for op in cfg.ops:
        providers = table[op](device)
        for n in ns:
            for d in (ds if op == "fused_linear" else ds[:1]):
                rows += bench_shape(op, (n, d, v), dtype, device, cfg, providers, stamp)
    return rows


def output_path(cfg: KernelOpsConfig, device_name: str) -> Path:
    """--out, or runs/kernels/kernels_<device>.csv (under the working directory, like every stage's runs/)."""
    return Path(cfg.out or f"runs/kernels/kernels_{device_name}.csv")


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(KernelOpsConfig, argv, prog="bench/kernel_ops.py")
    cfg.check()
    cuda = torch.cuda.is_available()
    stamp = {"device": torch.cuda.get_device_name().replace(" ", "_") if cuda else "cpu", "commit": _commit()}
    rows = [] if cfg.memory_ratio else timing_rows(cfg, "cuda" if cuda else "cpu", stamp)
    if cfg.memory_ratio or (not cuda and not cfg.skip_memory_ratio):
        rows += memory_ratio(stamp["commit"])
    out = output_path(cfg, stamp["device"])
    out.parent.mkdir(parents=True, exist_ok=True)
    new = not out.exists()
    with out.open("a", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            wr.writeheader()
        wr.writerows(rows)
    print(f"\n{len(rows)} rows appended to {out}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
