"""The embedded default: task generator, tokenizer, a tiny build, and vLLM on the shipped model."""
from __future__ import annotations

import json
import random
import re
import statistics
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO_ROOT, run_script
from pruner.embedded import task
from pruner.embedded.task import PARAMS, TaskParams, long_trace, make_problems, min_trace, sample_spec


def _recompute(problem: str) -> int:
    """The answer from the problem text alone, with no help from the generator's code."""
    value = int(re.fullmatch(r"start with (\d+) \. .*", problem).group(1))
    for number, sym, operand in re.findall(r"\((\d+)\) ([-+*])(\d+) \.", problem):
        value = {"+": value + int(operand), "-": value - int(operand), "*": value * int(operand)}[sym]
    return value


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    from pruner import default_problems

    return {s: default_problems(s) for s in ("train", "test")}


@pytest.fixture(scope="module")
def tok():
    from pruner.embedded.build import build_tokenizer

    return build_tokenizer()


def test_splits_sizes_format_and_answers(splits):
    assert len(splits["train"]) == PARAMS.n_train >= 1000 and len(splits["test"]) == PARAMS.n_test >= 300
    for rec in splits["train"] + splits["test"]:
        assert set(rec) == {"id", "problem", "answer", "min_tokens", "difficulty"}
        assert rec["answer"] == str(_recompute(rec["problem"]))
        # every intermediate value is a single number token
        assert 0 <= int(rec["answer"]) <= task.MAX_VALUE


def test_splits_disjoint_and_deterministic(splits):
    train = {r["problem"] for r in splits["train"]}
    test = {r["problem"] for r in splits["test"]}
    assert not train & test and len(train) == len(splits["train"]) and len(test) == len(splits["test"])
    assert make_problems("test") == splits["test"]
    other = make_problems("test", TaskParams(seed=PARAMS.seed + 1))
    assert [r["problem"] for r in other] != [r["problem"] for r in splits["test"]]
    with pytest.raises(ValueError):
        make_problems("validation")


def test_difficulty_raises_min_tokens(splits, tok):
    by_level: dict[int, list[int]] = {}
    for rec in splits["train"]:
        by_level.setdefault(rec["difficulty"], []).append(rec["min_tokens"])
    means = [statistics.mean(by_level[k]) for k in sorted(by_level)]
    assert len(means) == PARAMS.max_steps - PARAMS.min_steps + 1
    assert all(a < b for a, b in zip(means, means[1:]))
    # min_tokens is the model tokenizer's count of the shortest trace, plus the end-of-turn token
    for rec in splits["test"][:50]:
        start = int(rec["problem"].split()[2])
        words = {v: k for k, v in task.OPS.items()}
        ops = [(words[s], int(k)) for s, k in re.findall(r"\) ([-+*])(\d+) \.", rec["problem"])]
        trace = min_trace(start, ops)
        assert trace.endswith(f"\\boxed{{ {rec['answer']} }} .")
        assert rec["min_tokens"] == len(tok.encode(trace, add_special_tokens=False)) + 1


def test_long_traces_vary_waste_and_overthinking():
    rng = random.Random(7)
    ratios, cvs, long_acc, short_acc = [], [], [], []
    for _ in range(150):
        start, ops = sample_spec(rng, rng.randint(PARAMS.min_steps, PARAMS.max_steps))
        answer = task.solve(start, ops)[-1]
        floor = len(min_trace(start, ops).split())
        samples = [long_trace(start, ops, rng) for _ in range(8)]
        lengths = [len(text.split()) for text, _ in samples]
        for text, value in samples:
            assert text.endswith(f"\\boxed{{ {value} }} .") and text.startswith(("x =", "okay"))
        ratios.append(floor / statistics.mean(lengths))
        cvs.append(statistics.pstdev(lengths) / statistics.mean(lengths))
        order = sorted(range(8), key=lambda i: lengths[i])
        short_acc += [samples[i][1] == answer for i in order[:2]]
        long_acc += [samples[i][1] == answer for i in order[-2:]]
    assert 0.35 < statistics.mean(ratios) < 0.65
    assert statistics.mean(cvs) > 0.15
    assert statistics.mean(long_acc) < statistics.mean(short_acc) - 0.1


def test_steps_copy_their_operation_from_the_problem():
    rng = random.Random(3)
    for _ in range(40):
        start, ops = sample_spec(rng, rng.randint(PARAMS.min_steps, PARAMS.max_steps))
        problem = task.problem_text(start, ops)
        text, _ = long_trace(start, ops, rng)
        steps = re.findall(r"\((\d+)\) ([-+*])(\d+) : (\d+) (.) (\d+) = (\d+) \.", text)
        assert len(steps) >= len(ops)
        for i, op, k, a, sym, k2, r in steps:
            # "(3) *2" is written exactly as in the problem (one token each), then applied
            assert f"({i}) {op}{k} ." in problem and k == k2 and sym == op
        assert all(0 <= v <= task.MAX_VALUE for v in task.solve(start, ops))


