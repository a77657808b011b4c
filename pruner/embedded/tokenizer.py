"""The embedded model's word-level tokenizer, built with the `tokenizers` library.

One token per whitespace-separated word: numbers 0..99 are single tokens, which is what makes
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

# ChatML, as Qwen models use it; the generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
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

    vocab = {word: i for i, word in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # WordPiece's decoder with an unused prefix joins words with one space; no clean-up, so
    # " ." stays " ." and a trace decodes to the exact text it was written as.
    core.decoder = decoders.WordPiece(prefix="\u2581\u2581", cleanup=False)
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
