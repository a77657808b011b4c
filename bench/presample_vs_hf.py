"""Pre-sampling throughput: vLLM (pruner.generation) vs Hugging Face `transformers.generate`.

Same model, same prompts (the first N problems x K samples), same sampling settings, same
machine, one run each. Engine/model load time is reported separately and excluded from the
rates: pre-sampling pays it once per run, the rate is what scales with the data.

    python bench/presample_vs_hf.py                          # embedded model, 32 problems x 8
    python bench/presample_vs_hf.py --model /models/x --problems data.jsonl --max-new-tokens 2048

HF batches `--hf-batch-problems` problems x K sequences (left padding) and decodes until the
longest sequence of the batch stops: that padding waste is part of what vLLM's continuous
batching removes, so it is measured, not corrected for.

`--skip-hf` with `--engine` / `--max-num-seqs` / `--max-num-batched-tokens` times vLLM alone
under other engine settings (A/B runs of `pruner.generation.open_llm`'s defaults):

    python bench/presample_vs_hf.py --skip-hf --num-problems 100 --engine multiprocess \
        --max-num-seqs 256 --max-num-batched-tokens 4096 --out runs/bench/ab_old.json
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

# `python bench/<this>.py` from a checkout: `bench.*` and `pruner` come from the repository root
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pruner.cli import parse_config  # noqa: E402


@dataclass
class PresampleVsHfConfig:
    """Pre-sampling throughput: vLLM (pruner.generation) vs Hugging Face `transformers.generate`."""

    model: str = field(default="", metadata={"help": "model folder (default: the embedded model)"})
    problems: str = field(default="embedded:train", metadata={"help": "problems: a file, embedded:train|test, or a hub id"})
    num_problems: int = field(default=32, metadata={"help": "the first N problems"})
    k: int = field(default=8, metadata={"help": "samples per problem"})
    temperature: float = field(default=0.5, metadata={"help": "sampling temperature"})
    top_p: float = field(default=0.8, metadata={"help": "nucleus sampling top-p"})
    max_new_tokens: int = field(default=1024, metadata={"help": "max response tokens"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    hf_batch_problems: int = field(default=4, metadata={"help": "problems per HF generate call (x K sequences)"})
    skip_hf: bool = field(default=False, metadata={"help": "time vLLM only (engine A/B runs)"})
    engine: Literal["auto", "in-process", "multiprocess"] = field(default="auto", metadata={"help": "vLLM V1 engine core in this process or in its own (auto: open_llm's default)"})
    max_num_seqs: int = field(default=0, metadata={"help": "vLLM batch limit (0: open_llm's default)"})
    max_num_batched_tokens: int = field(default=0, metadata={"help": "vLLM tokens per step (0: open_llm's default)"})
    out: str = field(default="runs/bench/presample_vs_hf.json", metadata={"help": "report JSON"})


def _problems_and_prompts(args: PresampleVsHfConfig):
    from pruner.problems import load_problems
    from pruner.model_files import load_tokenizer
    from pruner.families import resolve_prompt

    tok = load_tokenizer(args.model)
    problems = load_problems(args.problems, limit=args.num_problems)
    _, ids = resolve_prompt(tok, model=args.model).prompts(tok, [p["problem"] for p in problems])
    return tok, problems, ids


def _cpu_seconds() -> float:
    """CPU time of this process and its live children (vLLM's engine-core and worker processes):
    on a shared machine it moves far less with the neighbours' load than wall time does."""
    import psutil

    procs = [psutil.Process()]
    procs += procs[0].children(recursive=True)
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def run_vllm(args: PresampleVsHfConfig, prompt_ids: list[list[int]]) -> dict:
    from pruner.generation import generate, open_llm

    engine: dict = {"in_process": {"auto": None, "in-process": True, "multiprocess": False}[args.engine]}
    for key in ("max_num_seqs", "max_num_batched_tokens"):
        if getattr(args, key):
            engine[key] = getattr(args, key)
    t0 = time.perf_counter()
    llm = open_llm(args.model, max_model_len=max(map(len, prompt_ids)) + args.max_new_tokens, seed=args.seed,
                   log_file=Path(args.out).parent / "vllm.log", **engine)
    load_s = time.perf_counter() - t0
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    outs = generate(llm, prompt_ids, n=args.k, temperature=args.temperature, top_p=args.top_p,
                    max_tokens=args.max_new_tokens, seed=args.seed)
    gen_s, cpu_s = time.perf_counter() - t0, _cpu_seconds() - cpu0
    tokens = sum(len(c.token_ids) for cs in outs for c in cs)
    config = llm.llm_engine.vllm_config.scheduler_config
    return {"load_s": load_s, "generate_s": gen_s, "cpu_s": cpu_s, "samples": sum(map(len, outs)), "new_tokens": tokens,
            "truncated": sum(c.finish_reason == "length" for cs in outs for c in cs),
            "engine": {"in_process": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0",
                       "max_num_seqs": config.max_num_seqs,
                       "max_num_batched_tokens": config.max_num_batched_tokens}}


def run_hf(args: PresampleVsHfConfig, tok, prompt_ids: list[list[int]]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from pruner.model_files import eos_token_ids

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    eos = eos_token_ids(tok, args.model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    torch.manual_seed(args.seed)
    samples = tokens = truncated = 0
    t0 = time.perf_counter()
    for start in range(0, len(prompt_ids), args.hf_batch_problems):
        batch = prompt_ids[start : start + args.hf_batch_problems]
        width = max(map(len, batch))
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=args.temperature,
                                 top_p=args.top_p, top_k=0, max_new_tokens=args.max_new_tokens,
                                 num_return_sequences=args.k, eos_token_id=eos, pad_token_id=pad)
        for row in out[:, width:].tolist():
            stop = next((i for i, t in enumerate(row) if t in eos), None)
            tokens += (stop + 1) if stop is not None else len(row)
            truncated += stop is None
            samples += 1
    gen_s = time.perf_counter() - t0
    return {"load_s": load_s, "generate_s": gen_s, "samples": samples, "new_tokens": tokens, "truncated": truncated}


def main(argv: list[str] | None = None) -> None:
    args = parse_config(PresampleVsHfConfig, argv, prog="bench/presample_vs_hf.py")
    if not args.model:
        from pruner.embedded import default_model_path

        args.model = str(default_model_path())
    import torch

    tok, problems, prompt_ids = _problems_and_prompts(args)
    # HF first: on CPU the vLLM engine runs in this process and pins torch's thread count afterwards.
    hf = None if args.skip_hf else run_hf(args, tok, prompt_ids)
    results = {"vllm": run_vllm(args, prompt_ids), **({"hf": hf} if hf else {})}
    for r in results.values():
        r["samples_per_s"] = r["samples"] / r["generate_s"]
        r["tokens_per_s"] = r["new_tokens"] / r["generate_s"]
    report = {
        "settings": asdict(args),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        **results,
    }
    if "hf" in results:
        report["speedup_samples_per_s"] = results["vllm"]["samples_per_s"] / results["hf"]["samples_per_s"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'':6} {'load s':>8} {'gen s':>8} {'samples':>8} {'tokens':>8} {'samples/s':>10} {'tokens/s':>10}")
    for name, r in results.items():
        print(f"{name:6} {r['load_s']:8.1f} {r['generate_s']:8.1f} {r['samples']:8d} {r['new_tokens']:8d} "
              f"{r['samples_per_s']:10.2f} {r['tokens_per_s']:10.1f}")
    if "hf" in results:
        print(f"vLLM / HF samples/s: {report['speedup_samples_per_s']:.2f}x")
    print(f"-> {args.out} (vLLM log: {Path(args.out).parent / 'vllm.log'})")


if __name__ == "__main__":
    main()
