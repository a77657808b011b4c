"""Inference-time benchmark: base and pruned models side by side, same prompts, same settings.

    python bench/speed.py                                   # embedded base vs the latest training run
    python bench/speed.py --models base=Qwen/QwQ-32B-Preview pruned=runs/qwq/train/export \
        --data ../shared/data/math500.jsonl --max-new-tokens 8192

Each model is generated with vLLM in its own worker process (vLLM engines do not share a process
well), one after another: a warm-up (not timed), then greedy decoding and sampling with `--n`
samples per problem (temperature 0.6, top-p 0.95, pass@1 averaged). Results: results.json, a
Markdown table and PNG plots in --out; comparisons are against the first model.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODES = {"greedy": dict(n=1, temperature=0.0, top_p=1.0), "sampled": dict(temperature=0.6, top_p=0.95)}


def latest_export(root: Path = ROOT / "runs") -> Path | None:
    exports = [p for p in root.glob("**/export") if (p / "config.json").exists()]
    return max(exports, key=lambda p: (p / "config.json").stat().st_mtime) if exports else None


def parse_models(specs: list[str] | None) -> list[tuple[str, str]]:
    from pruner import default_model_path

    if not specs:
        pruned = latest_export()
        if pruned is None:
            raise SystemExit("no trained model found under runs/*/export: train one (torchrun pruner/train.py) "
                             "or name models with --models name=path ...")
        return [("base", str(default_model_path())), ("pruned", str(pruned))]
    models = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--models entries look like name=path, got {spec!r}")
        models.append((name, str(default_model_path()) if path == "embedded" else path))
    return models


def check_args(args: argparse.Namespace, models: list[tuple[str, str]]) -> None:
    """Every flag and every model checked before the first engine starts."""
    from pruner.problems import check_limit
    from pruner.presample import check_model

    check_limit(args.limit, "--limit")
    for flag, value, low in (("--n", args.n, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                             ("--warmup", args.warmup, 0)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    names = [name for name, _ in models]
    if len(set(names)) != len(names):
        raise ValueError(f"--models: repeated names in {names}")
    for name, path in models:
        check_model(path, f"--models {name}=")
    unknown = set(args.fast_prompt) - set(names)
    if unknown:
        raise ValueError(f"--fast-prompt names {sorted(unknown)} are not among --models {names}")


def claim_out(args: argparse.Namespace, models: list[tuple[str, str]]) -> Any:
    """Lock --out and check its manifest: results of another comparison are never mixed in."""
    from pruner.manifest import Output, build_manifest, claim_output, file_digest
    from pruner.model_files import model_fingerprint

    data = Path(args.data)
    inputs = {"models": {name: model_fingerprint(path) for name, path in models},
              "data": file_digest(data) if data.is_file() else args.data}
    config = {k: v for k, v in vars(args).items() if k not in ("worker", "model_name", "model_path", "worker_out",
                                                                "overwrite", "out")}
    config["models"] = [f"{name}={path}" for name, path in models]
    return claim_output(Output.folder(args.out), build_manifest("bench", config, inputs),
                        what=f"benchmark folder {args.out}", resume=not args.overwrite, overwrite=args.overwrite,
                        inputs=[p for _, p in models if Path(p).exists()] + ([data] if data.is_file() else []))


def run_worker(args: argparse.Namespace) -> None:
    """Generate every mode for one model and dump per-sample results as JSON."""
    from pruner.problems import load_problems
    from pruner.generation import generate, open_llm
    from pruner.grading import grade
    from pruner.model_files import load_tokenizer
    from pruner.prompting import FAST_SOLVING_SUFFIX, build_prompt

    problems = load_problems(args.data, limit=args.limit)
    tokenizer = load_tokenizer(args.model_path)
    suffix = FAST_SOLVING_SUFFIX if args.fast_prompt else ""
    prompts = [build_prompt(tokenizer, p["problem"], suffix=suffix) for p in problems]
    longest = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    llm = open_llm(args.model_path, max_model_len=longest + args.max_new_tokens, seed=args.seed,
                   disable_log_stats=False)
    generate(llm, prompts[: args.warmup], max_tokens=args.max_new_tokens)  # warm-up, not timed
    runs = []
    for mode in args.modes:
        settings = dict(MODES[mode])
        settings.setdefault("n", args.n)
        start = time.perf_counter()
        outputs = generate(llm, prompts, max_tokens=args.max_new_tokens, seed=args.seed, **settings)
        wall = time.perf_counter() - start
        samples = [{"problem_id": str(p["id"]), "tokens": len(c.token_ids), "correct": grade(c.text, str(p["answer"])),
                    "truncated": c.finish_reason == "length", "latency_s": c.latency_s,
                    "min_tokens": p.get("min_tokens")}
                   for p, outs in zip(problems, outputs) for c in outs]
        runs.append({"model": args.model_name, "model_path": args.model_path, "dataset": args.data, "mode": mode,
                     "n": settings["n"], "wall_time_s": wall, "samples": samples})
        print(f"{args.model_name} {mode}: {len(samples)} samples in {wall:.1f}s", flush=True)
    Path(args.worker_out).write_text(json.dumps(runs))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", help="name=path (HF folder or hub id; 'embedded' = the default model); "
                   "the first is the base of every comparison")
    p.add_argument("--fast-prompt", nargs="*", default=[], help="names of models prompted with the paper's "
                   "fast-solving suffix (the prompt baseline)")
    p.add_argument("--data", default="embedded:test", help="problems: a file of ../shared/data, embedded:test, or a hub id")
    p.add_argument("--limit", type=int, default=None, help="only the first N problems (N >= 1; omit for all)")
    p.add_argument("--modes", nargs="*", default=["greedy", "sampled"], choices=sorted(MODES))
    p.add_argument("--n", type=int, default=4, help="samples per problem in the sampled mode (pass@1 averaged)")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=8, help="prompts generated before timing starts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "runs" / "default" / "bench"))
    p.add_argument("--overwrite", action="store_true", help="replace results of another comparison in --out")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-name", help=argparse.SUPPRESS)
    p.add_argument("--model-path", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.fast_prompt = bool(args.fast_prompt)
        return run_worker(args)
    models = parse_models(args.models)
    check_args(args, models)
    with claim_out(args, models):
        _benchmark(args, models)


def _benchmark(args: argparse.Namespace, models: list[tuple[str, str]]) -> None:
    from bench.speed_report import summarize, write_report

    out = Path(args.out)
    runs = []
    for name, path in models:
        raw = out / f"raw_{name}.json"
        cmd = [sys.executable, __file__, "--worker", "--model-name", name, "--model-path", path, "--data", args.data,
               "--modes", *args.modes, "--n", str(args.n), "--max-new-tokens", str(args.max_new_tokens),
               "--warmup", str(args.warmup), "--seed", str(args.seed), "--worker-out", str(raw)]
        if args.limit is not None:
            cmd += ["--limit", str(args.limit)]
        if name in args.fast_prompt:
            cmd += ["--fast-prompt", "yes"]
        print(f"[{name}] generating with {path}", flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        runs.extend(json.loads(raw.read_text()))
    results = summarize(runs)
    table = write_report(results, runs, out)
    print(table)
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'} and plots in {out}")


if __name__ == "__main__":
    main()
