"""bench/speed.py as papers report it, and its failure cases: several sets, presets, paired intervals, the
thinking/answer split; names that become paths, sets and contexts checked before any engine, worker errors
as one line, and no worker outliving a stopped benchmark (real signals, real processes)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bench.speed_report import markdown, summarize, write_report
from bench.speed_sets import (KNOWN_SETS, check_model_name, data_root, resolve_set, resolve_sets, safe_filename,
                              set_limits)
from bench.speed_stats import Paired, bootstrap, includes

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _speed(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/speed.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def _samples(rows: list[tuple[str, int, bool]], *, truncated: int = 0, thinking: list[int] | None = None) -> list[dict]:
    return [{"problem_id": pid, "tokens": t, "correct": c, "truncated": i < truncated, "latency_s": 0.1,
             "min_tokens": None, "thinking_tokens": thinking[i] if thinking else None}
            for i, (pid, t, c) in enumerate(rows)]


def _run(model: str, dataset: str, samples: list[dict], wall: float = 1.0, mode: str = "sampled") -> dict:
    return {"model": model, "model_path": f"/m/{model}", "dataset": dataset, "mode": mode, "n": 1,
            "wall_time_s": wall, "samples": samples}


# --- the sets and the names that become paths ---

def test_known_set_names_map_to_the_shared_files_and_unknown_names_list_them():
    for name, file in KNOWN_SETS.items():
        if (data_root() / file).is_file():
            assert resolve_set(name).source == str(data_root() / file) and resolve_set(name).label == name
    assert resolve_set("embedded:test").source == "embedded:test"
    assert resolve_set("org/some-set:test").source == "org/some-set:test"  # a hub id passes
    for bad in ("mathh500", "o1pruner/gsm8", "embedded:dev", "../escape"):
        with pytest.raises(ValueError, match="is not a known set: use one of math500, gsm8k, aime24, amc23, "
                                             "o1pruner/math_test, o1pruner/gsm8k, o1pruner/gaokao, embedded:test"):
            resolve_set(bad)
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_set("missing/problems.jsonl")
    with pytest.raises(ValueError, match="twice"):
        resolve_sets(["embedded:test", "embedded:test"])


def test_set_limit_overrides_limit_for_the_sets_it_names(tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")
    names = ["embedded:test", str(data), "embedded:train"]
    sets = resolve_sets(names)
    # by the name given to --data or by the set's label (a file's stem)
    assert set_limits(sets, names, 40, ["embedded:test=400", "mine=3"]) == {
        "embedded:test": 400, "mine": 3, "embedded:train": 40}
    assert set_limits(sets, names, None, [f"{data}=5"]) == {"embedded:test": None, "mine": 5, "embedded:train": None}
    for bad, message in ((["math500=3"], "'math500' is not one of the sets of --data"),
                         (["mine=0"], "--set-limit mine must be a positive number"),
                         (["mine"], "look like NAME=N"), (["mine=x"], "look like NAME=N"),
                         (["mine=2", f"{data}=3"], "names the set")):
        with pytest.raises(ValueError, match=message):
            set_limits(sets, names, None, bad)


def test_names_that_become_files_cannot_leave_the_output_folder(tmp_path):
    for bad in ("../escape", "..", ".hidden", "a/b", "a\\b", "", "x" * 65, "a b"):
        with pytest.raises(ValueError, match="names files in --out"):
            check_model_name(bad)
    assert check_model_name("o1-pruner-lam2") == "o1-pruner-lam2"
    # A set's label (a path, a name with '/') becomes a plot's file name: mapped, never a path.
    for label in ("../../escape", "o1pruner/gaokao", "embedded:test", "/abs/path"):
        name = safe_filename(label)
        assert "/" not in name and ".." not in name and not name.startswith(".") and Path(name).name == name
    assert safe_filename("math500") == "math500" and safe_filename("a/b") != safe_filename("a:b")
    out = tmp_path / "out"
    out.mkdir()
    raws = [_run(m, d, _samples([("1", 10, True), ("2", 20, False)])) for m in ("base", "p") for d in ("../../escape", "x")]
    write_report(summarize(raws), raws, out)
    assert {p.parent for p in tmp_path.rglob("*") if p.is_file()} == {out}


def test_a_model_name_with_dots_and_slashes_is_refused_before_anything_is_written(tmp_path):
    # It used to write escape.log next to --out.
    out = tmp_path / "sub" / "out"
    proc = _speed("--models", "base=embedded", "../escape=embedded", "--limit", "1", "--out", str(out))
    assert proc.returncode != 0 and "--models name '../escape'" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not list(tmp_path.rglob("*escape*")) and not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--data", "mathh500"], "is not a known set: use one of math500"),
    (["--set-limit", "math500=5"], "--set-limit 'math500=5': 'math500' is not one of the sets of --data"),
    (["--max-new-tokens", "100000"], "--max-new-tokens 100000 does not fit model base's context of 2048 tokens"),
    (["--max-new-tokens", "2040"], "exceeds model base's context of 2048 tokens"),
])
def test_bad_sets_and_contexts_are_refused_before_any_engine(tmp_path, args, message):
    out = tmp_path / "out"
    proc = _speed("--models", "base=embedded", "twin=embedded", *args, "--out", str(out))
    assert proc.returncode != 0 and "bench/speed.py: error: " in proc.stderr and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "generating with" not in proc.stdout and not out.exists()


def test_a_template_without_a_system_turn_and_a_system_prompt_are_refused_before_any_engine(tmp_path, tiny_model_dir):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
                               "supported') }}{% endif %}" + config["chat_template"])
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in (model / "chat_template.jinja",):
        extra.unlink(missing_ok=True)
    out = tmp_path / "out"
    proc = _speed("--models", f"base={model}", "--max-new-tokens", "8", "--out", str(out))
    assert proc.returncode != 0 and "this chat template cannot render a system turn" in proc.stderr, proc.stderr
    assert "System role not supported" in proc.stderr and "Traceback" not in proc.stderr and not out.exists()


def test_a_set_without_a_usable_answer_is_refused_before_any_engine(tmp_path):
    # Before: the worker failed on it after its engine started, and the parent raised CalledProcessError.
    data = tmp_path / "noanswer.jsonl"
    data.write_text(json.dumps({"problem": "1+1?", "solution": "two"}) + "\n")
    out = tmp_path / "out"
    proc = _speed("--models", "base=embedded", "twin=embedded", "--data", "embedded:test", str(data),
                  "--out", str(out))
    assert proc.returncode != 0 and "--data noanswer" in proc.stderr and "no problem with a usable answer" in proc.stderr
    assert "Traceback" not in proc.stderr and "CalledProcessError" not in proc.stderr
    assert "generating with" not in proc.stdout and not out.exists()


def test_a_worker_reports_its_error_as_one_line_in_its_result(tmp_path):
    # The worker itself (no parent check in front): the error is one line in its result file, the traceback
    # in the model's log, none on the console.
    data = tmp_path / "noanswer.jsonl"
    data.write_text(json.dumps({"problem": "1+1?"}) + "\n")
    raw = tmp_path / "raw_base.json"
    proc = subprocess.run([sys.executable, "-m", "bench.speed", "--models", "base=/nowhere", "--data", str(data),
                           "--max-new-tokens", "8", "--modes", "greedy", "--out", str(tmp_path),
                           "--worker-out", str(raw)], cwd=ROOT, capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    result = json.loads(raw.read_text())
    assert "\n" not in result["error"] and "no problem with a usable answer" in result["error"]
    assert "Traceback" in (tmp_path / "vllm-base.log").read_text()


def test_the_parent_turns_a_failed_worker_into_one_line(tmp_path):
    # A real worker process that fails (here: called past the parent's own checks, on a set without answers);
    # the parent's error is its message in one line, not a CalledProcessError.
    from bench.speed import _run_worker, apply_preset
    from pruner.configs import SpeedConfig

    data = tmp_path / "noanswer.jsonl"
    data.write_text(json.dumps({"problem": "1+1?"}) + "\n")
    cfg, _ = apply_preset(SpeedConfig(data=[str(data)], modes=["greedy"], out=str(tmp_path)))
    with pytest.raises(SystemExit) as stop:
        _run_worker(cfg, "base", "/nowhere")
    message = str(stop.value.code)
    assert message.startswith("bench/speed.py: error: model base: ValueError: --data noanswer") and "\n" not in message
    assert "no problem with a usable answer" in message and "vllm-base.log" in message


# --- presets ---

def test_a_preset_fills_what_is_unset_and_explicit_flags_win_out_loud():
    from bench.speed import apply_preset
    from pruner.cli import parse_config
    from pruner.configs import SPEED_PRESETS, SpeedConfig

    cfg, notes = apply_preset(parse_config(SpeedConfig, ["--preset", "dler", "--n", "2", "--top-p", "0.95"]))
    dler = SPEED_PRESETS["dler"]
    assert (cfg.n, cfg.top_p, cfg.temperature, cfg.max_new_tokens, cfg.system_prompt, cfg.data, cfg.modes) == \
        (2, 0.95, dler["temperature"], dler["max_new_tokens"], None, dler["data"], dler["modes"])
    # a preset's system prompt is recorded, not forced: each model is prompted as it was sampled (families)
    assert notes == ["--n 2 overrides preset dler's 16"]  # an explicit value equal to the preset's is no override
    for name, values in SPEED_PRESETS.items():
        assert {"max_new_tokens", "n", "temperature", "top_p", "system_prompt"} <= values.keys()
        filled, notes = apply_preset(SpeedConfig(preset=name))
        assert notes == [] and all(getattr(filled, k) == v for k, v in values.items() if k != "system_prompt")
        assert filled.system_prompt is None
    assert apply_preset(SpeedConfig())[0].max_new_tokens == 1024  # the embedded default is unchanged


def test_help_lists_every_preset_with_its_values():
    proc = _speed("--help")
    text = " ".join(proc.stdout.split())
    assert "o1pruner: data=['o1pruner/math_test', 'o1pruner/gsm8k', 'o1pruner/gaokao'], modes=['greedy'], n=1" in text
    assert "dler: data=['math500', 'aime24', 'amc23'], modes=['sampled'], n=16, temperature=0.6, top_p=0.95" in text


# --- intervals ---

def test_the_bootstrap_is_paired_over_problems():
    rng = np.random.default_rng(1)
    base = rng.integers(10, 1000, size=200).astype(float)
    # Every problem halved: lengths vary 100-fold between problems, yet the paired ratio is exactly 0.5.
    p = Paired(np.ones(200), base, np.ones(200), base / 2)
    boot = bootstrap([p])
    assert boot["token_ratio"] == pytest.approx(0.5) and boot["token_ratio_ci"] == pytest.approx([0.5, 0.5])
    assert boot["accuracy_delta_ci"] == [0.0, 0.0] and includes(boot["accuracy_delta_ci"], 0.0)
    # Half the problems gained, none lost: delta 0.5, interval around it and clear of 0.
    acc = (np.arange(200) % 2).astype(float)
    boot = bootstrap([Paired(np.zeros(200), base, acc, base)])
    lo, hi = boot["accuracy_delta_ci"]
    assert boot["accuracy_delta"] == pytest.approx(0.5) and 0.38 < lo < 0.5 < hi < 0.62 and not includes([lo, hi], 0)
    # One problem of ten gained: an interval that holds 0 at 10 problems.
    few = np.zeros(10)
    few[0] = 1
    assert includes(bootstrap([Paired(np.zeros(10), base[:10], few, base[:10])])["accuracy_delta_ci"], 0.0)


def test_several_sets_give_a_row_per_set_and_model_plus_the_average(tmp_path):
    def rows(correct: list[bool], tokens: list[int]) -> list[tuple[str, int, bool]]:
        return [(str(i), t, c) for i, (t, c) in enumerate(zip(tokens, correct))]

    raws = [_run("base", "s1", _samples(rows([True] * 4, [100, 200, 300, 400]), truncated=1), wall=4.0),
            _run("base", "s2", _samples(rows([True, False], [50, 50])), wall=2.0),
            _run("pruned", "s1", _samples(rows([True] * 4, [50, 100, 150, 200])), wall=2.0),
            _run("pruned", "s2", _samples(rows([True, True], [25, 25])), wall=1.0)]
    results = summarize(raws)
    assert [(r["dataset"], r["truncation_rate"]) for r in results["runs"][:2]] == [("s1", 0.25), ("s2", 0.0)]
    c1, c2 = results["comparisons"]
    assert (c1["dataset"], c1["token_ratio"], c1["accuracy_delta"]) == ("s1", pytest.approx(0.5), 0.0)
    assert c1["token_ratio_ci"] == pytest.approx([0.5, 0.5]) and c1["accuracy_delta_ci"] == [0.0, 0.0]
    assert c2["accuracy_delta"] == pytest.approx(0.5)
    base_avg, pruned_avg = results["averages"]
    assert base_avg["accuracy"] == pytest.approx(0.75) and base_avg["mean_tokens"] == pytest.approx(150)
    (avg,) = results["average_comparisons"]
    assert avg["accuracy_delta"] == pytest.approx(0.25) and avg["token_ratio"] == pytest.approx(0.5)
    assert avg["time_ratio"] == pytest.approx(0.5) and avg["aes"] == pytest.approx(0.5 + 3 * 0.25 / 0.75)
    assert avg["ci"]["problems"] == 6
    table = markdown(results)
    assert "| s1 | pruned | 1.000 | +0.000 [+0.000, +0.000] † | 125.0 | 0.500 [0.500, 0.500] |" in table
    assert "| **average** | pruned | 1.000 | +0.250 [" in table
    lines = [line for line in table.splitlines() if line.startswith("| s") or line.startswith("| **")]
    assert [line.split(" | ")[:2] for line in lines] == [["| s1", "base"], ["| s1", "pruned"], ["| s2", "base"],
                                                         ["| s2", "pruned"], ["| **average**", "base"],
                                                         ["| **average**", "pruned"]]


def test_thinking_and_answer_tokens_are_reported_apart():
    from transformers import AutoTokenizer

    from bench.speed_worker import think_end_ids, thinking_tokens
    from pruner import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    assert think_end_ids(tok) is None  # the embedded model does not think
    tok.chat_template = "{{ messages[0]['content'] }}<think>\n"
    text = "let me see 2+2</think>The answer is 4."
    for added in (False, True):  # `</think>` as plain text (split by text), then as one added token (by id)
        if added:
            tok.add_tokens(["</think>"])
        end = think_end_ids(tok)
        assert (len(end) == 1) == added
        ids = tok(text, add_special_tokens=False)["input_ids"]
        head = len(tok("let me see 2+2</think>", add_special_tokens=False)["input_ids"])
        assert thinking_tokens(ids, text, end, tok) == head < len(ids)
        assert thinking_tokens(ids[:3], tok.decode(ids[:3]), end, tok) == 3  # never closed: all thinking

    raws = [_run("base", "s", _samples([("1", 100, True), ("2", 60, True)], thinking=[80, 40])),
            _run("pruned", "s", _samples([("1", 50, True), ("2", 30, True)], thinking=[30, 10]))]
    results = summarize(raws)
    assert results["runs"][0]["mean_thinking_tokens"] == 60 and results["runs"][0]["mean_answer_tokens"] == 20
    (c,) = results["comparisons"]
    assert c["thinking_ratio"] == pytest.approx(20 / 60) and c["answer_ratio"] == pytest.approx(1.0)
    assert "| 20.0 / 20.0 | 0.333 / 1.000 |" in markdown(results)


# --- stopping: real signals, real processes ---

_WRITER = """
import os, subprocess, sys, time
from bench.speed_procs import exit_with_parent
exit_with_parent()
out = sys.argv[1]
# a grandchild in the worker's group, as vLLM's engine processes are on GPUs
subprocess.Popen([sys.executable, "-c", "import time\\nwhile True:\\n    open(%r, 'a').write('g')\\n    time.sleep(0.02)" % (out + '.grandchild')])
while True:
    with open(out, "a") as fh:
        fh.write("w")
    time.sleep(0.02)
