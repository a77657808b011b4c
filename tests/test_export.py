"""The streamed Hugging Face export (pruner/export.py): per-tensor cast, shard files written as they fill,
rank 0 holding at most one shard, and a folder transformers loads, from one process and from FSDP2 shards."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _cpu():
    from pruner.distributed import Dist

    return Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def test_shard_plan_fills_files_in_order_and_names_them_for_the_index():
    from pruner.export import shard_plan

    plan = shard_plan({"a": 40, "b": 40, "c": 30, "d": 100, "e": 1}, max_shard_bytes=100)
    names = [f"model-0000{i}-of-00004.safetensors" for i in (1, 2, 3, 4)]
    assert plan == {"a": names[0], "b": names[0], "c": names[1], "d": names[2], "e": names[3]}
    assert set(shard_plan({"a": 1, "b": 2}, 100).values()) == {"model.safetensors"}
    # a tensor larger than a shard gets a file of its own, never an empty one
    big = shard_plan({"a": 10, "b": 500, "c": 10}, 100)
    assert len(set(big.values())) == 3


def test_streamed_export_writes_shards_as_they_fill_and_transformers_loads_it(tiny_model_dir, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from pruner.export import export_hf, stream_weights
    from pruner.modeling import prepare_model

    policy = prepare_model(str(tiny_model_dir), _cpu(), liger=False)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # the export must hold these weights, not the source's
    limit = 128 * 1024
    out = export_hf(policy, tmp_path / "export", str(tiny_model_dir), _cpu(), max_shard_bytes=limit)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and all((out / f).exists() for f in files)
    assert files[0].startswith("model-00001-of-") and not (out / "model.safetensors").exists()
    for f in files:
        with safe_open(str(out / f), framework="pt") as fh:
            assert sorted(fh.keys()) == sorted(k for k, v in index["weight_map"].items() if v == f)
    loaded = AutoModelForCausalLM.from_pretrained(str(out))
    trained = dict(policy.lm.named_parameters())
    for name, param in loaded.named_parameters():
        torch.testing.assert_close(param, trained[name], rtol=0, atol=0)
    assert torch.isfinite(loaded(torch.tensor([[1, 2, 3]])).logits).all()

    # Rank 0 buffers at most one shard plus one tensor, never the whole state dict.
    bf16 = tmp_path / "bf16"
    bf16.mkdir()
    writer = stream_weights(policy, bf16, _cpu(), dtype=torch.bfloat16, config=loaded.config, max_shard_bytes=limit)
    total = index["metadata"]["total_size"] // 2  # the same tensors in bf16
    largest = max(p.numel() * 2 for p in policy.parameters())
    assert writer.peak_bytes <= limit + largest < total and len(writer.written) >= 2
    with safe_open(str(bf16 / writer.written[0]), framework="pt") as fh:
        name = next(iter(fh.keys()))
        assert fh.get_tensor(name).dtype == torch.bfloat16
        torch.testing.assert_close(fh.get_tensor(name), trained[name].to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.slow
def test_two_fsdp2_ranks_export_the_full_weights(tiny_model_dir, tmp_path):
    """The main path: every tensor is a DTensor shard, gathered one at a time over gloo."""
    script = tmp_path / "export2.py"
    script.write_text(f"""
import torch
from pathlib import Path
from pruner import distributed
from pruner.export import export_hf
from pruner.modeling import prepare_model
d = distributed.init("cpu")
policy = prepare_model({str(tiny_model_dir)!r}, d, liger=False)
assert d.world_size == 2 and all(hasattr(p, "full_tensor") for p in policy.parameters())
export_hf(policy, Path({str(tmp_path / 'export')!r}), {str(tiny_model_dir)!r}, d, max_shard_bytes=128 * 1024)
distributed.shutdown()
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'kernels'}"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"))
    assert len(list((tmp_path / "export").glob("model-*-of-*.safetensors"))) >= 3
    for (name, a), (_, b) in zip(base.named_parameters(), exported.named_parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
