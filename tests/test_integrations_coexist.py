"""The library's import name coexists with Hugging Face's `kernels`, and imports no trainer.

The test extra installs Hugging Face's `kernels` distribution, so this suite runs where the name
`kernels` is theirs. Each check runs in a fresh interpreter, once from the repository root (the
checkout's top-level `kernels/` folder is then on sys.path) and once from elsewhere.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

COEXIST = """
import importlib.metadata, pathlib, sys
import kernels, o1pruner_kernels
from packaging.version import Version
from transformers.utils.import_utils import is_kernels_available

root = pathlib.Path(sys.argv[1]).resolve()
theirs = pathlib.Path(kernels.__file__).resolve()
# The venv may live inside the checkout (.venv/): what matters is that the name is not our folder.
assert (root / "kernels") not in theirs.parents and "site-packages" in theirs.parts, \
    f"`import kernels` resolved into the checkout: {theirs}"
assert callable(getattr(kernels, "get_kernel", None)), f"{theirs} is not Hugging Face's kernels"
assert Version(importlib.metadata.version("kernels")) >= Version("0.17"), importlib.metadata.version("kernels")
from transformers.utils import import_utils
assert is_kernels_available(), (f"transformers no longer sees Hugging Face's kernels "
    f"{importlib.metadata.version('kernels')}: it takes [{import_utils.KERNELS_MIN_VERSION}, "
    f"{import_utils.KERNELS_MAX_VERSION}); the pin in setup.py's test extra must follow")
ours = pathlib.Path(o1pruner_kernels.__file__).resolve()
assert ours.parent.name == "o1pruner_kernels" and ours != theirs, ours
assert callable(o1pruner_kernels.fused_linear_logprobs)
print("ok", theirs, ours)
"""

NO_TRAINER_IMPORTS = """
import sys
import o1pruner_kernels, o1pruner_kernels.integrations
import o1pruner_kernels.integrations.trl, o1pruner_kernels.integrations.verl, o1pruner_kernels.integrations.openrlhf
loaded = sorted(m for m in ("trl", "verl", "openrlhf", "pruner", "deepspeed", "ray") if m in sys.modules)
assert not loaded, f"importing the kernels pulled in {loaded}"
print("ok")
"""


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    # `python -c` puts the working directory first on sys.path, as running from a checkout does.
    return subprocess.run(
        [sys.executable, "-c", code, str(ROOT)], cwd=cwd, env=dict(os.environ), capture_output=True, text=True,
        timeout=300,
    )


@pytest.mark.slow
@pytest.mark.parametrize("where", ["repo_root", "elsewhere"])
def test_hf_kernels_and_o1pruner_kernels_coexist(where, tmp_path):
    done = run_python(COEXIST, ROOT if where == "repo_root" else tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")


@pytest.mark.slow
def test_kernels_and_integrations_import_no_trainer(tmp_path):
    done = run_python(NO_TRAINER_IMPORTS, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]


def test_no_bench_script_shadows_an_installed_package():
    import importlib.metadata

    installed = importlib.metadata.packages_distributions()  # top-level import name -> distributions
    clashes = {p.stem: installed[p.stem] for p in (ROOT / "bench").glob("*.py") if p.stem in installed}
    assert not clashes, f"bench scripts named like installed packages: {clashes}"
