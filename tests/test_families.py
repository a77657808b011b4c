"""Model families on tokenizers built from Qwen's real vocabulary (tests/family_fixtures.py): detection,
defaults, contradicting flags, EOS ids, and one prompt path: the token ids that pre-sampling, the
benchmark, the trainer and an on-policy round see for a problem are the same, for a template that
writes its BOS as text (DeepSeek-R1-Distill) and for a plain ChatML one."""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest

from tests.family_fixtures import EXPECTED, FAMILIES, NO_SYSTEM, VARIANTS, tokenizer_folder

PROBLEMS = [{"id": "p0", "problem": "What is $1+1$?", "answer": "2"},
            {"id": "p1", "problem": "Compute \\frac{3}{4} + 0.25.", "answer": "1"}]


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tokenizer folders of the four families, plus one whose template refuses a system turn."""
    root = tmp_path_factory.mktemp("families")
    dirs = {name: tokenizer_folder(name, root / name) for name in FAMILIES}
    shutil.copytree(dirs["qwen2.5-math"], root / "no-system")
    (root / "no-system" / "chat_template.jinja").write_text(NO_SYSTEM)
    dirs["no-system"] = root / "no-system"
    return dirs


def _tok(path: Path):
    from pruner.model_files import load_tokenizer

    return load_tokenizer(path)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_family_is_recognised_from_its_tokenizer_and_template(family_dirs, name):
    from pruner.families import detect_family

    base, template = VARIANTS.get(name, (name, None))
    tok = _tok(family_dirs[base])
    if template is not None:
        tok.chat_template = template
    assert len(tok.get_vocab()) >= 151_643  # the real ranks, not a toy vocabulary
    assert detect_family(tok).name == EXPECTED[name]


def test_each_familys_defaults_apply_when_no_flag_is_given(family_dirs):
    from pruner.families import BOXED_USER_SUFFIX, resolve_prompt
    from pruner.prompting import DEFAULT_SYSTEM_PROMPT, encode_prompt

    rendered = {}
    for name in FAMILIES:
        tok = _tok(family_dirs[name])
        settings = resolve_prompt(tok, model=family_dirs[name])
        rendered[name] = (settings, settings.render(tok, "What is 1+1?"), tok)
    r1, text, tok = rendered["r1-distill"]
    assert (r1.system_prompt, r1.suffix, r1.think) == ("", BOXED_USER_SUFFIX, True)
    assert text.count("<think>") == 1 and text.endswith("<｜Assistant｜><think>\n")
    ids = encode_prompt(tok, text)
    assert ids[0] == 151646 and ids[1] != 151646  # one BOS, the template's
    math, text, _ = rendered["qwen2.5-math"]
    assert (math.system_prompt, math.think) == (DEFAULT_SYSTEM_PROMPT, False) and "<think>" not in text
    qwq, text, _ = rendered["qwq"]
    assert qwq.think and text.endswith("<|im_start|>assistant\n<think>\n") and text.count("<think>") == 1
    qwen3, text, tok = rendered["qwen3"]
    assert qwen3.think and text.endswith("<|im_start|>assistant\n")  # thinking on: the model opens the block
    off = resolve_prompt(tok, model=family_dirs["qwen3"], think="off")
    assert off.render(tok, "What is 1+1?").endswith("<think>\n\n</think>\n\n")  # enable_thinking=False


def test_flags_override_the_family_and_contradictions_are_logged(family_dirs, caplog):
    from pruner.families import resolve_prompt

    tok = _tok(family_dirs["r1-distill"])
    with caplog.at_level(logging.WARNING, logger="pruner.families"):
        settings = resolve_prompt(tok, model=family_dirs["r1-distill"], system_prompt="Be brief.", suffix="")
    assert (settings.system_prompt, settings.suffix) == ("Be brief.", "")
    assert "without a system turn" in caplog.text and "flag" in settings.sources
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pruner.families"):
        resolve_prompt(tok, suffix="\n<think>")
    assert "opened twice" in caplog.text
    caplog.clear()
    qwq = _tok(family_dirs["qwq"])
    with caplog.at_level(logging.WARNING, logger="pruner.families"):
        resolve_prompt(qwq, think="off")
    assert "opens <think> in its generation prompt itself" in caplog.text


def test_a_system_prompt_for_a_template_without_a_system_turn_fails_before_any_engine(family_dirs, tmp_path):
    from pruner.configs import PresampleConfig
    from pruner.presample import run

    folder = family_dirs["no-system"]
    cfg = PresampleConfig(model=str(folder), problems=str(_problems(tmp_path)), out=str(tmp_path / "s.jsonl"),
                          system_prompt="Reason step by step.")
    with pytest.raises(ValueError, match=r"chat_template.jinja: this chat template cannot render a system turn"):
        run(cfg)  # no weights in the folder: an engine start would fail differently
    assert not (tmp_path / "s.jsonl").exists()
    # the family default (a system turn) fails the same way; --system-prompt '' works
    with pytest.raises(ValueError, match="cannot render a system turn"):
        run(dataclasses.replace(cfg, system_prompt=None))
    from pruner.families import resolve_prompt

    assert resolve_prompt(_tok(folder), model=folder, system_prompt="").system_prompt == ""


def test_the_benchmark_checks_every_models_template_before_its_first_engine(family_dirs, tmp_path):
    import bench.speed as speed

    argv = ["--models", f"base={family_dirs['qwen2.5-math']}", f"other={family_dirs['no-system']}",
            "--data", str(_problems(tmp_path)), "--out", str(tmp_path / "bench")]
    with pytest.raises(SystemExit, match="no-system/chat_template.jinja: this chat template cannot render"):
        speed.main(argv)
    assert not (tmp_path / "bench").exists()


def test_eos_ids_are_the_tokenizers_and_all_of_generation_configs(family_dirs):
    from pruner.model_files import eos_token_ids
    from pruner.reward import response_ids

    qwen = family_dirs["qwen3"]
    assert eos_token_ids(_tok(qwen), qwen) == [151645, 151643]  # <|im_end|>, then <|endoftext|> from the file
    assert eos_token_ids(_tok(family_dirs["r1-distill"]), family_dirs["r1-distill"]) == [151643]
    ends_on_file_eos = {"response_token_ids": [9, 151643], "finish_reason": "stop"}
    assert response_ids(ends_on_file_eos, [151645, 151643]) == ([9, 151643], False)  # no second EOS


def _problems(tmp_path: Path) -> Path:
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    return path


def _presample_ids(folder: Path, problems: Path, tmp: Path, **flags) -> tuple:
    """What pre-sampling sends to vLLM, and the resolved config it records."""
    from pruner.configs import PresampleConfig
    from pruner.presample import _prompts

    cfg = PresampleConfig(model=str(folder), problems=str(problems), out=str(tmp / "samples.jsonl"), k=1, **flags)
    cfg, _, ids = _prompts(cfg, PROBLEMS, _tok(folder))
    return cfg, ids


def _trainer_ids(folder: Path, cfg, ids: list[list[int]], tmp: Path) -> tuple[list[list[int]], Path]:
    """The prompt ids the trainer reads: samples written as pre-sampling writes them, then the set."""
    from pruner.dataset import build_trainset
    from pruner.samples import make_record, meta_path, samples_manifest
    from pruner.trainset import load_trainset

    tok = _tok(folder)
    samples = Path(cfg.out)
    records = [make_record(problem_id=p["id"], sample_index=0, prompt="", prompt_token_ids=i,
                           response="2", response_token_ids=[17, tok.eos_token_id], finish_reason="stop",
                           extracted_answer="2", correct=True, answer=p["answer"])
               for p, i in zip(PROBLEMS, ids)]
    for rec, p in zip(records, PROBLEMS):
        rec["prompt"] = p["problem"]  # distinct keys: the set groups problems by prompt text
    samples.write_text("".join(json.dumps(r) + "\n" for r in records))
    meta_path(samples).write_text(json.dumps(samples_manifest(cfg, str(folder), tok)))
    ts = load_trainset(build_trainset(samples, tmp / "trainset", tokenizer=tok, report=False, lam=2.0))
    starts, lens = ts["offsets"].tolist(), ts["prompt_lengths"].tolist()
    return [ts["input_ids"][s:s + n].tolist() for s, n in zip(starts, lens)], tmp / "trainset"


def _benchmark_ids(models: list[tuple[str, str]], problems: Path, **flags) -> dict[str, list[list[int]]]:
    """What each benchmark worker sends to vLLM: the parent resolves, the worker renders."""
    import bench.speed as speed
    from bench.speed_worker import model_prompts
    from pruner.configs import SpeedConfig

    cfg, _ = speed.apply_preset(SpeedConfig(models=[f"{n}={p}" for n, p in models], data=[str(problems)], **flags))
    resolved = speed.prompt_settings(cfg, models)
    return {name: model_prompts(_tok(Path(path)), PROBLEMS,
                                dataclasses.replace(cfg, models=[f"{name}={path}"], **resolved[name]), name, path)
            for name, path in models}


@pytest.mark.parametrize("family", ["r1-distill", "qwen2.5-math"])
def test_presampling_the_benchmark_the_trainer_and_a_round_see_the_same_prompt_ids(family_dirs, tmp_path, family):
    """R1-distill writes its BOS as text: a string sent to an engine would get a second BOS."""
    from pruner.families import SAMPLING_FILE, write_model_record
    from pruner.onpolicy import round_configs
    from pruner.trainset import read_meta

    base = family_dirs[family]
    problems = _problems(tmp_path)
    cfg, presampled = _presample_ids(base, problems, tmp_path)
    trained, trainset = _trainer_ids(base, cfg, presampled, tmp_path)
    assert trained == presampled
    # the export carries the set's sampling block; the base (no record) is benchmarked by it too
    pruned = tmp_path / "export"
    shutil.copytree(base, pruned)
    write_model_record(pruned, read_meta(trainset)["sampling"])
    assert json.loads((pruned / SAMPLING_FILE).read_text())["system_prompt"] == cfg.system_prompt
    bench = _benchmark_ids([("base", str(base)), ("pruned", str(pruned))], problems)
    assert bench["base"] == presampled and bench["pruned"] == presampled
    # an on-policy round re-samples with the recorded settings: the same ids again
    (tmp_path / "sets").mkdir()
    round_cfg, _ = round_configs(trainset, tmp_path / "sets", 1)
    round_cfg = dataclasses.replace(round_cfg, model=str(base), problems=str(problems))
    assert _presample_ids(base, problems, tmp_path / "sets", **{k: getattr(round_cfg, k) for k in
                                                               ("system_prompt", "suffix", "think")})[1] == presampled
    tok = _tok(base)
    text = tok.decode(presampled[0])
    if family == "r1-distill":  # what an engine given the string would have sent
        assert presampled[0][0] == 151646 and tok(text)["input_ids"][:2] == [151646, 151646]
    else:
        assert tok(text)["input_ids"] == presampled[0]


def test_flags_given_to_the_benchmark_override_the_models_record(family_dirs, tmp_path):
    from pruner.families import write_model_record

    pruned = tmp_path / "export"
    shutil.copytree(family_dirs["qwq"], pruned)
    write_model_record(pruned, {"system_prompt": "", "suffix": "\nBe brief.", "think": "on"})
    problems = _problems(tmp_path)
    recorded = _benchmark_ids([("base", str(family_dirs["qwq"])), ("pruned", str(pruned))], problems)
    _, expected = _presample_ids(family_dirs["qwq"], problems, tmp_path, system_prompt="", suffix="\nBe brief.")
    assert recorded["base"] == recorded["pruned"] == expected
    flagged = _benchmark_ids([("pruned", str(pruned))], problems, system_prompt="Other.")
    _, expected = _presample_ids(family_dirs["qwq"], problems, tmp_path, system_prompt="Other.", suffix="\nBe brief.")
    assert flagged["pruned"] == expected


def test_a_malformed_model_record_names_its_file_and_field(family_dirs, tmp_path):
    from pruner.families import SAMPLING_FILE, resolve_prompt

    folder = tmp_path / "export"
    shutil.copytree(family_dirs["qwen3"], folder)
    (folder / SAMPLING_FILE).write_text(json.dumps({"think": "maybe"}))
    with pytest.raises(ValueError, match=rf"{SAMPLING_FILE}: field think must be on, off or auto"):
        resolve_prompt(_tok(folder), model=folder)
    (folder / SAMPLING_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        resolve_prompt(_tok(folder), model=folder)


def test_a_template_that_drops_the_system_turn_is_refused_too(family_dirs):
    from pruner.families import resolve_prompt

    tok = _tok(family_dirs["qwen2.5-math"])
    tok.chat_template = NO_SYSTEM.replace("{{- raise_exception('System role not supported') }}", "")
    tok.chat_template = tok.chat_template.replace("{%- for m in messages %}", "{%- for m in messages if m.role != 'system' %}")
    with pytest.raises(ValueError, match="cannot render a system turn \\(it leaves the system message out\\)"):
        resolve_prompt(tok, system_prompt="Reason step by step.")
    assert resolve_prompt(tok, system_prompt="").render(tok, "1+1").startswith("<|im_start|>user\n")
