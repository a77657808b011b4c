"""Devices (issue 21 finding 9).

1. Every Triton launch of the package runs under a guard for its tensors' device: Triton launches on
   the current CUDA device, so a model on cuda:1 while cuda:0 is current was an illegal access.
   A CPU cannot show the illegal access; it can show that no launch bypasses the guard (source
   scan) and that each op's launches pass through it with the tensors' device (recorded at run time).
2. TRL's fused head on an FSDP2-sharded model, on a real one-rank gloo FSDP2 group: with the head in
   the root's unit it scores with the unsharded weight exactly as without FSDP; a head sharded as
   its own unit is refused (it was gathered with `full_tensor()`: fp32, gradient summed outside FSDP).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from test_kernels_common import DEVICE

import o1pruner_kernels
from o1pruner_kernels import _backend, clipped_ratio_loss, fused_linear_logprobs, logprobs_from_logits

PACKAGE = Path(o1pruner_kernels.__file__).parent


def _subscript_calls(tree: ast.AST) -> list[ast.Call]:
    """Calls of the form `x[...](...)`: how a Triton kernel (or autotuner) is launched."""
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Subscript)]


def test_every_triton_launch_goes_through_the_device_guard():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for call in _subscript_calls(tree):
            # the one allowed launch: inside _backend.launch, under device_guard
            owner = [f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                     and f.lineno <= call.lineno <= f.end_lineno]
            if not (path.name == "_backend.py" and owner == ["launch"]):
                offenders.append(f"{path.relative_to(PACKAGE)}:{call.lineno}")
    assert not offenders, f"Triton launches outside _backend.launch (no device guard): {offenders}"
    # and the scan does see a launch: the helper's own
    assert len(_subscript_calls(ast.parse((PACKAGE / "_backend.py").read_text()))) == 1


def test_guard_is_the_tensors_cuda_device():
    guard = _backend.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(_backend.device_guard(torch.device("cpu")), torch.cuda.device)


def test_launch_refuses_tensors_on_two_devices():
    with pytest.raises(ValueError, match="one device"):
        _backend.launch(None, (1,), torch.zeros(1), torch.zeros(1, device="meta"))


def test_each_op_launches_under_its_tensors_device(monkeypatch):
    """Run every op (forward and backward) on the Triton path; each launch enters the guard with
    the device of its tensors, and every op launched at least once."""
    seen: list[tuple[str, torch.device]] = []
    real = _backend.device_guard

    def recording(device):
        seen.append((current_op, device))
        return real(device)

    monkeypatch.setattr(_backend, "device_guard", recording)
    gen = torch.Generator().manual_seed(3)
    dev = torch.device(DEVICE)

    current_op = "fused_linear_logprobs"
    h = torch.randn(7, 20, generator=gen).to(dev).requires_grad_()
    w = torch.randn(45, 20, generator=gen).to(dev).requires_grad_()
    y = torch.randint(0, 45, (7,), generator=gen).to(dev)
    for bwd in ("matmul", "atomic"):
        fused_linear_logprobs(h, w, y, backend="triton", bwd=bwd).sum().backward()

    current_op = "logprobs_from_logits"
    x = torch.randn(5, 30, generator=gen).to(dev).requires_grad_()
    logprobs_from_logits(x, torch.randint(0, 30, (5,), generator=gen).to(dev), backend="triton").sum().backward()

    current_op = "clipped_ratio_loss"
    lp = torch.randn(3, 8, generator=gen).to(dev).requires_grad_()
    for level in ("sequence", "token"):
        loss, _ = clipped_ratio_loss(lp, lp.detach() * 0.9, torch.randn(3, generator=gen).to(dev),
                                     torch.ones(3, 8, dtype=torch.bool, device=dev), level=level, backend="triton")
        loss.backward()

    assert {op for op, _ in seen} == {"fused_linear_logprobs", "logprobs_from_logits", "clipped_ratio_loss"}
    assert all(d == dev for _, d in seen), seen
    # fused: (fwd + bwd) x 2 modes; logits: fwd + bwd; loss: sequence fwd, token fwd + bwd
    assert len(seen) == 4 + 2 + 3, seen


# --- TRL's fused head under FSDP2 (one rank, gloo) ---

def _tiny_causal_lm():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    return Qwen2ForCausalLM(config)


@pytest.fixture
def one_rank_group():
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.device_mesh import init_device_mesh

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _scored(model, ids, labels):
    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    out.log_probs.sum().backward()
    return out.log_probs.detach()


def test_trl_head_in_the_root_unit_matches_unsharded(one_rank_group):
    pytest.importorskip("trl")
    from torch.distributed.fsdp import fully_shard

    from o1pruner_kernels.integrations.trl import add_fused_lm_head

    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    plain, sharded = _tiny_causal_lm(), _tiny_causal_lm()
    for layer in sharded.model.layers:
        fully_shard(layer, mesh=one_rank_group)
    fully_shard(sharded, mesh=one_rank_group)  # the head belongs to the root's unit
    assert type(sharded.lm_head.weight).__name__ == "DTensor"  # sharded outside the forward
    for model in (plain, sharded):
        add_fused_lm_head(model, temperature=0.7)
    want, got = _scored(plain, ids, ids), _scored(sharded, ids, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sharded.lm_head.weight.grad.full_tensor(), plain.lm_head.weight.grad,
                               rtol=1e-5, atol=1e-6)


def test_trl_head_sharded_as_its_own_unit_is_refused(one_rank_group):
    pytest.importorskip("trl")
    from torch.distributed.fsdp import fully_shard

    from o1pruner_kernels.integrations.trl import add_fused_lm_head

    model = _tiny_causal_lm()
    fully_shard(model.lm_head, mesh=one_rank_group)
    fully_shard(model, mesh=one_rank_group)
    add_fused_lm_head(model)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    with pytest.raises(NotImplementedError, match=r"DTensor.*Shard.*fully_shard\(model.lm_head\)"):
        model(input_ids=ids, labels=ids, fused_lm_head=True)
