"""pruner.generation.open_llm's CPU defaults: the engine in this process, batch limits, same seeds."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

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


def _open(tmp_path: Path, extra: dict, env: dict | None = None) -> dict:
    script = tmp_path / "engine.py"
    script.write_text(_SCRIPT)
    base = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    out = subprocess.run([sys.executable, str(script), json.dumps(extra)], capture_output=True, text=True, cwd=ROOT,
                         env={**base, "PYTHONPATH": str(ROOT), **(env or {})}, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.split("RESULT", 1)[1].splitlines()[0])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cpu_engine_runs_in_process_with_raised_limits_and_keeps_seeded_samples(tmp_path):
    pytest.importorskip("vllm")
    first = _open(tmp_path, {})
    # no engine-core or worker process: the engine runs in the caller
    assert first["children"] == 0 and first["env"] == "0"
    assert (first["max_num_seqs"], first["max_num_batched_tokens"]) == (1024, 16384)
    # the engine seed still fixes the samples (a re-done pre-sampling chunk reproduces them)
    again = _open(tmp_path, {"max_num_seqs": 64, "max_num_batched_tokens": 4096})
    assert (again["max_num_seqs"], again["max_num_batched_tokens"]) == (64, 4096)  # callers override
    assert again["texts"] == first["texts"] and len(set(first["texts"])) > 1
    # an explicit environment wins: vLLM's own engine-core process
    separate = _open(tmp_path, {}, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    assert separate["children"] >= 1 and separate["env"] == "1"
