"""One training step of this trainer against the paper code's recipe, at the same batch.

ours : one model; reference log-probs precomputed once (DESIGN §1.4); token log-probs from the
       fused kernel (no [N, V] logits); the fused clipped-ratio loss.
paper: the policy AND a second reference model forwarded every step; full fp32 logits,
       log_softmax + gather; the same loss in plain PyTorch.

Each recipe runs in its own process (`--recipe`), so peak memory is that recipe's alone. Run
`python bench/train_step.py` (it launches both and writes a JSON + Markdown comparison), or under
`torchrun --nproc_per_node 1` on a GPU to include FSDP2 as the trainer uses it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

PRESETS = {  # architectures of real models, built with random weights (nothing is downloaded)
    "qwen2.5-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "cpu-small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=768, vocab_size=32000, tie_word_embeddings=False),
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def build_model(preset: str, device: torch.device):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**PRESETS[preset], max_position_embeddings=32768, rope_theta=1e6)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def make_batch(vocab: int, batch: int, seq: int, device: torch.device):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = ids.roll(-1, dims=1)
    labels[:, : seq // 4] = -100   # the prompt
    labels[:, -1] = -100
    adv = torch.randn(batch, generator=g)
    return ids.to(device), labels.to(device), adv.to(device)


def _peak(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_recipe(args) -> dict:
    import o1pruner_kernels
    from pruner import distributed
    from pruner.modeling import TokenLogprobs

    d = distributed.init(args.device)
    device = d.device
    lm = build_model(args.preset, device)
    n_params = sum(p.numel() for p in lm.parameters())
    policy = TokenLogprobs(lm)
    ref_lm = build_model(args.preset, device) if args.recipe == "paper" else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    if d.enabled:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" else None
        kw = {"mp_policy": mp} if mp else {}
        # The root is what the recipe calls: our log-prob wrapper, or the HF models themselves.
        for model, root in ((lm, policy if args.recipe == "ours" else lm), (ref_lm, ref_lm)):
            if model is None:
                continue
            for block in model.model.layers:
                fully_shard(block, **kw)
            fully_shard(root, **kw)
        autocast = torch.autocast(device.type, enabled=False)
    if args.activation_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    ids, labels, adv = make_batch(lm.config.vocab_size, args.batch, args.seq, device)
    mask = labels != -100
    attn = torch.ones_like(ids)
    if args.recipe == "ours":
        with torch.no_grad(), autocast:  # precomputed once before training, not part of a step
            old = policy(ids, attn, labels).float()

    def paper_logps(model, grad: bool):
        with torch.set_grad_enabled(grad), autocast:
            logits = model(input_ids=ids, attention_mask=attn).logits.float()
        lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return lp * mask

    def step() -> float:
        if args.recipe == "ours":
            with autocast:
                logps = policy(ids, attn, labels)
            loss, _ = o1pruner_kernels.clipped_ratio_loss(logps, old, adv, mask)
        else:
            ref = paper_logps(ref_lm, grad=False)
            logps = paper_logps(lm, grad=True)
            n = mask.sum(1).clamp(min=1)
            ratio = torch.exp((logps - ref).sum(1) / n)
            loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 10.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    tokens = args.batch * args.seq
    median = statistics.median(times)
    flops = 6 * n_params * tokens + (2 * n_params * tokens if args.recipe == "paper" else 0)
    result = {"recipe": args.recipe, "preset": args.preset, "device": torch.cuda.get_device_name(device)
              if device.type == "cuda" else platform.processor() or "cpu", "batch": args.batch, "seq": args.seq,
              "params": n_params, "step_time_s": median, "tokens_per_s": tokens / median,
              "peak_memory_gib": _peak(device), "fsdp": d.enabled}
    if device.type == "cuda":
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in result["device"]), None)
        useful = 6 * n_params * tokens / median / 1e12  # the model FLOPs a step must do, not the recipe's extra
        result["model_tflops"] = useful
        result["mfu"] = useful / peak if peak else None
    distributed.shutdown()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-small", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--recipe", choices=["ours", "paper"], help="run one recipe in this process (internal)")
    p.add_argument("--torchrun", action="store_true", help="launch each recipe under torchrun (FSDP2, 1 process)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()
    if args.recipe:
        print("RESULT " + json.dumps(run_recipe(args)), flush=True)
        return
    results = []
    for recipe in ("ours", "paper"):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] \
            if args.torchrun else [sys.executable]
        cmd = launcher + [__file__, "--recipe", recipe] + [a for a in sys.argv[1:] if a != "--torchrun"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            sys.exit(f"{recipe} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        results.append(json.loads(line[len("RESULT "):]))
    ours, paper = results
    summary = {"runs": results, "speedup": paper["step_time_s"] / ours["step_time_s"],
               "peak_memory_ratio": ours["peak_memory_gib"] / paper["peak_memory_gib"]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"train_step_{args.preset}_{'cuda' if torch.cuda.is_available() else 'cpu'}"
    (out / f"{tag}.json").write_text(json.dumps(summary, indent=2))
    lines = ["| recipe | step time (s) | tokens/s | peak memory (GiB) |", "|---|---|---|---|"]
    lines += [f"| {r['recipe']} | {r['step_time_s']:.3f} | {r['tokens_per_s']:.0f} | {r['peak_memory_gib']:.2f} |"
              for r in results]
    lines.append(f"\nours is {summary['speedup']:.2f}x faster per step at "
                 f"{summary['peak_memory_ratio']:.2f}x the paper recipe's peak memory "
                 f"({args.preset}, batch {args.batch} x {args.seq} tokens, {results[0]['device']})")
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
