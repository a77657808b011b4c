"""The embedded model's word-level tokenizer, built with the `tokenizers` library.

One token per whitespace-separated word: numbers 0..50 are single tokens, which is what makes
the task's arithmetic learnable by a tiny model. Decoding joins words with single spaces, so
a trace (written with single spaces) round-trips exactly; any other text round-trips up to
whitespace, and words outside the vocabulary (another system prompt, say) become <unk>.
"""
from __future__ import annotations

from pathlib import Path

from pruner.embedded.task import words
from pruner.prompting import DEFAULT_SYSTEM_PROMPT, FAST_SOLVING_SUFFIX

PAD, UNK, IM_START, IM_END = "<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>"
SPECIALS = [PAD, UNK, IM_START, IM_END]
SPACE = "\u2581"


def _jinja_literal(text: str) -> str:
    """`text` as a single-quoted Jinja string literal (Jinja unescapes backslashes like Python)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


# ChatML, as Qwen models use it; the generation prompt opens the assistant turn. Like Qwen's own
# templates, a conversation without a system turn gets the model's system prompt (the project's,
# which every training trace was prompted with): prompted "the ordinary way" with only a user
# turn, the model sees exactly the prompt it was trained and profiled on.
CHAT_TEMPLATE = (
    "{% if not messages or messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n' + " + _jinja_literal(DEFAULT_SYSTEM_PROMPT) + " + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def vocabulary() -> list[str]:
    """Specials first (fixed ids), then chat roles, prompt words, and the task's words."""
    vocab = list(SPECIALS) + ["system", "user", "assistant"]
    # The project's own prompts (default and the fast-solving baseline) are known words.
    for text in (DEFAULT_SYSTEM_PROMPT, FAST_SOLVING_SUFFIX):
        vocab += text.split()
    vocab += words()
    return list(dict.fromkeys(vocab))


def build_tokenizer():
    """A transformers fast tokenizer wrapping the word-level `tokenizers` model."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Each word token carries its leading space as "\u2581" (SentencePiece style): token-by-token
    # streaming decoders (vLLM's) then emit the spaces too, not only whole-sequence decoding.
    vocab = {(w if w in SPECIALS else SPACE + w): i for i, w in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),  # newlines and runs of spaces separate words too
        pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=False),
    ])
    core.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="always", split=False)
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token=UNK,
        pad_token=PAD,
        eos_token=IM_END,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(out: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out`."""
    build_tokenizer().save_pretrained(str(out))
