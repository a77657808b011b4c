"""Train the embedded long-thought model from scratch and write it as a Hugging Face folder.

    python -m pruner.embedded.build --out pruner/assets/default_model

Plain next-token loss on the response tokens of freshly sampled long-thought traces (the
prompt is the project's chat prompt, as every entry point builds it). Trained as Qwen2 and
exported as the identical Llama network (see `as_llama` for why), with a word-level tokenizer
(`build_tokenizer`). Single process, fixed seeds and thread count, deterministic algorithms:
the same command on the same software rebuilds the same weights bit for bit.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from pruner.cli import parse_config
from pruner.embedded.task import (PARAMS, long_trace, params_hash, problem_text, sample_spec, test_problem_texts,
                                  words)
from pruner.prompting import DEFAULT_SYSTEM_PROMPT, FAST_SOLVING_SUFFIX, build_prompt


@dataclass
class BuildConfig:
    """The model's shape and the training run; defaults are the shipped model's."""

    seed: int = field(default=0, metadata={"help": "seed of the weights' init and of the sampled traces"})
    steps: int = field(default=2000, metadata={"help": "optimizer steps"})
    batch: int = field(default=16, metadata={"help": "traces per step"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate (AdamW)"})
    warmup: int = field(default=60, metadata={"help": "linear warm-up steps, then a cosine decay"})
    min_lr_ratio: float = field(default=0.05, metadata={"help": "the cosine's floor, as a fraction of --lr"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay of the matrices"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clip"})
    # Part of the bit-for-bit contract (CPU kernels reduce per thread): rebuild with the same count.
    threads: int = field(default=2, metadata={"help": "torch threads (the same count rebuilds the same weights)"})
    hidden: int = field(default=128, metadata={"help": "hidden size"})
    layers: int = field(default=3, metadata={"help": "decoder layers"})
    # head_dim = hidden / heads = 64: vLLM's CPU attention rejects smaller heads
    heads: int = field(default=2, metadata={"help": "attention heads (and key/value heads)"})
    intermediate: int = field(default=256, metadata={"help": "MLP intermediate size"})
    max_len: int = field(default=2048, metadata={"help": "RoPE positions (callers use max_model_len up to 2048)"})


@dataclass
class BuildCommand(BuildConfig):
    """Train the embedded default model from scratch into a Hugging Face folder (defaults: the shipped model's)."""

    out: Path | None = field(default=None, metadata={"help": "folder to write the model into (required)"})


# --- The word-level tokenizer, built with the `tokenizers` library ---
# One token per whitespace-separated word: numbers 0..50 are single tokens, which is what makes
# the task's arithmetic learnable by a tiny model. Decoding joins words with single spaces, so
# a trace (written with single spaces) round-trips exactly; any other text round-trips up to
# whitespace, and words outside the vocabulary (another system prompt, say) become <unk>.
PAD, UNK, IM_START, IM_END = "<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>"
SPECIALS = [PAD, UNK, IM_START, IM_END]
SPACE = "\u2581"


def _jinja_literal(text: str) -> str:
    """`text` as a single-quoted Jinja string literal (Jinja unescapes backslashes like Python)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


# ChatML, as Qwen models use it; the generation prompt opens the assistant turn. Like Qwen's own
# templates, a conversation without a system turn gets the model's system prompt (the project's,
# which every training trace was prompted with): prompted "the ordinary way" with only a user
# turn, the model sees exactly the prompt it was trained and profiled on.
CHAT_TEMPLATE = (
    "{% if not messages or messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n' + " + _jinja_literal(DEFAULT_SYSTEM_PROMPT) + " + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def vocabulary() -> list[str]:
    """Specials first (fixed ids), then chat roles, prompt words, and the task's words."""
    vocab = list(SPECIALS) + ["system", "user", "assistant"]
    # The project's own prompts (default and the fast-solving baseline) are known words.
    for text in (DEFAULT_SYSTEM_PROMPT, FAST_SOLVING_SUFFIX):
        vocab += text.split()
    vocab += words()
    return list(dict.fromkeys(vocab))


def build_tokenizer():
    """A transformers fast tokenizer wrapping the word-level `tokenizers` model."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Each word token carries its leading space as "\u2581" (SentencePiece style): token-by-token
    # streaming decoders (vLLM's) then emit the spaces too, not only whole-sequence decoding.
    vocab = {(w if w in SPECIALS else SPACE + w): i for i, w in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),  # newlines and runs of spaces separate words too
        pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=False),
    ])
    core.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="always", split=False)
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token=UNK,
        pad_token=PAD,
        eos_token=IM_END,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def model_config(cfg: BuildConfig, vocab_size: int, tok):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        head_dim=cfg.hidden // cfg.heads,
        max_position_embeddings=cfg.max_len,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tok.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="float32",
    )


class TraceStream:
    """Batches of (prompt + long-thought response) token ids, sampled from a seeded RNG.

    Problems of the test split never appear, so the profile measures unseen problems.
    """

    def __init__(self, tok, seed: int):
        self.tok, self.rng = tok, random.Random(seed)
        self.held_out = test_problem_texts()
        self.pending: list[list[tuple[list[int], list[int]]]] = []

    def example(self) -> tuple[list[int], list[int]]:
        while True:
            start, ops = sample_spec(self.rng, self.rng.randint(PARAMS.min_steps, PARAMS.max_steps))
            problem = problem_text(start, ops)
            if problem not in self.held_out:
                break
        prompt = self.tok.encode(build_prompt(self.tok, problem), add_special_tokens=False)
        text, _ = long_trace(start, ops, self.rng)
        response = self.tok.encode(text, add_special_tokens=False) + [self.tok.eos_token_id]
        return prompt, response

    def batch(self, size: int, bucket: int = 4):
        """Draw `bucket` batches at once and group them by length: far less padding to compute."""
        import torch

        if not self.pending:
            pool = sorted((self.example() for _ in range(size * bucket)), key=lambda pr: len(pr[0]) + len(pr[1]))
            self.pending = [pool[i * size:(i + 1) * size] for i in range(bucket)]
            self.rng.shuffle(self.pending)
        pairs = self.pending.pop()
        width = max(len(p) + len(r) for p, r in pairs)
        ids = torch.full((size, width), self.tok.pad_token_id, dtype=torch.long)
        labels = torch.full((size, width), -100, dtype=torch.long)
        mask = torch.zeros((size, width), dtype=torch.long)
        for row, (p, r) in enumerate(pairs):
            n = len(p) + len(r)
            ids[row, :n] = torch.tensor(p + r)
            labels[row, len(p):n] = torch.tensor(r)  # loss on the response only
            mask[row, :n] = 1
        return ids, labels, mask


def as_llama(qwen):
    """The same network as a LlamaForCausalLM with attention biases (o_proj's set to zero).

    Qwen2 is Llama with q/k/v biases. The export says "llama" because transformers 5 loads any
    "qwen2" folder with its byte-level BPE Qwen2Tokenizer, ignoring the word-level tokenizer.json
    (every word would become an unknown byte); for "llama" it keeps the folder's tokenizer.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    q = qwen.config
    config = LlamaConfig(
        vocab_size=q.vocab_size, hidden_size=q.hidden_size, intermediate_size=q.intermediate_size,
        num_hidden_layers=q.num_hidden_layers, num_attention_heads=q.num_attention_heads,
        num_key_value_heads=q.num_key_value_heads, head_dim=q.head_dim,
        max_position_embeddings=q.max_position_embeddings, rms_norm_eps=q.rms_norm_eps,
        rope_parameters=dict(q.rope_parameters), attention_bias=True, mlp_bias=False,
        tie_word_embeddings=True, bos_token_id=q.bos_token_id, eos_token_id=q.eos_token_id,
        pad_token_id=q.pad_token_id, dtype="float32",
    )
    state = dict(qwen.state_dict())
    for i in range(q.num_hidden_layers):
        state[f"model.layers.{i}.self_attn.o_proj.bias"] = torch.zeros(q.hidden_size)
    llama = LlamaForCausalLM(config)
    llama.load_state_dict(state, strict=False)
    missing = set(llama.state_dict()) - set(state)
    assert not missing - {"lm_head.weight"}, missing  # tied to the embedding
    return llama.eval()


def lr_at(step: int, cfg: BuildConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build(out: Path, cfg: BuildConfig | None = None, log_every: int = 50) -> dict:
    """Train the model and write config, safetensors, tokenizer and build_info.json to `out`."""
    import torch
    from transformers import Qwen2ForCausalLM

    cfg = cfg or BuildConfig()
    t0 = time.time()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True)
    tok = build_tokenizer()
    # Round the vocabulary up so the embedding rows are a friendly multiple.
    vocab_size = (len(tok) + 63) // 64 * 64
    model = Qwen2ForCausalLM(model_config(cfg, vocab_size, tok))
    losses = _train(model, tok, cfg, log_every, t0)
    _export(model, tok, out)
    tail = losses[-min(100, len(losses)):]
    info = {
        "seed": cfg.seed,
        "steps": cfg.steps,
        "build_seconds": round(time.time() - t0, 1),
        "final_loss": round(sum(tail) / len(tail), 5),
        "task_params_hash": params_hash(),
        "task_params": asdict(PARAMS),
        "config": asdict(cfg),
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
        "command": f"python -m pruner.embedded.build --out {out}",
    }
    (out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _train(model, tok, cfg: BuildConfig, log_every: int, t0: float) -> list[float]:
    """AdamW (no decay on vectors) on the response tokens of `cfg.steps` batches; returns the losses."""
    import torch
    import torch.nn.functional as F

    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98),
    )
    stream = TraceStream(tok, cfg.seed)
    losses: list[float] = []
    for step in range(cfg.steps):
        ids, labels, _ = stream.batch(cfg.batch)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        # Right padding only: under the causal mask no real token sees a pad, so no attention
        # mask is needed, and SDPA can take its fused causal path (the masked one is far slower).
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == cfg.steps - 1):
            recent = losses[-log_every:]
            print(f"step {step:5d}  loss {sum(recent) / len(recent):.4f}  lr {lr_at(step, cfg):.2e}  "
                  f"{time.time() - t0:6.1f}s", flush=True)
    return losses


def _export(model, tok, out: Path) -> None:
    """The Llama export, the tokenizer and a generation config holding only the token ids."""
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    export = as_llama(model.eval())
    export.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    # Only the ids: sampling settings belong to the caller (vLLM would adopt them otherwise).
    GenerationConfig(bos_token_id=export.config.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id).save_pretrained(str(out))


def main(argv: list[str] | None = None) -> None:
    command = parse_config(BuildCommand, argv, prog="python -m pruner.embedded.build")
    if command.out is None:
        raise SystemExit("python -m pruner.embedded.build: --out is required (the folder to write the model into)")
    cfg = BuildConfig(**{f.name: getattr(command, f.name) for f in fields(BuildConfig)})
    info = build(Path(command.out), cfg)
    print(json.dumps({k: info[k] for k in ("steps", "build_seconds", "final_loss", "parameters")}))


if __name__ == "__main__":
    main()
