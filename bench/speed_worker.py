"""The per-model worker of `bench/speed.py`: one vLLM engine for every set and mode of one model.

The parent starts it as `python -m bench.speed --worker-out FILE` with the benchmark's configuration
narrowed to one model (every preset value already filled in). It writes FILE once, at the end: either
{"runs": [...], "engine_start_s": ..., ...} or {"error": "one line"}; an error's traceback goes to the
model's vLLM log in --out, not to the console.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import traceback
from pathlib import Path
from typing import Any

from bench.speed_procs import exit_with_parent
from bench.speed_sets import load_sets, resolve_sets
from pruner.configs import SpeedConfig

THINK_END = "</think>"


# The settings of each of SpeedConfig.modes' choices (sampled: the config's n, temperature and top-p).
MODES = {"greedy": dict(n=1, temperature=0.0, top_p=1.0), "sampled": dict()}


def mode_settings(cfg: SpeedConfig, mode: str) -> dict[str, Any]:
    """Sampling settings of a mode: greedy is one deterministic answer; sampled takes the config's n, T, top-p."""
    return dict(MODES[mode]) or dict(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p)


def model_prompts(tokenizer: Any, problems: list[dict], cfg: SpeedConfig, name: str, path: str) -> list[list[int]]:
    """The one place the benchmark turns problems into a model's prompt token ids (the parent's context check
    and the worker's generation both call it), rendered as pre-sampling renders them (pruner/families.py):
    ids, never strings, so no engine adds a second BOS."""
    from pruner.families import resolve_prompt
    from pruner.prompting import FAST_SOLVING_SUFFIX

    settings = resolve_prompt(tokenizer, model=path if Path(path).is_dir() else None, system_prompt=cfg.system_prompt,
                              suffix=cfg.suffix, think=cfg.think)
    if name in cfg.fast_prompt:
        settings = dataclasses.replace(settings, suffix=settings.suffix + FAST_SOLVING_SUFFIX)
    return settings.prompts(tokenizer, [p["problem"] for p in problems])[1]


def set_prompts(tokenizer: Any, problems: dict[str, list[dict]], cfg: SpeedConfig, name: str, path: str
                ) -> dict[str, list[list[int]]]:
    """`model_prompts` of every set, by label, resolved and rendered in one call (the family's checks and
    warnings once per model, not once per set)."""
    joined = [p for probs in problems.values() for p in probs]
    ids = model_prompts(tokenizer, joined, cfg, name, path)
    out, start = {}, 0
    for label, probs in problems.items():
        out[label], start = ids[start:start + len(probs)], start + len(probs)
    return out


def think_end_ids(tokenizer: Any) -> list[int] | None:
    """For a model whose template thinks: the ids of `</think>` when they spell it exactly (R1 distills,
    QwQ and Qwen3 have it as one added token), else [] (the response text is split instead).
    None: no thinking to split off."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if "<think>" not in (json.dumps(template) if isinstance(template, dict) else template):
        return None
    ids = tokenizer(THINK_END, add_special_tokens=False)["input_ids"]
    return ids if tokenizer.decode(ids) == THINK_END else []


def thinking_tokens(token_ids: list[int], text: str, end_ids: list[int], tokenizer: Any) -> int:
    """Tokens of a response up to and including `</think>`; all of them when the block never closes."""
    width = len(end_ids)
    if width:
        for i in range(len(token_ids) - width + 1):
            if token_ids[i:i + width] == end_ids:
                return i + width
    at = text.find(THINK_END)
    if at < 0:
        return len(token_ids)
    # No exact ids to look for: count the tokens of the text up to the tag.
    return min(len(token_ids), len(tokenizer(text[:at + len(THINK_END)], add_special_tokens=False)["input_ids"]))


def _records(problems: list[dict], outputs: list, tokenizer: Any, end_ids: list[int] | None) -> list[dict]:
    from pruner.grading import grade

    records = []
    for p, outs in zip(problems, outputs):
        for c in outs:
            think = thinking_tokens(c.token_ids, c.text, end_ids, tokenizer) if end_ids is not None else None
            records.append({"problem_id": str(p["id"]), "tokens": len(c.token_ids),
                            "correct": grade(c.text, str(p["answer"])), "truncated": c.finish_reason == "length",
                            "latency_s": c.latency_s, "min_tokens": p.get("min_tokens"), "thinking_tokens": think})
    return records


def benchmark_model(cfg: SpeedConfig, name: str, path: str) -> dict[str, Any]:
    """Every set in every mode with one engine; per-sample records and the engine's start time."""
    from pruner.generation import generate, open_llm
    from pruner.model_files import eos_token_ids, load_tokenizer

    start = time.perf_counter()
    sets = resolve_sets(cfg.data)
    problems = load_sets(sets, cfg.data, cfg.limit, cfg.set_limit)
    tokenizer = load_tokenizer(path)
    prompts = set_prompts(tokenizer, problems, cfg, name, path)
    stop_ids = eos_token_ids(tokenizer, path if Path(path).is_dir() else None)  # generation_config's EOS ids too
    longest = max(len(ids) for ps in prompts.values() for ids in ps)
    engine_start = time.perf_counter()
    llm = open_llm(path, max_model_len=longest + cfg.max_new_tokens, seed=cfg.seed, disable_log_stats=False,
                   log_file=Path(cfg.out) / f"vllm-{name}.log")
    exit_with_parent()  # again: the engine may have set handlers of its own
    engine_s = time.perf_counter() - engine_start
    generate(llm, prompts[sets[0].label][: cfg.warmup], max_tokens=cfg.max_new_tokens,
             stop_token_ids=stop_ids)  # warm-up, not timed
    end_ids = think_end_ids(tokenizer)
    runs = []
    for s in sets:
        for mode in cfg.modes:
            settings = mode_settings(cfg, mode)
            began = time.perf_counter()
            outputs = generate(llm, prompts[s.label], max_tokens=cfg.max_new_tokens, seed=cfg.seed,
                               stop_token_ids=stop_ids, **settings)
            wall = time.perf_counter() - began
            runs.append({"model": name, "model_path": path, "dataset": s.label, "dataset_source": s.source,
                         "mode": mode, "n": settings["n"], "wall_time_s": wall,
                         "samples": _records(problems[s.label], outputs, tokenizer, end_ids)})
            print(f"{name} {s.label} {mode}: {len(runs[-1]['samples'])} samples in {wall:.1f}s", flush=True)
    return {"runs": runs, "engine_start_s": engine_s, "worker_s": time.perf_counter() - start}


def run_worker(cfg: SpeedConfig) -> int:
    """The worker's entry: its result, or its error as one line, in cfg.worker_out; the exit code."""
    exit_with_parent()
    name, _, path = cfg.models[0].partition("=")
    try:
        result, code = benchmark_model(cfg, name, path), 0
    except Exception as exc:  # noqa: BLE001 - every failure reaches the parent as one line
        message = " ".join(f"{type(exc).__name__}: {exc}".split())
        log = Path(cfg.out) / f"vllm-{name}.log"
        with open(log, "a") as fh:
            fh.write(f"\nbench/speed.py worker {name} failed:\n{traceback.format_exc()}")
        result, code = {"error": message, "log": str(log)}, 1
    tmp = Path(f"{cfg.worker_out}.tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, cfg.worker_out)
    return code