"""

_PARENT = """
import sys
from bench import speed_procs
speed_procs.run_worker([sys.executable, "-c", sys.argv[1], sys.argv[2]],
                       on_start=lambda pid: print(pid, flush=True))
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _sizes(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_stopped_parent_takes_its_worker_and_the_workers_children_with_it(tmp_path, sig):
    out = tmp_path / "w"
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, _WRITER, str(out)], cwd=ROOT, env=ENV,
                              stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    deadline = time.monotonic() + 30
    while not (Path(f"{out}.grandchild").exists() and out.exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert out.exists() and Path(f"{out}.grandchild").exists()
    parent.send_signal(sig)
    parent.wait(timeout=30)
    if sig == signal.SIGKILL:  # no handler runs: the death signal ends the worker, its handler the group
        deadline = time.monotonic() + 5
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
    else:
        assert parent.returncode == 128 + sig
    assert not _alive(worker)
    before = _sizes(tmp_path)
    time.sleep(1.0)
    assert _sizes(tmp_path) == before  # nothing written after the parent (and its workers) ended


@pytest.mark.slow
def test_sigterm_to_the_benchmark_ends_its_worker_and_nothing_is_written_after(tmp_path):
    # Before: three seconds after the parent died, the worker was still writing raw_base.json and its log.
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "bench/speed.py", "--models", "base=embedded", "twin=embedded",
                             "--limit", "2", "--modes", "greedy", "--warmup", "1", "--out", str(out)], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    worker = None
    for line in proc.stdout:
        if line.startswith("[base] worker pid"):
            worker = int(line.split()[-1])
            break
    assert worker is not None
    deadline = time.monotonic() + 300
    while not (out / "vllm-base.log").exists() and time.monotonic() < deadline:  # its engine is starting
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert not _alive(worker)
    before = _sizes(out)
    time.sleep(3.0)
    assert _sizes(out) == before and "raw_base.json" not in before and "results.json" not in before