def test_slips_are_mostly_corrected():
    rng = random.Random(11)
    p = TaskParams(slip=1.0)  # every step slips: each check line must repair the written value
    start, ops = sample_spec(rng, 6)
    text, value = long_trace(start, ops, rng, p)
    for a, sym, k, right, wrong in re.findall(r"check : (\d+) (.) (\d+) = (\d+) , not (\d+) \.", text):
        assert int(right) == {"+": int(a) + int(k), "-": int(a) - int(k), "*": int(a) * int(k)}[sym]
        assert f"{a} {sym} {k} = {wrong} ." in text and right != wrong


def test_tokenizer_round_trip_and_chat_template(tok, tmp_path):
    from transformers import AutoTokenizer

    from pruner.prompting import DEFAULT_SYSTEM_PROMPT, build_prompt

    tok.save_pretrained(str(tmp_path))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    rng = random.Random(5)
    for _ in range(30):
        start, ops = sample_spec(rng, rng.randint(3, 11))
        text, _ = long_trace(start, ops, rng)
        ids = loaded.encode(text, add_special_tokens=False)
        assert loaded.unk_token_id not in ids and loaded.decode(ids) == text
    problem = task.problem_text(start, ops)
    prompt = build_prompt(loaded, problem)
    assert prompt.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{problem}")
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = loaded.encode(prompt, add_special_tokens=False)
    assert loaded.unk_token_id not in ids and ids.count(loaded.convert_tokens_to_ids("<|im_start|>")) == 3
    assert loaded.eos_token == "<|im_end|>"
    # words never seen map to <unk> instead of failing
    odd = loaded.encode("Solve this riddle, please: zebra 1000", add_special_tokens=False)
    assert odd.count(loaded.unk_token_id) >= 4
    assert "zebra" not in loaded.decode(odd) and "<unk>" in loaded.decode(odd)


def test_chat_template_inserts_the_system_prompt_when_missing(tok, tmp_path):
    # Prompted the ordinary way (a user turn only), the model must see the prompt it was trained
    # on; an explicit system turn, the project's or another, is kept as given.
    from transformers import AutoTokenizer

    from pruner.embedded import SHIPPED_MODEL
    from pruner.embedded.build import CHAT_TEMPLATE
    from pruner.prompting import DEFAULT_SYSTEM_PROMPT, build_prompt

    tok.save_pretrained(str(tmp_path))
    built, shipped = AutoTokenizer.from_pretrained(str(tmp_path)), AutoTokenizer.from_pretrained(str(SHIPPED_MODEL))
    assert shipped.chat_template == built.chat_template == CHAT_TEMPLATE, "rebuild the shipped tokenizer files"
    problem = task.problem_text(*sample_spec(random.Random(2), 5))
    for t in (built, shipped):
        explicit = build_prompt(t, problem)
        assert build_prompt(t, problem, system_prompt=None) == explicit
        user_only = t.apply_chat_template([{"role": "user", "content": problem}], tokenize=False,
                                          add_generation_prompt=True)
        assert user_only == explicit and "within \\boxed{}.<|im_end|>" in explicit
        other = build_prompt(t, problem, system_prompt="be brief .")
        assert other.startswith("<|im_start|>system\nbe brief .<|im_end|>\n") and DEFAULT_SYSTEM_PROMPT not in other
        # a multi-turn chat gets the system turn once, at the start
        chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x = 1 ."},
                {"role": "user", "content": problem}]
        rendered = t.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert rendered.count("<|im_start|>system") == 1 and rendered.startswith(explicit.split("<|im_start|>user")[0])


