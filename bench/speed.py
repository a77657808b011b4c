"""Inference-time benchmark: base and pruned models side by side, same prompts, same settings.

    python bench/speed.py                                   # embedded base vs the latest training run
    python bench/speed.py --models base=Qwen/QwQ-32B-Preview pruned=runs/qwq/train/export \
        --data ../shared/data/math500.jsonl --max-new-tokens 8192

Each model is generated with vLLM in its own worker process (vLLM engines do not share a process
well), one after another: a warm-up (not timed), then greedy decoding and sampling with `--n`
samples per problem (temperature 0.6, top-p 0.95, pass@1 averaged). Results: results.json, a
Markdown table and PNG plots in --out; comparisons are against the first model.

Its configuration is `pruner.configs.SpeedConfig`: the demo and bench/paper_comparisons.py build
one and run it with `pruner.cli.run_stage("bench.speed", cfg)`, without importing this script.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `python bench/speed.py` from a checkout: `bench.*` and `pruner`

from pruner.cli import parse_config, run_stage  # noqa: E402
from pruner.configs import SpeedConfig  # noqa: E402

# The settings of each of SpeedConfig.modes' choices.
MODES = {"greedy": dict(n=1, temperature=0.0, top_p=1.0), "sampled": dict(temperature=0.6, top_p=0.95)}
# Fields that say where results go or how a worker reports, not what is measured: left out of the manifest.
_NOT_MEASURED = ("out", "overwrite", "worker_out")



def latest_export(root: Path = ROOT / "runs") -> Path | None:
    exports = [p for p in root.glob("**/export") if (p / "config.json").exists()]
    return max(exports, key=lambda p: (p / "config.json").stat().st_mtime) if exports else None


def parse_models(specs: list[str]) -> list[tuple[str, str]]:
    from pruner.embedded import default_model_path

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


def check_config(cfg: SpeedConfig, models: list[tuple[str, str]]) -> None:
    """Every flag and every model checked before the first engine starts."""
    from pruner.presample import check_model
    from pruner.problems import check_limit

    check_limit(cfg.limit, "--limit")
    for flag, value, low in (("--n", cfg.n, 1), ("--max-new-tokens", cfg.max_new_tokens, 1),
                             ("--warmup", cfg.warmup, 0)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    names = [name for name, _ in models]
    if len(set(names)) != len(names):
        raise ValueError(f"--models: repeated names in {names}")
    for name, path in models:
        check_model(path, f"--models {name}=")
    unknown = set(cfg.fast_prompt) - set(names)
    if unknown:
        raise ValueError(f"--fast-prompt names {sorted(unknown)} are not among --models {names}")


def model_prompts(cfg: SpeedConfig, models: list[tuple[str, str]]) -> dict[str, dict]:
    """Each model's resolved prompt flags (pruner/families.py: flags, the folder's record, the family's)."""
    from pruner.families import comparison_prompts

    settings = comparison_prompts(models, system_prompt=cfg.system_prompt, suffix=cfg.suffix, think=cfg.think)
    return {name: s.record() for name, s in settings.items()}


def worker_prompts(cfg: SpeedConfig, name: str, path: str, problems: list[dict], tokenizer: Any) -> list[list[int]]:
    """The token ids vLLM gets for the worker's model: rendered as pre-sampling renders them."""
    from pruner.families import resolve_prompt
    from pruner.prompting import FAST_SOLVING_SUFFIX

    settings = resolve_prompt(tokenizer, model=path if Path(path).is_dir() else None, system_prompt=cfg.system_prompt,
                              suffix=cfg.suffix, think=cfg.think)
    if name in cfg.fast_prompt:
        settings = dataclasses.replace(settings, suffix=settings.suffix + FAST_SOLVING_SUFFIX)
    return settings.prompts(tokenizer, [p["problem"] for p in problems])[1]


