"""pruner.generation.open_llm's CPU defaults: the engine in this process, batch limits, same seeds, a quiet console."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from conftest import run_script

_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import psutil
    from pruner import default_model_path, default_problems
    from pruner.generation import generate, open_llm
    from pruner.prompting import build_prompt

    if __name__ == "__main__":
        extra = json.loads(sys.argv[1])
        llm = open_llm(str(default_model_path()), dtype="float32", max_model_len=1024, seed=7, **extra)
        tok = llm.get_tokenizer()
        prompts = [build_prompt(tok, p["problem"]) for p in default_problems("test")[:4]]
        outs = generate(llm, prompts, n=2, temperature=1.0, top_p=1.0, max_tokens=48)
        sched = llm.llm_engine.vllm_config.scheduler_config
        print("RESULT" + json.dumps({
            "children": len(psutil.Process().children(recursive=True)),
            "env": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING"),
            "max_num_seqs": sched.max_num_seqs, "max_num_batched_tokens": sched.max_num_batched_tokens,
            "texts": [c.text for cs in outs for c in cs]}))
""")


def _open(tmp_path: Path, extra: dict, monkeypatch: pytest.MonkeyPatch, env: dict | None = None,
          console: list | None = None) -> dict:
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)  # open_llm's default decides
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)  # an earlier test's `import trl` sets it to ERROR
    out = run_script(tmp_path, _SCRIPT, json.dumps(extra), env=env, timeout=400)
    if console is not None:
        console.extend((out.stdout + out.stderr).splitlines())
    return json.loads(out.stdout.split("RESULT", 1)[1].splitlines()[0])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cpu_engine_runs_in_process_with_raised_limits_and_keeps_seeded_samples(tmp_path, monkeypatch):
    pytest.importorskip("vllm")
    console: list[str] = []
    log = tmp_path / "run" / "vllm.log"
    first = _open(tmp_path, {"log_file": str(log)}, monkeypatch, console=console)
    # no engine-core or worker process: the engine runs in the caller
    assert first["children"] == 0 and first["env"] == "0"
    assert (first["max_num_seqs"], first["max_num_batched_tokens"]) == (1024, 16384)
    # vLLM's INFO lines and start-up output are in the log file, not on the console
    text = log.read_text()
    assert "Initializing a V1 LLM engine" in text and "NUMA" in text
    assert not [line for line in console if "INFO" in line or "NUMA" in line], console
    assert len(console) <= 3, console  # the engine's start line, the RESULT line
    # the engine seed still fixes the samples (a re-done pre-sampling chunk reproduces them)
    again = _open(tmp_path, {"max_num_seqs": 64, "max_num_batched_tokens": 4096}, monkeypatch)
    assert (again["max_num_seqs"], again["max_num_batched_tokens"]) == (64, 4096)  # callers override
    assert again["texts"] == first["texts"] and len(set(first["texts"])) > 1
    # an explicit environment wins: vLLM's own engine-core process
    separate = _open(tmp_path, {}, monkeypatch, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    assert separate["children"] >= 1 and separate["env"] == "1"


def test_expected_vllm_warnings_go_to_the_log_only_and_others_wait_for_the_console(tmp_path, capsys, monkeypatch):
    import logging

    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)  # importing trl sets it to ERROR

    from pruner.generation import route_vllm_logging

    def record(level: int, message: str) -> logging.LogRecord:
        return logging.makeLogRecord({"name": "vllm.some.module", "levelno": level,
                                      "levelname": logging.getLevelName(level), "msg": message})

    log = tmp_path / "vllm.log"
    console = route_vllm_logging(log)
    vllm = logging.getLogger("vllm")
    try:
        assert vllm.level == logging.INFO and not vllm.propagate and len(vllm.handlers) == 2
        console.held = []  # the engine is starting: stderr points at the log
        for level, message in ((logging.WARNING, "Attempted to load weight w with dtype torch.float32 into bfloat16"),
                               (logging.WARNING, "the model's context is shorter than max_model_len"),
                               (logging.INFO, "Resolved architecture: X")):
            vllm.handle(record(level, message))  # as a record from a vllm.* module reaches it
        assert capsys.readouterr().err == ""
        console.show_held()
        vllm.handle(record(logging.ERROR, "Attempted to load weight: failed"))  # errors always show
        err = capsys.readouterr().err
        assert "shorter than max_model_len" in err and "Attempted to load weight: failed" in err
        assert "bfloat16" not in err and "Resolved" not in err
        text = log.read_text()
        assert all(w in text for w in ("bfloat16", "shorter than", "Resolved architecture", "failed"))
    finally:
        for handler in list(vllm.handlers):
            vllm.removeHandler(handler)
            handler.close()
