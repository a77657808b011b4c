"""Every pipeline stage's configuration: one dataclass per entry point, a flag per field.

`pruner/cli.py` turns each into its command line (help text, `Literal` choices). They live
together, apart from the stages' code, so that a stage builds another's configuration (the
trainer's on-policy rounds, the demo) without importing that stage and everything it pulls in.
A config checks its own flags in `validate()`; what needs files or a model is checked by its stage.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pruner.prompting import DEFAULT_SYSTEM_PROMPT

LOSSES = ("lh", "sft", "dpo")

# The prompt flags of every stage that prompts a model (pruner/families.py resolves them).
SYSTEM_PROMPT_HELP = ("system prompt ('' for none); default: what the model folder records (o1pruner_sampling.json), "
                      "else the model family's (boxed-answer prompt; none for DeepSeek-R1 distills)")
SUFFIX_HELP = ("text appended to every problem; default: the model folder's record, else the family's (R1 distills: "
               "the boxed-answer instruction)")
THINK_HELP = ("thinking mode: on (open a <think> block after the prompt; Qwen3: enable_thinking), off, or auto "
              "(the model folder's record, else the family's)")


def parse_shard(shard: str) -> tuple[int, int]:
    """`--shard i/n` as (i, n), checked: 0 <= i < n."""
    try:
        index, count = (int(x) for x in shard.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n, got {shard!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"--shard {shard}: need 0 <= i < n")
    return index, count


@dataclass
class PresampleConfig:
    """Pre-sample K graded responses per problem from the reference model with vLLM."""

    model: str = field(default="", metadata={"help": "model folder or hub id; empty = the embedded default model"})
    problems: str = field(default="embedded:train", metadata={"help": "problems: .json/.jsonl/.parquet file, embedded:train|test, or hub id"})
    out: str = field(default="runs/default/samples.jsonl", metadata={"help": "output JSONL (resumed when it exists)"})
    k: int = field(default=8, metadata={"help": "samples per problem (the paper's code: 12-16)"})
    temperature: float = field(default=0.5, metadata={"help": "sampling temperature (the paper's code: 0.5)"})
    top_p: float = field(default=0.8, metadata={"help": "nucleus sampling top-p (the paper's code: 0.8)"})
    max_new_tokens: int = field(default=1024, metadata={"help": "max response tokens (1024 suits the embedded model; the paper uses 8192)"})
    seed: int = field(default=0, metadata={"help": "base seed; each problem samples with a seed derived from it and the problem id"})
    system_prompt: str | None = field(default=None, metadata={"help": SYSTEM_PROMPT_HELP})
    suffix: str | None = field(default=None, metadata={"help": SUFFIX_HELP})
    think: Literal["auto", "on", "off"] = field(default="auto", metadata={"help": THINK_HELP})
    tensor_parallel_size: int = field(default=1, metadata={"help": "GPUs per model replica"})
    data_parallel_size: int = field(default=1, metadata={"help": "model replicas on this node (where vLLM supports it)"})
    shard: str = field(default="0/1", metadata={"help": "i/n: this process samples problems i, i+n, ... (multi-node); output gets a .shard<i>of<n> suffix"})
    limit: int | None = field(default=None, metadata={"help": "only the first N problems (before sharding)"})
    chunk_problems: int = field(default=64, metadata={"help": "problems per vLLM call; the file is appended and fsynced after each"})
    max_model_len: int | None = field(default=None, metadata={"help": "vLLM context length; default = longest prompt + max new tokens"})
    dtype: str = field(default="auto", metadata={"help": "vLLM dtype"})
    problem_field: str | None = field(default=None, metadata={"help": "name of the problem field when not detected"})
    answer_field: str | None = field(default=None, metadata={"help": "name of the answer field when not detected"})
    id_field: str | None = field(default=None, metadata={"help": "name of the id field when not detected"})
    overwrite: bool = field(default=False, metadata={"help": "delete an existing --out (samples, meta, summary) and start afresh"})

    def validate(self) -> None:
        """The flags that need no file: ranges, choices and the shard (the stage checks --limit and --model)."""
        checks = [(self.k >= 1, f"--k must be >= 1, got {self.k}"),
                  (self.temperature >= 0, f"--temperature must be >= 0, got {self.temperature}"),
                  (0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}"),
                  (self.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {self.max_new_tokens}"),
                  (self.chunk_problems >= 1, f"--chunk-problems must be >= 1, got {self.chunk_problems}"),
                  (self.think in ("auto", "on", "off"), f"--think must be auto, on or off, got {self.think!r}")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        parse_shard(self.shard)


@dataclass
class DatasetConfig:
    """Build the O1-Pruner training set (or an SFT/DPO baseline set) from pre-sampled responses."""

    samples: str = field(default="runs/default/samples.jsonl", metadata={"help": "samples JSONL from pruner/presample.py"})
    out: str = field(default="runs/default/trainset", metadata={"help": "output folder"})
    kind: Literal["lh", "sft", "dpo"] = field(default="lh", metadata={"help": "lh (length-harmonizing), sft (shortest correct) or dpo (shortest correct vs longest/wrong)"})
    lam: float = field(default=2.0, metadata={"help": "accuracy weight lambda (the paper: 2 for Marco-o1, 5 for QwQ)"})
    keep_per_problem: int | None = field(default=None, metadata={"help": "keep a random N samples per problem (default all; the paper's code keeps 2)"})
    ref_stats: str | None = field(default=None, metadata={"help": "problem_stats.jsonl (or trainset folder) whose ref_mean_length/ref_mean_accuracy to reward against (on-policy rounds: the first round's)"})
    seed: int = field(default=0, metadata={"help": "seed of the keep-per-problem draw"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer folder/id (default: the model in the samples' meta)"})
    report: bool = field(default=True, metadata={"help": "write the report/ folder (plots, tables)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an --out folder that holds a set built from other samples or settings"})


@dataclass
class TrainConfig:
    """Fine-tune a long-thought model to answer with shorter reasoning (O1-Pruner / LHFT)."""

    model: str = field(default="", metadata={"help": "HF causal-LM folder or hub id; empty = the embedded default model"})
    data: str = field(default="runs/default/trainset", metadata={"help": "training set folder written by pruner/dataset.py"})
    out: str = field(default="runs/default/train", metadata={"help": "run folder: checkpoints, metrics, export"})
    loss: Literal["", "lh", "sft", "dpo"] = field(default="", metadata={"help": "lh = O1-Pruner's clipped ratio loss; sft/dpo = the paper's baselines; empty = from the training set's kind"})
    ratio_level: Literal["sequence", "token"] = field(default="sequence", metadata={"help": "'sequence' (the paper's code: ratio of length-normalised log-probs) or 'token' (PPO/GRPO style)"})
    eps_low: float = field(default=0.2, metadata={"help": "lower clip range of the ratio: clip(r, 1 - eps_low, 1 + eps_high)"})
    eps_high: float = field(default=0.2, metadata={"help": "upper clip range of the ratio"})
    dpo_beta: float = field(default=0.1, metadata={"help": "DPO temperature beta (--loss dpo)"})
    lr: float = field(default=0.0, metadata={"help": "peak learning rate; 0 = 2e-7 for real models (the paper's 7B value), a tuned value for the embedded default"})
    epochs: int = field(default=1, metadata={"help": "passes over the training set per round (the paper: 1)"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many optimizer steps in total (0 = the epochs decide)"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "fraction of steps with linear warm-up before the cosine decay"})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "final learning rate as a fraction of the peak"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=10.0, metadata={"help": "gradient clipping norm (the paper: 10)"})
    global_batch_size: int = field(default=32, metadata={"help": "sequences per optimizer step over all processes"})
    micro_batch_size: int = field(default=8, metadata={"help": "sequences per forward/backward on one process (right-padded); not used when --micro-batch-tokens is set"})
    micro_batch_tokens: int = field(default=0, metadata={"help": "padding-free training: each micro-batch is one packed row of at most N prompt+response tokens (position ids restart per sequence, no attention across sequences), balanced by tokens over processes; also the old-log-prob pass. Rule: when N > 0 it replaces --micro-batch-size, which is then ignored (the step still holds --global-batch-size sequences). N must hold the longest sequence (a DPO pair: both). 0 = padded micro-batches of --micro-batch-size"})
    temperature: float | None = field(default=None, metadata={"help": "temperature the log-probs are taken at; default = the sampling temperature recorded in the training set's meta (1.0 when it has none)"})
    seed: int = field(default=0, metadata={"help": "seed of the data order and of torch"})
    device: Literal["auto", "cuda", "cpu"] = field(default="auto", metadata={"help": "'auto' (cuda when available), 'cuda' or 'cpu'"})
    liger: bool = field(default=True, metadata={"help": "patch Liger-Kernel's RMSNorm/RoPE/SwiGLU into the model on CUDA"})
    activation_checkpointing: bool = field(default=False, metadata={"help": "recompute each decoder block's activations in backward"})
    mixed_precision: bool = field(default=True, metadata={"help": "on CUDA: bf16 parameters in compute, fp32 gradient reduction"})
    meta_init: bool = field(default=True, metadata={"help": "with several processes only rank 0 reads the weights; the others receive their shards"})
    ckpt_every: int = field(default=50, metadata={"help": "save a resumable checkpoint every N steps (and at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "how many recent checkpoints to keep"})
    final_checkpoint: bool = field(default=True, metadata={"help": "save a checkpoint after the last step; --no-final-checkpoint when only the export matters (one checkpoint fewer on disk)"})
    resume: bool = field(default=False, metadata={"help": "continue from the latest checkpoint in --out (same configuration only)"})
    overwrite: bool = field(default=False, metadata={"help": "delete what --out holds (another run's checkpoints, metrics) and start afresh"})
    stop_after: int = field(default=0, metadata={"help": "exit after this many steps, as a preempted run would (after its checkpoint)"})
    max_bad_steps: int = field(default=3, metadata={"help": "stop when this many steps in a row have a NaN/inf loss or gradient"})
    plan_check: bool = field(default=True, metadata={"help": "estimate per-rank memory before loading weights (python -m pruner.plan) and refuse, on CUDA, a run that will not fit; --no-plan-check runs it anyway"})
    export: bool = field(default=True, metadata={"help": "export the final model as a Hugging Face folder <out>/export"})
    tensorboard: bool = field(default=False, metadata={"help": "also write TensorBoard scalars"})
    rounds: int = field(default=1, metadata={"help": "on-policy rounds: > 1 re-samples from the current model between rounds"})
    round_samples: int = field(default=0, metadata={"help": "samples per problem in on-policy rounds (0 = as in the training set)"})
    until_round: int = field(default=0, metadata={"help": "set by the round driver (python -m pruner.rounds): train up to the start of on-policy round N, export the policy there (<out>/round-N/model) with a checkpoint, and exit, so that sampling runs outside torchrun; rounds before N must be on disk; 0 = sample rounds from inside the trainer (CPU only)"})

    def validate(self) -> None:
        """Flag-only checks, before any file is read: a ValueError naming the flag."""
        positive = ("global_batch_size", "micro_batch_size", "epochs", "rounds", "ckpt_every", "keep_checkpoints",
                    "max_bad_steps", "max_grad_norm")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "eps_low", "eps_high", "max_steps", "stop_after", "round_samples",
                     "until_round", "micro_batch_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"--temperature must be positive, got {self.temperature}")
        if not (0 <= self.warmup_ratio < 1 and 0 <= self.min_lr_ratio <= 1):
            raise ValueError(f"--warmup-ratio {self.warmup_ratio} must lie in [0, 1) and --min-lr-ratio "
                             f"{self.min_lr_ratio} in [0, 1]")
        if self.loss not in ("", *LOSSES) or self.ratio_level not in ("sequence", "token"):
            raise ValueError(f"--loss {self.loss!r} (choose one of {LOSSES}) or --ratio-level "
                             f"{self.ratio_level!r} (choose 'sequence' or 'token') is not a choice")
        if self.until_round > self.rounds:
            raise ValueError(f"--until-round {self.until_round} is past the last round (--rounds {self.rounds})")
        if not self.micro_batch_tokens and self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"--global-batch-size {self.global_batch_size} is not divisible by "
                             f"--micro-batch-size {self.micro_batch_size}")


# bench/speed.py's flags: here, not in that script, because the demo and bench/paper_comparisons.py build it
# (and `bench/` is not installed; `pruner.demo` runs it as `python -m bench.speed` from a checkout).
# Published evaluation settings, by name (`--preset`). A flag left unset takes its preset's value; a flag given
# explicitly wins, and the benchmark says so. "o1pruner": the O1-Pruner paper (greedy, 8192 tokens, its code's
# system prompt, its MATH / GSM8K / GaoKao test sets); "dler": DLER and its successors (16 samples at
# T 0.6 / top-p 0.95, 32k tokens, no system turn as R1 distills expect; Minerva and Olympiad are not in
# ../shared/data); "embedded": what suits the embedded default model.
SPEED_PRESETS: dict[str, dict] = {
    "embedded": dict(data=["embedded:test"], modes=["greedy", "sampled"], n=4, temperature=0.6, top_p=0.95,
                     max_new_tokens=1024, system_prompt=DEFAULT_SYSTEM_PROMPT),
    "o1pruner": dict(data=["o1pruner/math_test", "o1pruner/gsm8k", "o1pruner/gaokao"], modes=["greedy"], n=1,
                     temperature=0.0, top_p=1.0, max_new_tokens=8192, system_prompt=DEFAULT_SYSTEM_PROMPT),
    "dler": dict(data=["math500", "aime24", "amc23"], modes=["sampled"], n=16, temperature=0.6, top_p=0.95,
                 max_new_tokens=32768, system_prompt=""),
}


def _preset_help() -> str:
    shown = "; ".join(f"{name}: " + ", ".join(f"{k}={v!r}" for k, v in values.items())
                      for name, values in SPEED_PRESETS.items())
    return f"published settings for every flag left unset (explicit flags win): {shown}"


@dataclass
class SpeedConfig:
    """Inference-time benchmark: base and pruned models side by side, same prompts, same settings."""

    models: list[str] = field(default_factory=list, metadata={"help": "name=path (HF folder or hub id; 'embedded' = the default model); the first is the base of every comparison; none = the embedded base vs the latest runs/*/export. Names: letters, digits, '.', '_', '-', '+' (they name files in --out)"})
    fast_prompt: list[str] = field(default_factory=list, metadata={"help": "names of models prompted with the paper's fast-solving suffix (the prompt baseline)"})
    preset: Literal["embedded", "o1pruner", "dler"] = field(default="embedded", metadata={"help": _preset_help()})
    data: list[str] | None = field(default=None, metadata={"help": "problem sets, one engine start per model for all: math500, gsm8k, aime24, amc23, o1pruner/math_test, o1pruner/gsm8k, o1pruner/gaokao (files of ../shared/data or $O1PRUNER_DATA), embedded:test, a .json/.jsonl/.parquet file, or a hub id org/name[:split]; unset = the preset's"})
    limit: int | None = field(default=None, metadata={"help": "only the first N problems of each set (N >= 1; omit for all)"})
    set_limit: list[str] = field(default_factory=list, metadata={"help": "NAME=N: only the first N problems of the set NAME of --data, in place of --limit for it (e.g. math500=100)"})
    modes: list[Literal["greedy", "sampled"]] | None = field(default=None, metadata={"help": "decoding modes to measure; unset = the preset's"})
    n: int | None = field(default=None, metadata={"help": "samples per problem in the sampled mode (pass@1 averaged); unset = the preset's"})
    temperature: float | None = field(default=None, metadata={"help": "sampled mode's temperature; unset = the preset's"})
    top_p: float | None = field(default=None, metadata={"help": "sampled mode's top-p; unset = the preset's"})
    max_new_tokens: int | None = field(default=None, metadata={"help": "max response tokens; unset = the preset's"})
    system_prompt: str | None = field(default=None, metadata={"help": SYSTEM_PROMPT_HELP + "; unset: each model's record (o1pruner_sampling.json), else the first record among --models, else its family's default (a preset's system prompt is what its paper used, recorded in results.json, not forced on a model sampled otherwise)"})
    suffix: str | None = field(default=None, metadata={"help": SUFFIX_HELP})
    think: Literal["auto", "on", "off"] = field(default="auto", metadata={"help": THINK_HELP})
    warmup: int = field(default=8, metadata={"help": "prompts generated before timing starts"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    out: str = field(default="runs/default/bench", metadata={"help": "results folder"})
    overwrite: bool = field(default=False, metadata={"help": "replace results of another comparison in --out"})
    worker_out: str = field(default="", metadata={"help": "internal: benchmark the one model of --models in this process and write its per-sample results to this JSON file (what the benchmark runs per model)"})