def claim_out(cfg: SpeedConfig, models: list[tuple[str, str]]) -> Any:
    """Lock --out and check its manifest: results of another comparison are never mixed in."""
    from pruner.manifest import Output, build_manifest, claim_output, file_digest
    from pruner.model_files import model_fingerprint

    data = Path(cfg.data)
    inputs = {"models": {name: model_fingerprint(path) for name, path in models},
              "data": file_digest(data) if data.is_file() else cfg.data}
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_MEASURED}
    config["models"] = [f"{name}={path}" for name, path in models]
    return claim_output(Output.folder(cfg.out), build_manifest("bench", config, inputs),
                        what=f"benchmark folder {cfg.out}", resume=not cfg.overwrite, overwrite=cfg.overwrite,
                        inputs=[p for _, p in models if Path(p).exists()] + ([data] if data.is_file() else []))


def run_worker(cfg: SpeedConfig) -> None:
    """Generate every mode for the one model of `cfg.models` and dump per-sample results as JSON."""
    from pruner.generation import generate, open_llm
    from pruner.grading import grade
    from pruner.model_files import eos_token_ids, load_tokenizer
    from pruner.problems import load_problems

    (name, path), = parse_models(cfg.models)
    problems = load_problems(cfg.data, limit=cfg.limit)
    tokenizer = load_tokenizer(path)
    prompts = worker_prompts(cfg, name, path, problems, tokenizer)
    stop_ids = eos_token_ids(tokenizer, path if Path(path).is_dir() else None)
    longest = max(len(p) for p in prompts)
    llm = open_llm(path, max_model_len=longest + cfg.max_new_tokens, seed=cfg.seed, disable_log_stats=False,
                   log_file=Path(cfg.out) / f"vllm-{name}.log")
    generate(llm, prompts[: cfg.warmup], max_tokens=cfg.max_new_tokens, stop_token_ids=stop_ids)  # warm-up
    runs = []
    for mode in cfg.modes:
        settings = dict(MODES[mode])
        settings.setdefault("n", cfg.n)
        start = time.perf_counter()
        outputs = generate(llm, prompts, max_tokens=cfg.max_new_tokens, seed=cfg.seed, stop_token_ids=stop_ids,
                           **settings)
        wall = time.perf_counter() - start
        samples = [{"problem_id": str(p["id"]), "tokens": len(c.token_ids), "correct": grade(c.text, str(p["answer"])),
                    "truncated": c.finish_reason == "length", "latency_s": c.latency_s,
                    "min_tokens": p.get("min_tokens")}
                   for p, outs in zip(problems, outputs) for c in outs]
        runs.append({"model": name, "model_path": path, "dataset": cfg.data, "mode": mode,
                     "n": settings["n"], "wall_time_s": wall, "samples": samples})
        print(f"{name} {mode}: {len(samples)} samples in {wall:.1f}s", flush=True)
    Path(cfg.worker_out).write_text(json.dumps(runs))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(SpeedConfig, argv, prog="bench/speed.py")
    if cfg.worker_out:
        return run_worker(cfg)
    models = parse_models(cfg.models)
    check_config(cfg, models)
    prompts = model_prompts(cfg, models)  # before any engine: a template that cannot take the prompt fails here
    with claim_out(cfg, models):
        benchmark(cfg, models, prompts)


def benchmark(cfg: SpeedConfig, models: list[tuple[str, str]], prompts: dict[str, dict] | None = None) -> None:
    """One worker process per model (fresh vLLM engine each), then the report in --out."""
    from bench.speed_report import summarize, write_report

    out = Path(cfg.out)
    runs = []
    for name, path in models:
        raw = out / f"raw_{name}.json"
        # The worker is this benchmark narrowed to one model, in a fresh process (one vLLM engine each).
        worker = dataclasses.replace(cfg, models=[f"{name}={path}"], overwrite=False, worker_out=str(raw),
                                     fast_prompt=[name] if name in cfg.fast_prompt else [],
                                     **(prompts or {}).get(name, {}))
        print(f"[{name}] generating with {path}", flush=True)
        run_stage("bench.speed", worker, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        runs.extend(json.loads(raw.read_text()))
    results = summarize(runs)
    table = write_report(results, runs, out)
    print(table)
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'} and plots in {out} (vLLM logs: {out}/vllm-*.log)")


if __name__ == "__main__":
    main()