def test_tiny_build_loads_and_is_deterministic(tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pruner.embedded.build import BuildConfig, build

    cfg = BuildConfig(steps=3, batch=2, hidden=64, heads=1, layers=1, intermediate=64, warmup=1)
    info = build(tmp_path / "a", cfg, log_every=0)
    build(tmp_path / "b", cfg, log_every=0)
    wa, wb = (load_file(str(tmp_path / d / "model.safetensors")) for d in "ab")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    saved = json.loads((tmp_path / "a" / "build_info.json").read_text())
    assert saved["steps"] == 3 and saved["task_params_hash"] == task.params_hash() == info["task_params_hash"]
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "a"))
    tk = AutoTokenizer.from_pretrained(str(tmp_path / "a"))
    ids = torch.tensor([tk.encode("x = 7 . (1) +5 : 7 + 5 = 12 .", add_special_tokens=False)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape[-1] >= len(tk) and torch.isfinite(logits).all()
    assert model.config.head_dim == 64 and model.config.model_type == "llama"
    # AutoTokenizer on the whole folder (config.json included) keeps the word-level tokenizer
    from pruner.prompting import build_prompt

    prompt_ids = tk.encode(build_prompt(tk, "start with 7 . (1) +5 . what is the result ?"))
    assert tk.unk_token_id not in prompt_ids and len(prompt_ids) < 60


def test_import_is_light_and_shipped_model_is_complete():
    code = "import sys, pruner; print(sorted(m for m in ('torch', 'vllm', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    assert out.stdout.strip() == "[]"
    from pruner.embedded import SHIPPED_MODEL, default_model_path, is_complete_model

    assert is_complete_model(SHIPPED_MODEL), "run: python -m pruner.embedded.build --out pruner/assets/default_model"
    assert default_model_path() == SHIPPED_MODEL
    assert (SHIPPED_MODEL / "model.safetensors").stat().st_size < 10 * 2**20
    info = json.loads((SHIPPED_MODEL / "build_info.json").read_text())
    assert info["task_params_hash"] == task.params_hash(), "task changed: rebuild the default model"


def _first_problems() -> list[dict]:
    from pruner import default_problems

    return default_problems("test")[:6]


_VLLM_SCRIPT = textwrap.dedent("""
    import json, sys
    from pruner import default_model_path, default_problems
    from pruner.generation import generate, open_llm
    from pruner.grading import extract_answer
    from pruner.prompting import build_prompt

    if __name__ == "__main__":
        llm = open_llm(str(default_model_path()), dtype="float32", max_model_len=2048)
        tok = llm.get_tokenizer()
        problems = default_problems("test")[:6]
        prompts = [build_prompt(tok, p["problem"]) for p in problems]
        outs = generate(llm, prompts, n=2, temperature=0.6, top_p=0.95, max_tokens=1024)
        rows = [{"text": c.text, "n": len(c.token_ids), "answer": extract_answer(c.text),
                 "truth": p["answer"]} for cs, p in zip(outs, problems) for c in cs]
        print("ROWS" + json.dumps(rows))
""")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_vllm_samples_shipped_model(tmp_path):
    pytest.importorskip("vllm")
    out = run_script(tmp_path, _VLLM_SCRIPT, env={"VLLM_CPU_KVCACHE_SPACE": "1"}, timeout=280)
    rows = json.loads(out.stdout.split("ROWS", 1)[1].splitlines()[0])
    assert len(rows) == 12
    for row in rows:
        assert row["n"] > 0 and row["text"].strip() and "\\boxed{" in row["text"]
        assert row["answer"] is not None
    # a trained model, not noise: it writes the task's trace, starting from the right value
    for row, p in zip(rows, [p for p in _first_problems() for _ in range(2)]):
        assert f"x = {p['problem'].split()[2]} . (1)" in row["text"]


def test_redundancy_openers_mark_exactly_the_optional_text():
    # Forbidding these words at decode time must leave the shortest trace possible, and nothing
    # necessary may start with them.
    rng = random.Random(13)
    no_slips = TaskParams(slip=0.0)  # an unrepaired slip changes the trace without an opener
    for _ in range(200):
        start, ops = sample_spec(rng, rng.randint(PARAMS.min_steps, PARAMS.max_steps))
        shortest = f" {min_trace(start, ops)} "
        assert not any(f" {w} " in shortest for w in task.REDUNDANCY_OPENERS)
        text, _ = long_trace(start, ops, rng, no_slips)
        extra = text != shortest.strip()
        assert extra == any(f" {w} " in f" {text} " for w in task.REDUNDANCY_OPENERS), text


def test_build_flags_are_the_configs_fields_and_out_is_required(capsys):
    from dataclasses import asdict

    from pruner.cli import parse_config, to_argv
    from pruner.embedded.build import BuildCommand, BuildConfig, main

    command = parse_config(BuildCommand, ["--out", "m", "--steps", "3", "--lr", "0.01"])
    assert (command.steps, command.lr, str(command.out)) == (3, 0.01, "m")
    assert parse_config(BuildCommand, to_argv(command)) == command
    assert set(asdict(BuildConfig())) == set(asdict(command)) - {"out"}  # build_info's "config" keys stay
    with pytest.raises(SystemExit, match="--out is required"):
        main(["--steps", "3"])
