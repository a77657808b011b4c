"""Architectures of the models the paper and its users train, for building random-weight stand-ins.

Values are copied from each model's published config.json (QwQ-32B shares qwen2.5-32b's shape,
DeepSeek-R1-Distill-Qwen-7B qwen2.5-7b's). Nothing is downloaded: `config_for` builds a
transformers config, and `transformers.AutoModelForCausalLM.from_config` the model.
"""
from __future__ import annotations

from typing import Any

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                         tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1e6),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                         tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1e6),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
                       tie_word_embeddings=False, max_position_embeddings=131072, rope_theta=1e4),
    "qwen2.5-32b": dict(model_type="qwen2", hidden_size=5120, num_hidden_layers=64, num_attention_heads=40,
                        num_key_value_heads=8, intermediate_size=27648, vocab_size=152064,
                        tie_word_embeddings=False, max_position_embeddings=131072, rope_theta=1e6),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                         tie_word_embeddings=False, max_position_embeddings=131072, rope_theta=5e5,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # Small shapes for CPU runs of the same code paths (dry runs, tests); not real models.
    "cpu-small": dict(model_type="qwen2", hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=768, vocab_size=32000, tie_word_embeddings=False,
                      max_position_embeddings=32768, rope_theta=1e6),
    # cpu-small's depth and width, but deep: its LM head is ~22% of a token's FLOPs (between Qwen2.5-0.5B's 28%
    # and 1.5B's 15%; cpu-small's is ~70%), so a benchmark of what happens in the decoder (packing) is not
    # drowned by a head no real model of these families carries.
    "cpu-deep": dict(model_type="qwen2", hidden_size=256, num_hidden_layers=24, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=1344, vocab_size=32000, tie_word_embeddings=False,
                     max_position_embeddings=32768, rope_theta=1e6),
    "qwen2.5-0.5b-tiny": dict(model_type="qwen2", hidden_size=224, num_hidden_layers=6, num_attention_heads=14,
                              num_key_value_heads=2, intermediate_size=1216, vocab_size=151936,
                              tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1e6),
}


def config_for(arch: str, **overrides: Any):
    """A transformers config of preset `arch` (random-weight models are built from it)."""
    from transformers import AutoConfig

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; presets: {', '.join(sorted(ARCHITECTURES))}")
    values = {**ARCHITECTURES[arch], **overrides}
    return AutoConfig.for_model(values.pop("model_type"), **values)
