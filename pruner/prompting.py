"""Chat prompts: one place that turns a problem into the model's prompt text.

Every stage (pre-sampling, the embedded model's training traces, on-policy rounds and the
benchmarks) builds prompts here, so a model is always asked the same way it was sampled.
"""
from __future__ import annotations

from typing import Any

# The system prompt of Qwen2.5-Math / the O1-Pruner code: step-by-step reasoning, answer boxed.
DEFAULT_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."

# The paper's "fast-solving prompt" baseline: the same request plus an instruction to be brief.
FAST_SOLVING_SUFFIX = "\nSolve the problem as quickly as possible, with as few reasoning steps as you can."


def template_source(tokenizer: Any) -> str:
    """The chat template's text ("" when the tokenizer has none)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one is what apply_chat_template uses
        template = template.get("default", next(iter(template.values()), ""))
    return template or ""


def build_prompt(
    tokenizer: Any,
    problem: str,
    *,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    suffix: str = "",
    think: bool | None = None,
) -> str:
    """Render `problem` through the tokenizer's chat template, ready for generation.

    `system_prompt=None` or "" leaves the system turn out (DeepSeek-R1 distills are meant to be
    prompted without one). `think`: thinking mode. A template with an `enable_thinking` switch
    (Qwen3) gets it, and its generation prompt stays as the template writes it; any other template
    gets a `<think>` block opened after the generation prompt unless it opened one itself. None:
    the template's default (Qwen3), else on when the template mentions `<think>`.
    Pass the text to `encode_prompt`, never to an engine: a template that writes its BOS as text
    would get a second one from a tokenizer that adds special tokens.
    """
    source = template_source(tokenizer)
    if not source:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; "
            "pass a model folder whose tokenizer_config.json defines one"
        )
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": problem + suffix})
    if "enable_thinking" in source:  # Qwen3: the template's own switch writes (or closes) the block
        kwargs = {} if think is None else {"enable_thinking": bool(think)}
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if think is None:
        think = "<think>" in source
    if think and not text.rstrip().endswith("<think>"):
        text += "<think>\n"
    return text


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """A rendered prompt's token ids, with no special token added: the template wrote every one it
    wants (a BOS written as text is parsed as the BOS token). Every stage sends these ids to vLLM."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
