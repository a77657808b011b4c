"""Collectives only through pruner/distributed.py, on the group's device; FSDP2 + the fused head.

NCCL cannot run here, so the rules that keep NCCL working are checked where a CPU can check them:
the device each backend needs, the helpers' device/dtype contract under a real (gloo) process
group, and a scan of the sources for any collective called around the helpers.
"""
from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pruner import distributed
from pruner.distributed import Dist

ROOT = Path(__file__).resolve().parent.parent
COLLECTIVES = {"all_reduce", "broadcast", "broadcast_object_list", "barrier", "all_gather", "all_gather_object",
               "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor", "reduce", "gather",
               "gather_object", "scatter", "scatter_object_list", "all_to_all", "all_to_all_single", "send", "recv",
               "isend", "irecv", "monitored_barrier", "batch_isend_irecv"}


def direct_collective_calls(source: str) -> list[str]:
    """`dist.x(...)` / `torch.distributed.x(...)` / a bare `x(...)` imported from torch.distributed."""
    tree = ast.parse(source)
    aliases = {"torch.distributed"}
    bare: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name == "torch.distributed"}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            bare |= {a.asname or a.name for a in node.names if a.name in COLLECTIVES}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in COLLECTIVES and ast.unparse(func.value) in aliases:
            found.append(f"line {node.lineno}: {ast.unparse(func)}")
        elif isinstance(func, ast.Name) and func.id in bare:
            found.append(f"line {node.lineno}: {func.id}")
    return found


def test_the_scan_finds_every_spelling_of_a_direct_collective():
    snippet = ("import torch\nimport torch.distributed as dist\nfrom torch.distributed import all_reduce as ar\n"
               "dist.all_reduce(x)\ntorch.distributed.broadcast(x, 0)\nar(x)\ndist.get_rank()\n")
    assert [c.split(": ")[1] for c in direct_collective_calls(snippet)] == [
        "dist.all_reduce", "torch.distributed.broadcast", "ar"]


def test_no_module_calls_a_collective_outside_pruner_distributed():
    files = sorted((ROOT / "pruner").rglob("*.py")) + sorted((ROOT / "bench").rglob("*.py"))
    offenders = {str(f.relative_to(ROOT)): calls for f in files if f != ROOT / "pruner" / "distributed.py"
                 and (calls := direct_collective_calls(f.read_text()))}
    assert not offenders, f"collectives must go through pruner/distributed.py helpers: {offenders}"


@pytest.mark.parametrize("backend, tensor_device, expected", [
    ("nccl", "cpu", "cuda"), ("nccl", "cuda", "cuda"), ("gloo", "cpu", "cpu"), ("fake", "cpu", "cpu"),
    ("cpu:gloo,cuda:nccl", "cpu", "cpu"), ("cpu:gloo,cuda:nccl", "cuda", "cuda")])
def test_each_backend_gets_tensors_on_its_device(backend, tensor_device, expected):
    assert distributed.device_for_backend(backend, torch.device(tensor_device)).type == expected


@pytest.fixture()
def one_rank_gloo():
    """A real gloo process group of one rank in this process (torch.distributed's own code paths)."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.int64, torch.bool])
@pytest.mark.parametrize("helper", ["all_reduce_sum", "all_reduce_max", "broadcast"])
def test_helpers_return_a_new_tensor_with_the_callers_device_and_dtype(one_rank_gloo, helper, dtype):
    source = (torch.arange(6).reshape(2, 3) % 2 == 1) if dtype == torch.bool else torch.arange(6).reshape(2, 3).to(dtype)
    before = source.clone()
    out = getattr(distributed, helper)(source)
    assert (out.device, out.dtype, out.shape) == (source.device, source.dtype, source.shape)
    assert torch.equal(out, before) and torch.equal(source, before)  # one rank: sum = max = own values
    assert out.data_ptr() != source.data_ptr()  # never the caller's storage


def test_helpers_without_a_process_group_are_copies():
    assert not dist.is_initialized()
    x = torch.ones(3, dtype=torch.float16)
    for helper in (distributed.all_reduce_sum, distributed.all_reduce_max, distributed.broadcast):
        out = helper(x)
        assert out.dtype == x.dtype and torch.equal(out, x) and out.data_ptr() != x.data_ptr()
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}


def test_broadcast_object_and_buffers_under_a_process_group(one_rank_gloo):
    assert distributed.broadcast_object(["x", 2]) == ["x", 2]
    module = torch.nn.Module()
    module.register_buffer("inv_freq", torch.arange(4.0), persistent=False)
    assert distributed.broadcast_buffers(module) == 1
    assert torch.equal(module.inv_freq, torch.arange(4.0))
    distributed.barrier()


def _tiny_lm(tie: bool):
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


@pytest.mark.parametrize("tie", [True, False])
def test_fsdp2_policy_matches_the_plain_model_without_the_view_warning(one_rank_gloo, tie):
    """FSDP2 over TokenLogprobs (root holds embedding + LM head, tied or not): the log-probs are the
    plain model's, the head gets its gradient, and FSDP2 no longer warns about a view output."""
    from pruner.modeling import TokenLogprobs, shard_policy

    plain = _tiny_lm(tie)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    with torch.no_grad():
        ref = torch.log_softmax(plain(input_ids=ids).logits.double(), -1)
    ref = ref.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels != -100)
    policy = shard_policy(TokenLogprobs(_tiny_lm(tie)), one_rank_gloo, mixed_precision=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logps = policy(ids, torch.ones_like(ids), labels)
        logps.sum().backward()
    assert not [w for w in caught if "returned a view tensor" in str(w.message)]
    torch.testing.assert_close(logps.double(), ref, rtol=1e-4, atol=1e-5)
    head = policy.lm.get_output_embeddings().weight
    assert head.grad is not None and head.grad.to_local().abs().sum() > 0
    assert (policy.lm.get_input_embeddings().weight is head) == tie
