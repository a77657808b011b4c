"""Test-wide set-up. Without a GPU the Triton kernels run in Triton's interpreter on the CPU.

TRITON_INTERPRET must be set before any `triton.jit` decoration runs, i.e. before `o1pruner_kernels` is
imported by any test module, so it lives here at the root of the suite.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# --- Paths and subprocess runs shared by the test files ---
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_data(name: str) -> Path:
    """A file of the shared data sets: under $O1PRUNER_DATA, else in the nearest `shared/data` folder
    above the checkout (`../shared/data`; a git worktree sits deeper). Tests skip when it is absent."""
    if os.environ.get("O1PRUNER_DATA"):
        return Path(os.environ["O1PRUNER_DATA"]) / name
    for parent in REPO_ROOT.parents:
        if (parent / "shared" / "data").is_dir():
            return parent / "shared" / "data" / name
    return REPO_ROOT.parent / "shared" / "data" / name


def run_script(folder: Path, source: str, *args: str, env: dict[str, str] | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """`source` as a script in a fresh Python (this checkout's `pruner` first); fails the test on a non-zero exit.

    A fresh process because vLLM wants one per engine and a main-guarded entry point."""
    script = folder / "script.py"
    script.write_text(source)
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=REPO_ROOT,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}, timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


# --- Tiny random-init Qwen2 model (data/pre-sampling tests; the trainer's tests reuse it) ---
import json  # noqa: E402

import pytest  # noqa: E402

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tiny_model(out_dir: Path, *, vocab_size: int = 512, seed: int = 0) -> Path:
    """A few-hundred-KB Qwen2 that vLLM and transformers both load; random weights, ChatML template.

    head_dim 64 because vLLM's CPU attention rejects smaller heads; a byte-level BPE so any text
    (LaTeX, unicode) tokenizes without unknown tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [
        "Please reason step by step, and put your final answer within \\boxed{}.",
        "What is 12 + 7? The answer is \\boxed{19}. Let me check: 12 + 7 = 19.",
        "system user assistant 0 1 2 3 4 5 6 7 8 9 + - * / = ( ) \\frac{1}{2} x^2",
    ] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_special_tokens(TINY_SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out_dir)
    # also inline the template in tokenizer_config.json: older loaders only look there
    tok_config = json.loads((out_dir / "tokenizer_config.json").read_text())
    tok_config["chat_template"] = CHATML_TEMPLATE
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(fast),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        eos_token_id=fast.eos_token_id,
        bos_token_id=None,
        pad_token_id=fast.pad_token_id,
        torch_dtype="float32",
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = fast.eos_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "BUILT_BY").write_text(json.dumps({"builder": "tests/conftest.py:build_tiny_model"}))
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny random-init Qwen2 (config, safetensors, tokenizer with a ChatML template)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def write_samples_meta(samples: Path, tokenizer, *, model: Path | str | None = None, k: int | None = None) -> Path:
    """The `.meta.json` pre-sampling writes next to a samples file (the fields the dataset reads)."""
    from pruner.model_files import tokenizer_fingerprint
    from pruner.samples import meta_path

    meta = {"model": str(model) if model is not None else None, "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "sampling": {"k": k}}
    path = meta_path(samples)
    path.write_text(json.dumps(meta))
    return path


# --- The interpreter stays on for the whole suite ---
# A module that drops TRITON_INTERPRET when imported in the test process (bench/kernel_resources.py once did, and
# tests/test_docs.py imports the scripts its pages name) turned every later Triton test into "needs CUDA
# tensors". Name the test that did it instead.
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET")


def _interpret_changed() -> str | None:
    now = os.environ.get("TRITON_INTERPRET")
    if now == _TRITON_INTERPRET:
        return None
    if _TRITON_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _TRITON_INTERPRET
    return f"TRITON_INTERPRET changed from {_TRITON_INTERPRET!r} to {now!r} in this process"


def pytest_collection_finish(session):
    if message := _interpret_changed():
        raise pytest.UsageError(f"{message} while test modules were imported")


@pytest.fixture(autouse=True)
def _triton_interpret_unchanged():
    yield
    if message := _interpret_changed():
        pytest.fail(f"{message} by this test: every later Triton test would run without the interpreter")


# --- The rehearsal (tests/test_rehearsal.py, `make rehearsal`) runs only when asked for by marker ---
def pytest_collection_modifyitems(config, items):
    """Leave `rehearsal` tests out unless `-m` names them: `make test` and CI do not run them."""
    if "rehearsal" in (config.getoption("markexpr") or ""):
        return
    kept = [item for item in items if item.get_closest_marker("rehearsal") is None]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("rehearsal")])
        items[:] = kept
