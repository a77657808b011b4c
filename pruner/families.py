"""Model families: which one a tokenizer belongs to, its recommended prompt, and how a stage's
prompt flags resolve against it.

Every stage (pre-sampling, on-policy rounds, the benchmarks) asks `resolve_prompt` how to prompt a
model, so a model is asked the same way in each. The precedence, field by field (system prompt,
suffix, think):

1. a flag the user gave (`--system-prompt`, `--suffix`, `--think on|off`);
2. what the model folder records: `o1pruner_sampling.json`, written by the trainer's export with the
   training set's `sampling` block (so a pruned model is benchmarked as its data was sampled);
3. what the caller passes as the comparison's record (the benchmark: the first model that has one);
4. the family's defaults (FAMILIES below).

The family is read from the chat template and the vocabulary, never from a folder name (a
fine-tuned export keeps its base's template and tokens, not its name).
"""
from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pruner.prompting import DEFAULT_SYSTEM_PROMPT, build_prompt, encode_prompt, template_source

log = logging.getLogger("pruner.families")

# What the trainer's export writes into a model folder: the training set's `sampling` block.
SAMPLING_FILE = "o1pruner_sampling.json"

# DeepSeek-R1's recommendation: no system turn, the instruction in the user turn.
BOXED_USER_SUFFIX = "\n" + DEFAULT_SYSTEM_PROMPT


@dataclass(frozen=True)
class Family:
    name: str
    markers: str            # what detection looks for (docs/pipeline.md's table)
    system_prompt: str      # "" = no system turn
    suffix: str
    think: str              # "on", "off" or "auto" (on when the template mentions <think>)
    system_turn: bool       # the family is meant to be prompted with a system turn


FAMILIES = {
    "qwen3": Family("qwen3", "ChatML (`<|im_start|>`) and `enable_thinking` in the template", DEFAULT_SYSTEM_PROMPT,
                    "", "on", True),
    "r1-distill": Family("r1-distill", "`<｜Assistant｜>` in the template (BOS `<｜begin▁of▁sentence｜>` written as "
                         "text)", "", BOXED_USER_SUFFIX, "on", False),
    "qwq": Family("qwq", "ChatML and `<think>` in the template (QwQ-32B), or its default system turn says "
                  "'think step-by-step' (QwQ-32B-Preview)", DEFAULT_SYSTEM_PROMPT, "", "auto", True),
    "qwen2.5": Family("qwen2.5", "ChatML, no `<think>` (Qwen2.5-Instruct; Qwen2.5-Math when its default system "
                      "turn asks for \\boxed{})", DEFAULT_SYSTEM_PROMPT, "", "off", True),
    "generic": Family("generic", "anything else", DEFAULT_SYSTEM_PROMPT, "", "auto", True),
}


def detect_family(tokenizer: Any) -> Family:
    """The family of a tokenizer, from its chat template and vocabulary."""
    template = template_source(tokenizer)
    vocab = tokenizer.get_vocab()
    if "<｜Assistant｜>" in template or "<｜Assistant｜>" in vocab:
        return FAMILIES["r1-distill"]
    if "<|im_start|>" in template:
        if "enable_thinking" in template:
            return FAMILIES["qwen3"]
        if "<think>" in template or "think step-by-step" in template:
            return FAMILIES["qwq"]
        return FAMILIES["qwen2.5"]
    return FAMILIES["generic"]


@dataclass(frozen=True)
class PromptSettings:
    """How every problem is rendered: resolved, so a record of it reproduces the prompt exactly."""

    system_prompt: str  # "" = no system turn
    suffix: str
    think: bool
    family: str
    sources: str        # where each field came from, for the log

    def record(self) -> dict[str, Any]:
        """The fields as the samples meta and the model's SAMPLING_FILE carry them."""
        return {"system_prompt": self.system_prompt, "suffix": self.suffix, "think": "on" if self.think else "off"}

    def render(self, tokenizer: Any, problem: str) -> str:
        return build_prompt(tokenizer, problem, system_prompt=self.system_prompt or None, suffix=self.suffix,
                            think=self.think)

    def prompts(self, tokenizer: Any, problems: list[str]) -> tuple[list[str], list[list[int]]]:
        """Every problem's prompt text and the token ids an engine gets; logs the first one."""
        texts = [self.render(tokenizer, p) for p in problems]
        ids = [encode_prompt(tokenizer, t) for t in texts]
        if texts:
            print(describe(self, texts[0], ids[0]), file=sys.stderr, flush=True)
        return texts, ids


def read_model_record(model: str | os.PathLike | None) -> dict[str, Any] | None:
    """The sampling block a model folder records (SAMPLING_FILE), or None."""
    path = Path(model) / SAMPLING_FILE if model else None
    if path is None or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); delete it or re-export the model") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a JSON object (the training set's sampling block)")
    for key in ("system_prompt", "suffix"):
        if not isinstance(record.get(key, ""), (str, type(None))):
            raise ValueError(f"{path}: field {key} must be a string, got {record[key]!r}")
    if record.get("think", "auto") not in ("on", "off", "auto", None):
        raise ValueError(f"{path}: field think must be on, off or auto, got {record['think']!r}")
    return record


def write_model_record(folder: str | os.PathLike, sampling: dict[str, Any] | None) -> None:
    """Write the training set's sampling block into an exported model folder (nothing when None)."""
    if sampling:
        (Path(folder) / SAMPLING_FILE).write_text(json.dumps(sampling, indent=2) + "\n")


