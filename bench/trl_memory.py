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
peak RSS on CPU (ru_maxrss) or torch.cuda.max_memory_allocated on CUDA. Writes runs/trl_memory.json (--out).

    PYTHONPATH=$PWD:$PWD/kernels python bench/trl_memory.py [--variants trl o1pruner logits]
"""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `python bench/trl_memory.py` from a checkout: the repository's modules
from pruner.cli import parse_config, to_argv  # noqa: E402

TOKENIZER_DIR = ROOT / "pruner" / "assets" / "default_model"
Variant = Literal["trl", "o1pruner", "logits"]


@dataclass
class TrlMemoryConfig:
    """Peak memory of one TRL GRPOTrainer step, with and without `patch_grpo_trainer()`."""

    vocab: int = field(default=151936, metadata={"help": "vocabulary size (Qwen2.5's)"})
    hidden: int = field(default=896, metadata={"help": "hidden size (Qwen2.5-0.5B's)"})
    intermediate: int = field(default=4864, metadata={"help": "MLP width (Qwen2.5-0.5B's)"})
    layers: int = field(default=2, metadata={"help": "decoder layers of the random-init model"})
    tokens: int = field(default=4096, metadata={"help": "completion tokens in the batch, in all (a multiple of --batch)"})
    batch: int = field(default=4, metadata={"help": "completions in the batch"})
    prompt: int = field(default=16, metadata={"help": "prompt tokens per sequence"})
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata={"help": "auto: cuda when available"})
    variants: list[Variant] = field(default_factory=lambda: ["trl", "o1pruner"], metadata={
        "help": "trl (TRL as installed), o1pruner (patched), logits (a full-logits baseline, several GB)"})
    out: str = field(default="runs/trl_memory.json", metadata={"help": "JSON report"})
    child: Variant | None = field(default=None, metadata={
        "help": "internal: measure this one variant in this process and print its JSON (the parent starts one "
                "fresh process per variant, so each peak is its own)"})

    def check(self) -> None:
        """Refuse impossible shapes before any model is built."""
        if min(self.tokens, self.batch, self.layers, self.vocab, self.prompt) <= 0 or self.tokens % self.batch:
            raise SystemExit("trl_memory.py: --tokens, --batch, --layers, --vocab and --prompt must be positive, "
                             f"--tokens a multiple of --batch (got --tokens {self.tokens} --batch {self.batch})")


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


def build_trainer(variant: str, cfg: TrlMemoryConfig):
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from o1pruner_kernels.integrations import trl as o1trl

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=14, num_key_value_heads=2,
        tie_word_embeddings=True, max_position_embeddings=cfg.tokens + 64,
    )
    model = Qwen2ForCausalLM(config).to(cfg.device)
    trainer_cls = logits_trainer_class() if variant == "logits" else GRPOTrainer
    grpo_args = GRPOConfig(
        output_dir=str(Path(cfg.out).parent / "trl_memory_tmp"), per_device_train_batch_size=cfg.batch,
        num_generations=cfg.batch, max_completion_length=cfg.tokens // cfg.batch, use_vllm=False,
        bf16=False, use_cpu=cfg.device == "cpu", report_to="none", save_strategy="no", beta=0.0,
        temperature=0.7, entropy_coef=0.01,
    )
    if variant == "o1pruner":
        o1trl.patch_grpo_trainer()
    try:
        return trainer_cls(
            model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=grpo_args,
            train_dataset=Dataset.from_dict({"prompt": ["x"] * cfg.batch}),
            processing_class=AutoTokenizer.from_pretrained(TOKENIZER_DIR),
        )
    finally:
        o1trl.unpatch_grpo_trainer()


def random_batch(cfg: TrlMemoryConfig):
    """The dict GRPOTrainer._prepare_inputs hands to compute_loss: prompts, completions, advantages."""
    import torch

    g = torch.Generator().manual_seed(1)
    completion = cfg.tokens // cfg.batch
    ids = lambda n: torch.randint(0, cfg.vocab, (cfg.batch, n), generator=g).to(cfg.device)  # noqa: E731
    ones = lambda n: torch.ones(cfg.batch, n, dtype=torch.long, device=cfg.device)  # noqa: E731
    return {
        "prompt_ids": ids(cfg.prompt), "prompt_mask": ones(cfg.prompt),
        "completion_ids": ids(completion), "completion_mask": ones(completion),
        "advantages": torch.randn(cfg.batch, generator=g).to(cfg.device),
        "num_items_in_batch": torch.tensor(float(cfg.tokens), device=cfg.device),
    }


def child(variant: str, cfg: TrlMemoryConfig) -> dict:
    import torch

    trainer = build_trainer(variant, cfg)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop sets before compute_loss
    inputs = random_batch(cfg)
    rss_before = current_rss_bytes()
    if cfg.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    if cfg.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {"variant": variant, "loss": loss.item(), "step_seconds": round(seconds, 2)}
    if cfg.device == "cuda":
        peak = torch.cuda.max_memory_allocated()
        result.update(memory="cuda_max_allocated", before_bytes=before, peak_bytes=peak)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result.update(memory="peak_rss", before_bytes=rss_before, peak_bytes=peak)
    result["step_increase_bytes"] = result["peak_bytes"] - result["before_bytes"]
    return result


def run_variant(variant: str, cfg: TrlMemoryConfig) -> dict:
    cmd = [sys.executable, __file__, *to_argv(replace(cfg, child=variant))]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if done.returncode != 0:
        raise RuntimeError(f"variant {variant} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(TrlMemoryConfig, argv, prog="bench/trl_memory.py")
    cfg.check()
    if cfg.device == "auto":
        import torch

        cfg = replace(cfg, device="cuda" if torch.cuda.is_available() else "cpu")
    if cfg.child:
        print(json.dumps(child(cfg.child, cfg)))
        return
    results = {v: run_variant(v, cfg) for v in cfg.variants}  # a child ignores --variants
    gib = 2**30
    for r in results.values():
        print(f"{r['variant']:>9}: peak {r['peak_bytes'] / gib:6.2f} GiB, step +{r['step_increase_bytes'] / gib:6.2f} GiB"
              f" ({r['memory']}), loss {r['loss']:.6f}, {r['step_seconds']} s")
    report = {
        "shape": {k: getattr(cfg, k) for k in ("vocab", "hidden", "layers", "tokens", "batch", "prompt", "device")},
        "config": asdict(cfg),
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
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out)  # a failed run leaves no half-written file
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
