"""What `bench/gpu_check.sh` trains on where nothing can be downloaded: a random-weight model of a
real architecture saved as a Hugging Face folder, and a small synthetic training set.

The model: pruner/presets.py's config (e.g. qwen2.5-1.5b), random init, bf16 safetensors, with the
embedded default model's tokenizer (its ids all lie below the architecture's vocabulary, which the
embedding rows beyond the tokenizer simply pad). The training set: samples in pre-sampling's record
format (random token ids, `--response-tokens` long, half correct), turned into a training set by
the project's own writer, `pruner.dataset.build_trainset`.

    python bench/trainer_fixture.py --arch qwen2.5-1.5b --response-tokens 4096 --out runs/gpu_fixture
"""
from __future__ import annotations

import json
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

import torch  # noqa: E402

from pruner.cli import parse_config  # noqa: E402


@dataclass
class FixtureConfig:
    """A random-weight model of a real architecture and a small synthetic training set for it."""

    arch: str = field(default="qwen2.5-1.5b", metadata={"help": "architecture preset of pruner/presets.py"})
    response_tokens: int = field(default=4096, metadata={"help": "tokens per synthetic response"})
    problems: int = field(default=4, metadata={"help": "synthetic problems"})
    k: int = field(default=4, metadata={"help": "samples per problem"})
    device: Literal["cuda", "cpu"] = field(default="cuda" if torch.cuda.is_available() else "cpu",
                                           metadata={"help": "where the model is initialised (cuda when available)"})
    out: str = field(default="runs/gpu_fixture", metadata={"help": "folder for model/, samples.jsonl and trainset/"})


def build_model_folder(arch: str, out: Path, device: str) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pruner.embedded import default_model_path
    from pruner.presets import config_for

    tokenizer = AutoTokenizer.from_pretrained(str(default_model_path()))
    config = config_for(arch, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, dtype="bfloat16")
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"the embedded tokenizer ({len(tokenizer)} tokens) does not fit {arch}'s vocabulary")
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def write_samples(path: Path, model_dir: Path, *, problems: int, k: int, response_tokens: int, seed: int = 0) -> Path:
    """Records and meta in the samples file format (pruner/samples.py), with random response token ids."""
    from transformers import AutoTokenizer

    from pruner.configs import PresampleConfig
    from pruner.manifest import write_manifest
    from pruner.prompting import build_prompt
    from pruner.samples import make_record, meta_path, rewrite_samples, samples_manifest

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rng = random.Random(seed)
    special = set(tok.all_special_ids)
    ordinary = [i for i in range(len(tok)) if i not in special]
    records = []
    for p in range(problems):
        prompt = build_prompt(tok, f"What is {p} + {p}?")
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        for s in range(k):
            n = response_tokens - rng.randrange(max(1, response_tokens // 16))  # lengths differ a little
            ids = [rng.choice(ordinary) for _ in range(n - 1)] + [tok.eos_token_id]
            correct = (p + s) % 2 == 0
            records.append(make_record(problem_id=f"p{p}", sample_index=s, prompt=prompt, prompt_token_ids=prompt_ids,
                                       response=tok.decode(ids), response_token_ids=ids, finish_reason="stop",
                                       extracted_answer=str(2 * p if correct else 2 * p + 1), correct=correct,
                                       answer=str(2 * p)))
    path.parent.mkdir(parents=True, exist_ok=True)
    rewrite_samples(path, records)
    # The dataset stage trusts no samples file without its meta: write the one pre-sampling would.
    cfg = PresampleConfig(model=str(model_dir), problems="gpu-check-fixture", out=str(path), k=k,
                          max_new_tokens=response_tokens, seed=seed)
    write_manifest(meta_path(path), samples_manifest(cfg, str(model_dir), tok))
    return path


def main(argv: list[str] | None = None) -> None:
    args = parse_config(FixtureConfig, argv, prog="bench/trainer_fixture.py")
    from pruner.dataset import build_trainset

    out = Path(args.out)
    model_dir = build_model_folder(args.arch, out / "model", args.device)
    samples = write_samples(out / "samples.jsonl", model_dir, problems=args.problems, k=args.k,
                            response_tokens=args.response_tokens)
    trainset = build_trainset(samples, out / "trainset", lam=2.0, tokenizer=str(model_dir), report=False)
    print(json.dumps({"model": str(model_dir), "trainset": str(trainset)}))


if __name__ == "__main__":
    main()