# --- real runs ---

@pytest.mark.slow
def test_one_engine_start_per_model_for_every_set(tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"id": i, "problem": f"What is {i} + 2?", "answer": str(i + 2)}) + "\n"
                            for i in range(3)))
    out = tmp_path / "out"
    proc = _speed("--models", "base=embedded", "twin=embedded", "--data", "embedded:test", str(data), "--limit", "2",
                  "--set-limit", "mine=3", "--modes", "greedy", "--warmup", "1", "--out", str(out), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--data ['embedded:test', '" in proc.stderr and "overrides preset embedded's" in proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert [(r["model"], r["dataset"]) for r in results["runs"]] == [
        ("base", "embedded:test"), ("base", "mine"), ("twin", "embedded:test"), ("twin", "mine")]
    assert [r["samples"] for r in results["runs"]] == [2, 3, 2, 3]  # --limit, and --set-limit for mine
    assert [c["token_ratio"] for c in results["comparisons"]] == [1.0, 1.0]  # the same model, greedy
    assert all(includes(c["accuracy_delta_ci"], 0.0) for c in results["comparisons"] + results["average_comparisons"])
    assert results["settings"]["preset"] == "embedded" and results["settings"]["used"]["max_new_tokens"] == 1024
    assert set(results["timing"]) == {"base", "twin"}
    assert proc.stderr.count("vLLM: starting an engine for") == 2  # one per model, every set through it
    assert (out / "lengths_mine_greedy.png").is_file() and "| **average** | twin |" in (out / "results.md").read_text()


@pytest.mark.slow
def test_a_worker_whose_engine_fails_reports_one_line(tmp_path, tiny_model_dir):
    # Every check in front passes; vLLM then refuses the architecture inside the worker.
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    proc = _speed("--models", f"base={model}", "--limit", "1", "--modes", "greedy", "--max-new-tokens", "8",
                  "--out", str(out), timeout=600)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("bench/speed.py: error: model base: "), proc.stderr[-3000:]
    assert "CalledProcessError" not in proc.stderr and "Traceback" in (out / "vllm-base.log").read_text()
