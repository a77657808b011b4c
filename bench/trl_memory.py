"""Peak memory of one TRL GRPOTrainer step, with and without `patch_grpo_trainer()`, at a large vocabulary.

Variants, each in a fresh process so each peak is its own:
  trl      : TRL's GRPOTrainer as installed (trl 1.16 scores with its own chunked fused LM head)
  o1pruner : the same trainer after `o1pruner_kernels.integrations.trl.patch_grpo_trainer()`
  logits   : (opt-in) a GRPOTrainer whose scoring builds the full [B, T, V] logits, then
             log_softmax + gather and the entropy, as TRL scored before it had a fused head.
             A baseline written here, not TRL code; it needs several GB at the default size.

The model is a random-init Qwen2 with Qwen2.5-0.5B's vocabulary and width (V = 151936, D = 896) and
`--layers` layers; the batch is `--batch` random completions of `--tokens` tokens in all, scored by
TRL's own `compute_loss` + backward (generation is not part of the measurement). Peak memory is the
peak RSS on CPU (ru_maxrss) or torch.cuda.max_memory_allocated on CUDA. Writes runs/trl_memory.json.

    PYTHONPATH=$PWD:$PWD/kernels python bench/trl_memory.py [--variants trl,o1pruner,logits]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = ROOT / "pruner" / "assets" / "default_model"
VARIANTS = ("trl", "o1pruner", "logits")


def current_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def logits_trainer_class():
    """GRPOTrainer whose per-token scoring materialises the logits (the pre-fused-head way)."""
    import torch
    from trl import GRPOTrainer

    class LogitsGRPOTrainer(GRPOTrainer):
        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                               batch_size=None, compute_entropy=False, **_):
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            logits = logits[:, -logits_to_keep - 1:-1].float() / self.temperature  # [B, T, V]
            logp_all = torch.log_softmax(logits, -1)
            logps = logp_all.gather(-1, input_ids[:, -logits_to_keep:, None]).squeeze(-1)
            entropy = -(logp_all.exp() * logp_all).sum(-1) if compute_entropy else None
            return logps, entropy, None

    return LogitsGRPOTrainer


def build_trainer(variant: str, args):
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from o1pruner_kernels.integrations import trl as o1trl

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=14, num_key_value_heads=2,
        tie_word_embeddings=True, max_position_embeddings=args.tokens + 64,
    )
    model = Qwen2ForCausalLM(config).to(args.device)
    trainer_cls = logits_trainer_class() if variant == "logits" else GRPOTrainer
    grpo_args = GRPOConfig(
        output_dir=str(ROOT / "runs" / "trl_memory_tmp"), per_device_train_batch_size=args.batch,
        num_generations=args.batch, max_completion_length=args.tokens // args.batch, use_vllm=False,
        bf16=False, use_cpu=args.device == "cpu", report_to="none", save_strategy="no", beta=0.0,
        temperature=0.7, entropy_coef=0.01,
    )
    if variant == "o1pruner":
        o1trl.patch_grpo_trainer()
    try:
        return trainer_cls(
            model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=grpo_args,
            train_dataset=Dataset.from_dict({"prompt": ["x"] * args.batch}),
            processing_class=AutoTokenizer.from_pretrained(TOKENIZER_DIR),
        )
    finally:
        o1trl.unpatch_grpo_trainer()


def random_batch(args):
    """The dict GRPOTrainer._prepare_inputs hands to compute_loss: prompts, completions, advantages."""
    import torch

    g = torch.Generator().manual_seed(1)
    completion = args.tokens // args.batch
    ids = lambda n: torch.randint(0, args.vocab, (args.batch, n), generator=g).to(args.device)  # noqa: E731
    ones = lambda n: torch.ones(args.batch, n, dtype=torch.long, device=args.device)  # noqa: E731
    return {
        "prompt_ids": ids(args.prompt), "prompt_mask": ones(args.prompt),
        "completion_ids": ids(completion), "completion_mask": ones(completion),
        "advantages": torch.randn(args.batch, generator=g).to(args.device),
        "num_items_in_batch": torch.tensor(float(args.tokens), device=args.device),
    }


def child(variant: str, args) -> dict:
    import torch

    trainer = build_trainer(variant, args)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop sets before compute_loss
    inputs = random_batch(args)
    rss_before = current_rss_bytes()
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {"variant": variant, "loss": loss.item(), "step_seconds": round(seconds, 2)}
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated()
        result.update(memory="cuda_max_allocated", before_bytes=before, peak_bytes=peak)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result.update(memory="peak_rss", before_bytes=rss_before, peak_bytes=peak)
    result["step_increase_bytes"] = result["peak_bytes"] - result["before_bytes"]
    return result


def run_variant(variant: str, argv: list[str]) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", variant, *argv], capture_output=True, text=True, env=dict(os.environ)
    )
    if done.returncode != 0:
        raise RuntimeError(f"variant {variant} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--intermediate", type=int, default=4864)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tokens", type=int, default=4096, help="completion tokens in the batch, in all")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens per sequence")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--variants", default="trl,o1pruner")
    p.add_argument("--out", default=str(ROOT / "runs" / "trl_memory.json"))
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    bad = set(args.variants.split(",")) - set(VARIANTS)
    if bad or args.tokens % args.batch or min(args.tokens, args.batch, args.layers, args.vocab) <= 0:
        p.error(f"unknown variants {sorted(bad)}" if bad else "--tokens must be a positive multiple of --batch")
    return args


def main() -> None:
    argv = sys.argv[1:]
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    results = {v: run_variant(v, argv) for v in args.variants.split(",")}  # a child ignores --variants
    gib = 2**30
    for r in results.values():
        print(f"{r['variant']:>9}: peak {r['peak_bytes'] / gib:6.2f} GiB, step +{r['step_increase_bytes'] / gib:6.2f} GiB"
              f" ({r['memory']}), loss {r['loss']:.6f}, {r['step_seconds']} s")
    report = {
        "shape": {k: getattr(args, k) for k in ("vocab", "hidden", "layers", "tokens", "batch", "prompt", "device")},
        "host": platform.node(), "results": results,
        "note": "CPU peak RSS includes the model, its gradients and the interpreter; timings on a shared machine are noisy",
    }
    if "trl" in results and "o1pruner" in results:
        t, o = results["trl"], results["o1pruner"]
        report["peak_ratio_trl_over_o1pruner"] = t["peak_bytes"] / o["peak_bytes"]
        report["step_increase_ratio_trl_over_o1pruner"] = t["step_increase_bytes"] / max(o["step_increase_bytes"], 1)
        print(f"peak ratio TRL / patched: {report['peak_ratio_trl_over_o1pruner']:.2f}x; "
              f"step increase ratio: {report['step_increase_ratio_trl_over_o1pruner']:.2f}x")
    if "logits" in results and "o1pruner" in results:
        report["peak_ratio_logits_over_o1pruner"] = results["logits"]["peak_bytes"] / results["o1pruner"]["peak_bytes"]
        print(f"peak ratio full-logits / patched: {report['peak_ratio_logits_over_o1pruner']:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out)  # a failed run leaves no half-written file
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
