"""GPU-only paths checked as far as a CPU can: Liger patched before the model is built (with the
bundled wheel), no vLLM on the trainer's import path (the GPU machine has none), and the
gpu_check fixture building a training set with the project's own writer."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'kernels'}"}


def _python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env or ENV, cwd=ROOT,
                          timeout=600)


@pytest.mark.slow
def test_trainer_import_path_has_no_vllm():
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'vllm' or name.startswith('vllm.'): raise ImportError('no vLLM on the GPU machine')\n"
            "sys.meta_path.insert(0, Block())\n"
            "import pruner.train, pruner.plan, pruner.step, pruner.modeling, pruner.checkpoint, pruner.old_logps\n"
            "from pruner.cli import build_parser\n"
            "build_parser(pruner.train.TrainConfig).format_help()\n"
            "assert not [m for m in sys.modules if m.startswith('vllm')]\n")
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_liger_is_patched_before_the_model_is_built_and_the_log_says_what(tmp_path, model_type):
    wheel = next((ROOT / ".cache" / "gpu-wheels").glob("liger_kernel-*.whl"), None)
    if wheel is None:
        pytest.skip("no Liger wheel in .cache/gpu-wheels (make gpu-wheels)")
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target",
                          str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    if pip.returncode:
        pytest.skip(f"could not install the Liger wheel here: {pip.stderr[-500:]}")
    code = (f"from pruner.modeling import apply_liger\nfrom pruner.presets import config_for\n"
            f"from transformers import AutoModelForCausalLM\nimport torch\n"
            f"print(apply_liger({model_type!r}))\n"
            f"cfg = config_for('cpu-small', model_type={model_type!r}, num_hidden_layers=1)\n"
            f"with torch.device('meta'):\n    m = AutoModelForCausalLM.from_config(cfg)\n"
            f"print('norm', type(m.model.norm).__module__)\nprint('mlp', type(m.model.layers[0].mlp).__module__)\n")
    proc = _python(code, {**ENV, "PYTHONPATH": f"{ENV['PYTHONPATH']}:{site}"})
    if proc.returncode and "liger" in proc.stderr.lower() and "import" in proc.stderr.lower():
        pytest.skip(f"liger-kernel does not import on this CPU: {proc.stderr[-500:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == f"liger-kernel patched rope, rms_norm, swiglu into {model_type}"
    # Built after the patch, so the model's modules are Liger's classes.
    assert lines[1].startswith("norm liger_kernel") and lines[2].startswith("mlp liger_kernel")


def test_liger_reports_unpatched_types_and_a_missing_install():
    from pruner.modeling import apply_liger

    message = apply_liger("gpt2")
    assert "not installed" in message or ("no patch" in message and "gpt2" in message)


@pytest.mark.slow
def test_gpu_check_fixture_builds_a_model_and_a_trainset_the_trainer_accepts(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "trainer_fixture.py"), "--arch", "cpu-small",
                           "--response-tokens", "40", "--problems", "2", "--k", "4", "--device", "cpu",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from transformers import AutoConfig

    from pruner.dataset import load_trainset

    out = json.loads(proc.stdout.splitlines()[-1])
    data = load_trainset(out["trainset"])
    assert len(data["prompt_lengths"]) == 8
    assert int(data["input_ids"].max()) < AutoConfig.from_pretrained(out["model"]).vocab_size == 32000
    assert int(data["response_lengths"].max()) <= 40
