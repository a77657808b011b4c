"""Inference-time benchmark: base and pruned models side by side, same prompts, same settings.

    python bench/speed.py                                   # embedded base vs the latest training run
    python bench/speed.py --data embedded:test math500 gsm8k --limit 50
    python bench/speed.py --data embedded:test math500 gsm8k --set-limit math500=100 gsm8k=100
    python bench/speed.py --preset o1pruner --models base=Qwen/QwQ-32B-Preview pruned=runs/qwq/train/export

Each model is generated with vLLM in its own worker process (vLLM engines do not share a process
well), one after another, one engine start per model for all the sets of `--data`: a warm-up (not
timed), then per set greedy decoding and sampling with `--n` samples per problem (pass@1 averaged).
`--preset` fills every setting left unset (`--help` lists them). Results: results.json, a Markdown
table (one row per set and model plus the average, paired bootstrap intervals) and PNG plots in --out;
comparisons are against the first model.

Everything a user can get wrong is checked before the first engine starts: every model, every set
(a file without a usable answer too), names that become files, and each model's context against
`--max-new-tokens`. A worker's error reaches the console as one line; a stop signal to this process
ends its workers first (bench/speed_procs.py).

Its configuration is `pruner.configs.SpeedConfig`: the demo and bench/paper_comparisons.py build
one and run it with `pruner.cli.run_stage("bench.speed", cfg)`, without importing this script.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `python bench/speed.py` from a checkout: `bench.*` and `pruner`

from pruner.cli import parse_config, to_argv  # noqa: E402
from pruner.configs import SPEED_PRESETS, SpeedConfig  # noqa: E402

PROMPT_KEYS = ("system_prompt",)  # a preset records them; each model is prompted as it was sampled
# Fields that say where results go or how a worker reports, not what is measured: left out of the manifest.
_NOT_MEASURED = ("out", "overwrite", "worker_out")


def latest_export(root: Path = ROOT / "runs") -> Path | None:
    exports = [p for p in root.glob("**/export") if (p / "config.json").exists()]
    return max(exports, key=lambda p: (p / "config.json").stat().st_mtime) if exports else None


def parse_models(specs: list[str]) -> list[tuple[str, str]]:
    from bench.speed_sets import check_model_name
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
        models.append((check_model_name(name), str(default_model_path()) if path == "embedded" else path))
    return models


def apply_preset(cfg: SpeedConfig) -> tuple[SpeedConfig, list[str]]:
    """Every unset setting from `--preset`; returns the filled config and one line per explicit flag that
    differs from the preset (the explicit flag wins)."""
    preset = SPEED_PRESETS[cfg.preset]
    filled, notes = {}, []
    for key, value in preset.items():
        if key in PROMPT_KEYS:  # each model is prompted as it was sampled (pruner/families.py), not as a paper's
            continue
        given = getattr(cfg, key)
        if given is None:
            filled[key] = value
        elif given != value:
            flag = "--" + key.replace("_", "-")
            notes.append(f"{flag} {given!r} overrides preset {cfg.preset}'s {value!r}")
    return dataclasses.replace(cfg, **filled), notes


def check_config(cfg: SpeedConfig, models: list[tuple[str, str]]) -> None:
    """Every flag, model and set checked before the first engine starts (cfg: preset applied)."""
    from bench.speed_sets import resolve_sets, set_limits
    from pruner.presample import check_model

    for flag, value, low in (("--n", cfg.n, 1), ("--max-new-tokens", cfg.max_new_tokens, 1),
                             ("--warmup", cfg.warmup, 0), ("--temperature", cfg.temperature, 0)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if not 0 < cfg.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {cfg.top_p}")
    if not cfg.modes:
        raise ValueError("--modes needs at least one of greedy, sampled")
    names = [name for name, _ in models]
    if len(set(names)) != len(names):
        raise ValueError(f"--models: repeated names in {names}")
    for name, path in models:
        check_model(path, f"--models {name}=")
    unknown = set(cfg.fast_prompt) - set(names)
    if unknown:
        raise ValueError(f"--fast-prompt names {sorted(unknown)} are not among --models {names}")
    set_limits(resolve_sets(cfg.data), cfg.data, cfg.limit, cfg.set_limit)


def check_inputs(cfg: SpeedConfig, models: list[tuple[str, str]], prompts: dict[str, dict] | None = None
                 ) -> dict[str, int]:
    """Load every set (a set with no usable answer fails here) and check each model's context against its
    longest prompt + --max-new-tokens: what a worker would find only after its engine started.
    Returns problems per set."""
    from bench.speed_sets import load_sets, resolve_sets
    from pruner.model_files import load_tokenizer

    problems = load_sets(resolve_sets(cfg.data), cfg.data, cfg.limit, cfg.set_limit)
    for name, path in models:
        context = _context_length(path)
        if context is None:
            continue
        if cfg.max_new_tokens >= context:
            raise ValueError(f"--max-new-tokens {cfg.max_new_tokens} does not fit model {name}'s context of "
                             f"{context} tokens (max_position_embeddings of {path})")
        tokenizer = load_tokenizer(path)
        model_cfg = dataclasses.replace(cfg, **(prompts or {}).get(name, {}))
        for label, ids in _prompts_or_error(tokenizer, problems, model_cfg, name, path).items():
            probs, lengths = problems[label], [len(x) for x in ids]
            worst = max(range(len(lengths)), key=lengths.__getitem__)
            if lengths[worst] + cfg.max_new_tokens > context:
                raise ValueError(f"--data {label}, problem {probs[worst]['id']}: prompt of {lengths[worst]} tokens + "
                                 f"--max-new-tokens {cfg.max_new_tokens} exceeds model {name}'s context of "
                                 f"{context} tokens (max_position_embeddings of {path})")
    return {label: len(probs) for label, probs in problems.items()}


def _prompts_or_error(tokenizer: Any, problems: dict[str, list[dict]], cfg: SpeedConfig, name: str,
                      path: str) -> dict[str, list[list[int]]]:
    """The model's prompt ids of every set; a template that cannot render them (some refuse a system turn)
    is a ValueError."""
    from bench.speed_worker import set_prompts

    try:
        return set_prompts(tokenizer, problems, cfg, name, path)
    except Exception as exc:  # noqa: BLE001 - jinja's TemplateError and the template's own raise_exception
        if isinstance(exc, ValueError) and "chat template" in str(exc):
            raise
        raise ValueError(f"model {name}: its chat template cannot render the prompt with --system-prompt "
                         f"{cfg.system_prompt!r} ({type(exc).__name__}: {exc}); pass --system-prompt '' "
                         "if the template has no system turn") from None


def _context_length(path: str) -> int | None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    config = getattr(config, "text_config", None) or config  # multimodal wrappers keep it one level down
    return getattr(config, "max_position_embeddings", None)


def prompt_settings(cfg: SpeedConfig, models: list[tuple[str, str]]) -> dict[str, dict]:
    """Each model's resolved prompt flags (pruner/families.py: flags, the folder's record, the family's); the
    worker gets them as explicit flags, so it renders exactly what was resolved here."""
    from pruner.families import comparison_prompts

    settings = comparison_prompts(models, system_prompt=cfg.system_prompt, suffix=cfg.suffix, think=cfg.think)
    return {name: s.record() for name, s in settings.items()}


def claim_out(cfg: SpeedConfig, models: list[tuple[str, str]]) -> Any:
    """Lock --out and check its manifest: results of another comparison are never mixed in."""
    from bench.speed_sets import resolve_sets
    from pruner.manifest import Output, build_manifest, claim_output, file_digest
    from pruner.model_files import model_fingerprint

    sets = resolve_sets(cfg.data)
    files = [Path(s.source) for s in sets if Path(s.source).is_file()]
    inputs = {"models": {name: model_fingerprint(path) for name, path in models},
              "data": {s.label: file_digest(Path(s.source)) if Path(s.source).is_file() else s.source
                       for s in sets}}
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_MEASURED}
    config["models"] = [f"{name}={path}" for name, path in models]
    return claim_output(Output.folder(cfg.out), build_manifest("bench", config, inputs),
                        what=f"benchmark folder {cfg.out}", resume=not cfg.overwrite, overwrite=cfg.overwrite,
                        inputs=[p for _, p in models if Path(p).exists()] + files)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(SpeedConfig, argv, prog="bench/speed.py")
    if cfg.worker_out:
        from bench.speed_worker import run_worker

        raise SystemExit(run_worker(cfg))
    cfg, overrides = apply_preset(cfg)
    for line in overrides:
        print(f"bench/speed.py: {line}", file=sys.stderr, flush=True)
    try:
        models = parse_models(cfg.models)
        check_config(cfg, models)
        prompts = prompt_settings(cfg, models)  # each model prompted as it was sampled (pruner/families.py)
        sizes = check_inputs(cfg, models, prompts)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"bench/speed.py: error: {exc}") from None
    print("sets: " + ", ".join(f"{label} ({n} problems)" for label, n in sizes.items()), flush=True)
    with claim_out(cfg, models):
        benchmark(cfg, models, overrides, prompts)


def _run_worker(cfg: SpeedConfig, name: str, path: str, prompt: dict | None = None) -> dict:
    """One model's worker in a fresh process (one vLLM engine); its result, or SystemExit with its error."""
    from bench import speed_procs

    raw = Path(cfg.out) / f"raw_{name}.json"
    raw.unlink(missing_ok=True)
    worker = dataclasses.replace(cfg, models=[f"{name}={path}"], overwrite=False, worker_out=str(raw),
                                 fast_prompt=[name] if name in cfg.fast_prompt else [], **(prompt or {}))
    cmd = [sys.executable, "-m", "bench.speed", *to_argv(worker)]
    print(f"[{name}] generating with {path}\n$ {shlex.join(cmd)}", flush=True)
    code = speed_procs.run_worker(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                  on_start=lambda pid: print(f"[{name}] worker pid {pid}", flush=True))
    result = json.loads(raw.read_text()) if raw.is_file() else None
    if result is None or "error" in result:
        why = result["error"] if result else f"the worker exited with code {code} without a result"
        where = result.get("log") if result else str(Path(cfg.out) / f"vllm-{name}.log")
        raise SystemExit(f"bench/speed.py: error: model {name}: {why} (details: {where})")
    return result


def benchmark(cfg: SpeedConfig, models: list[tuple[str, str]], overrides: list[str] = (),
              prompts: dict[str, dict] | None = None) -> None:
    """One worker process per model (fresh vLLM engine each, all sets), then the report in --out."""
    from bench.speed_report import summarize, write_report

    out = Path(cfg.out)
    runs, timing = [], {}
    for name, path in models:
        result = _run_worker(cfg, name, path, (prompts or {}).get(name))
        runs.extend(result["runs"])
        timing[name] = {"engine_start_s": result["engine_start_s"], "worker_s": result["worker_s"]}
    results = summarize(runs)
    results["settings"] = {"preset": cfg.preset, "preset_values": SPEED_PRESETS[cfg.preset],
                           "used": {k: getattr(cfg, k) for k in SPEED_PRESETS[cfg.preset]},
                           "overrides": list(overrides), "limit": cfg.limit, "set_limit": list(cfg.set_limit),
                           "seed": cfg.seed}
    results["timing"] = timing
    table = write_report(results, runs, out)
    print(table)
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'} and plots in {out} (vLLM logs: {out}/vllm-*.log)")


if __name__ == "__main__":
    main()
