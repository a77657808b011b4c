"""What a model folder holds, and its identity: the tokenizer, its EOS ids, fingerprints of both."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def is_local_model(path: str | os.PathLike) -> bool:
    """True when `path` is a folder holding a model or tokenizer (not a hub id)."""
    p = Path(path).expanduser()
    return p.is_dir() and any((p / name).exists() for name in ("config.json", "tokenizer.json", "tokenizer_config.json"))


# A tokenizer's vocabulary lives in one of these (fast, SentencePiece, BPE, WordPiece, tiktoken); a folder
# with none of them (weights copied without the tokenizer) failed deep inside a tokenizer backend.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "*.tiktoken")


def check_tokenizer_files(folder: Path) -> None:
    """A local model folder must hold a tokenizer's vocabulary; the error names the files looked for."""
    if any(next(folder.glob(name), None) is not None for name in TOKENIZER_FILES):
        return
    config = folder / "tokenizer_config.json"
    if config.is_file() and "auto_map" in json.loads(config.read_text(encoding="utf-8") or "{}"):
        return  # a tokenizer class of the model's own code: its file names are its own
    held = sorted(p.name for p in folder.iterdir())[:12]
    raise FileNotFoundError(f"{folder}: no tokenizer files (looked for {', '.join(TOKENIZER_FILES)}); the folder "
                            f"holds {held}. Copy the tokenizer files of the model it was trained from into it.")


def load_tokenizer(path_or_id: str | os.PathLike, **kwargs: Any) -> Any:
    """The model's own (fast) tokenizer; a local folder never triggers a hub lookup."""
    from transformers import AutoTokenizer

    if is_local_model(path_or_id):
        check_tokenizer_files(Path(path_or_id).expanduser())
        kwargs.setdefault("local_files_only", True)
    return AutoTokenizer.from_pretrained(str(path_or_id), **kwargs)


def check_tokenizer_fits(model: str, tokenizer: Any) -> None:
    """Every id the tokenizer can produce must have an embedding row: a larger tokenizer ended in an
    IndexError inside the engine, 44 s in. Read from config.json, before any engine starts."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    rows = getattr(text, "vocab_size", None)
    if rows and len(tokenizer) > rows:
        raise ValueError(f"{model}: its tokenizer has {len(tokenizer)} tokens, more than the {rows} rows of the "
                         "model's embedding (config.json vocab_size): the tokenizer is not this model's")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over the sorted vocabulary (token, id) items plus the special tokens.

    Token ids are only meaningful with the tokenizer that produced them; a dataset records this
    fingerprint so that training it with another tokenizer fails loudly instead of silently
    learning garbage.
    """
    vocab = tokenizer.get_vocab()
    special = {
        "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "eos_token_id": tokenizer.eos_token_id,
        "added": sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", [])),
    }
    digest = hashlib.sha256()
    digest.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode("utf-8"))
    digest.update(json.dumps(special, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    return "sha256:" + digest.hexdigest()


def eos_token_ids(tokenizer: Any, model_path: str | os.PathLike | None = None) -> list[int]:
    """Every id that ends a turn: the tokenizer's EOS plus generation_config.json's eos ids."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if model_path is not None:
        gen_config = Path(model_path) / "generation_config.json"
        if gen_config.is_file():
            eos = json.loads(gen_config.read_text()).get("eos_token_id")
            for i in eos if isinstance(eos, list) else [eos]:
                if i is not None and int(i) not in ids:
                    ids.append(int(i))
    return ids


def model_fingerprint(path: str) -> str:
    """Cheap identity of a model folder: its config and the head and tail of every weights file."""
    digest = hashlib.sha256()
    root = Path(path)
    if not root.is_dir():  # a hub id: its name is all we can see without downloading
        digest.update(path.encode())
        return digest.hexdigest()[:16]
    for file in sorted(root.iterdir()):
        if file.name == "config.json":
            digest.update(file.read_bytes())
        elif file.suffix in (".safetensors", ".bin"):
            size = file.stat().st_size
            digest.update(f"{file.name}:{size}".encode())
            with file.open("rb") as f:
                digest.update(f.read(1 << 20))
                f.seek(max(0, size - (1 << 20)))
                digest.update(f.read(1 << 20))
    return digest.hexdigest()[:16]
