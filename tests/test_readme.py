"""The README is a newcomer's page and the kernels' example a contract: it must run as written and mean what it says."""
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_readme_starts_with_make_demo_and_make_test_and_stays_short():
    text = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)```", text, re.S)
    assert [c.split()[:2] for c in commands[:2]] == [["make", "demo"], ["make", "test"]]
    assert text.index("make demo") < text.index("\n## ")  # before any section: the first thing a reader sees
    assert len(text.splitlines()) <= 200, "the README is the short page; depth goes to docs/ (docs/development.md)"
    sections = re.findall(r"^## (.*)$", text, re.M)
    assert sections == ["What `make demo` shows", "Prune your own model", "Use the kernels in your trainer",
                        "Repository map", "Documentation"]


@pytest.mark.slow
def test_kernels_api_example_runs_and_its_results_hold():
    text = (ROOT / "docs" / "kernels.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "import o1pruner_kernels as opk" in b)
    scope: dict = {}
    exec(compile(block, "docs/kernels.md", "exec"), scope)  # noqa: S102 - our own documentation
    assert scope["logp"].dtype == torch.float32 and (scope["logp"] <= 0).all()
    assert (scope["logp"][:, :10] == 0).all()
    assert scope["lengths"].tolist() == [90] * 4
    assert torch.isfinite(scope["loss"]) and scope["hidden"].grad is not None
    assert {"ratio_mean", "clip_frac"} <= set(scope["stats"])
