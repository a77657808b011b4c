"""The README's kernel examples are a contract: they must run as written and mean what they say."""
import re
from pathlib import Path

import pytest
import torch


@pytest.mark.slow
def test_readme_kernel_example_runs_and_its_results_hold():
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - our own documentation
    assert scope["logp"].dtype == torch.float32 and (scope["logp"] <= 0).all()
    assert (scope["logp"][:, :10] == 0).all()
    assert scope["lengths"].tolist() == [90] * 4
    assert torch.isfinite(scope["loss"]) and scope["hidden"].grad is not None
    assert {"ratio_mean", "clip_frac"} <= set(scope["stats"])