def _pick(name: str, flag: Any, records: list[tuple[str, dict | None]], default: Any) -> tuple[Any, str]:
    """(value, source) of one field: the flag, else the first record holding it, else the family default."""
    if flag is not None:
        return flag, "flag"
    for source, record in records:
        if record and record.get(name) is not None:
            return record[name], source
    return default, "family default"


def _think(value: str, tokenizer: Any) -> bool:
    if value not in ("on", "off", "auto"):
        raise ValueError(f"think must be on, off or auto, got {value!r}")
    return "<think>" in template_source(tokenizer) if value == "auto" else value == "on"


def resolve_prompt(tokenizer: Any, *, model: str | os.PathLike | None = None, system_prompt: str | None = None,
                   suffix: str | None = None, think: str = "auto", fallback: dict | None = None,
                   fallback_source: str = "comparison record") -> PromptSettings:
    """The prompt settings of a stage: flags, else the model's record, else `fallback`, else the family's.

    `system_prompt`/`suffix` None and `think` "auto" mean "not given". Raises ValueError, naming the
    template's file, when a system prompt meets a template that cannot render a system turn.
    """
    family = detect_family(tokenizer)
    own = read_model_record(model)
    records = [(str(Path(model) / SAMPLING_FILE) if model else "", own), (fallback_source, fallback)]
    sys_value, sys_src = _pick("system_prompt", system_prompt, records, family.system_prompt)
    suf_value, suf_src = _pick("suffix", suffix, records, family.suffix)
    think_value, think_src = _pick("think", None if think == "auto" else think, records, family.think)
    settings = PromptSettings(system_prompt=sys_value or "", suffix=suf_value or "",
                              think=_think(think_value, tokenizer), family=family.name,
                              sources=f"system prompt: {sys_src}, suffix: {suf_src}, think: {think_src}")
    if settings.system_prompt:
        check_system_turn(tokenizer, model)
    warn_contradictions(tokenizer, family, settings)
    return settings


def template_file(tokenizer: Any, model: str | os.PathLike | None) -> str:
    """Where the chat template lives, for error messages: chat_template.jinja or tokenizer_config.json."""
    folder = Path(model) if model else Path(getattr(tokenizer, "name_or_path", "") or ".")
    jinja = folder / "chat_template.jinja"
    return f"{jinja}" if jinja.is_file() else f"{folder / 'tokenizer_config.json'}: field chat_template"


def check_system_turn(tokenizer: Any, model: str | os.PathLike | None = None) -> None:
    """A system prompt the template would drop or refuse fails here, before any engine starts."""
    marker = "o1pruner-system-probe"
    messages = [{"role": "system", "content": marker}, {"role": "user", "content": "1+1"}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - jinja's raise_exception, a TemplateError, ...
        reason = f"it raises {type(exc).__name__}: {exc}"
    else:
        if marker in text:
            return
        reason = "it leaves the system message out"
    raise ValueError(f"{template_file(tokenizer, model)}: this chat template cannot render a system turn ({reason}), "
                     "but a system prompt is set; pass --system-prompt '' and put instructions in --suffix")


def warn_contradictions(tokenizer: Any, family: Family, settings: PromptSettings) -> None:
    """Settings that work but go against the family's use: logged, not refused."""
    if settings.system_prompt and not family.system_turn:
        log.warning("%s models are meant to be prompted without a system turn (instructions in the user turn); "
                    "a system prompt is set: %r", family.name, settings.system_prompt)
    opens = "<think>" in settings.system_prompt + settings.suffix
    if opens and settings.think:
        log.warning("<think> is opened twice: the prompt text holds '<think>' and think is on (the template or "
                    "--think opens it too); drop one")
    probe = build_prompt(tokenizer, "1+1", system_prompt=None, think=False)
    if not settings.think and probe.rstrip().endswith("<think>"):
        log.warning("think is off, but this template opens <think> in its generation prompt itself; the model "
                    "will think anyway")


def describe(settings: PromptSettings, first_prompt: str, first_ids: list[int]) -> str:
    """The log lines every stage prints: family, where the settings came from, the first rendered prompt."""
    return (f"prompt: family {settings.family} ({settings.sources}); first prompt, {len(first_ids)} tokens, "
            f"ids {first_ids[:4]}...:\n{first_prompt}")


def comparison_prompts(models: list[tuple[str, str]], *, system_prompt: str | None = None, suffix: str | None = None,
                       think: str = "auto") -> dict[str, PromptSettings]:
    """Each model's settings for a side-by-side run (the benchmark): flags, else the model's own
    record, else the first record among `models` (a base model is prompted as its pruned export's
    data was sampled), else the family's. Loads only tokenizers: errors come before any engine."""
    from pruner.model_files import load_tokenizer

    records = [(str(Path(path) / SAMPLING_FILE), read_model_record(path)) for _, path in models
               if Path(path).is_dir()]
    source, first = next(((s, r) for s, r in records if r), ("", None))
    settings = {}
    for name, path in models:
        settings[name] = resolve_prompt(load_tokenizer(path), model=path if Path(path).is_dir() else None,
                                        system_prompt=system_prompt, suffix=suffix, think=think, fallback=first,
                                        fallback_source=source)
        print(f"[{name}] prompt: family {settings[name].family} ({settings[name].sources})", flush=True)
    return settings
