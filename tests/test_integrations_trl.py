"""TRL's own GRPOTrainer, with and without `patch_grpo_trainer()`, on the embedded default model (CPU).

Both trainers start from the same weights and score the same generated batch; TRL's code computes
the loss. Unpatched, TRL 1.16 uses its own chunked fused head; patched, `fused_linear_logprobs`.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

import o1pruner_kernels.integrations.trl as o1trl

MODEL_DIR = Path(__file__).resolve().parents[1] / "pruner" / "assets" / "default_model"
# Prompts of different lengths, so the prompts are left-padded and the attention mask matters.
PROMPTS = ["What is 1+1?", "Name a color, please.", "2+2=?", "Say hi to the reader in one word."]
COMPLETION_LEN = 6
FUSED = o1trl.fused_linear_logprobs  # the kernel entry point the patch calls


def char_code_reward(completions, **_) -> list[float]:
    """A reward that differs between completions, so the advantages (and gradients) are not zero."""
    return [float(sum(map(ord, c)) % 7) for c in completions]


def build_trainer(patched: bool, tmp_path: Path, **overrides) -> GRPOTrainer:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    settings = dict(
        output_dir=str(tmp_path / ("patched" if patched else "trl")), per_device_train_batch_size=4,
        num_generations=4, max_completion_length=COMPLETION_LEN, use_vllm=False, bf16=False, use_cpu=True,
        report_to="none", save_strategy="no", seed=0, max_steps=1,
        beta=0.04,  # a reference model, scored by the (patched) fused head too
        entropy_coef=0.01,  # entropies enter the loss: their gradient is checked too
        temperature=0.7,
    )
    args = GRPOConfig(**{**settings, **overrides})
    if patched:
        o1trl.patch_grpo_trainer()
    try:
        return GRPOTrainer(
            model=model, reward_funcs=char_code_reward, args=args,
            train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
            processing_class=AutoTokenizer.from_pretrained(MODEL_DIR),
        )
    finally:
        o1trl.unpatch_grpo_trainer()


@pytest.fixture(scope="module")
def trainers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grpo")
    return build_trainer(False, tmp), build_trainer(True, tmp)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def test_patch_replaces_the_fused_head_of_policy_and_reference(trainers):
    trl_trainer, patched = trainers
    assert o1trl.is_patched(patched.model) and o1trl.is_patched(patched.ref_model)
    assert not o1trl.is_patched(trl_trainer.model)


def test_grpo_step_same_logps_loss_and_gradients(trainers, monkeypatch):
    trl_trainer, patched = trainers
    batch = next(iter(trl_trainer.get_train_dataloader()))
    torch.manual_seed(1)
    inputs = trl_trainer._prepare_inputs(batch)  # TRL generates, rewards, scores the reference model
    torch.manual_seed(1)
    inputs_patched = patched._prepare_inputs(batch)
    assert torch.equal(inputs["completion_ids"], inputs_patched["completion_ids"])  # generation untouched
    torch.testing.assert_close(inputs_patched["ref_per_token_logps"], inputs["ref_per_token_logps"], rtol=0, atol=1e-5)
    # Pretend two completions ended early: TRL's completion mask must zero those positions on both paths.
    inputs["completion_mask"] = inputs["completion_mask"].clone()
    inputs["completion_mask"][1, 3:] = 0
    inputs["completion_mask"][2, 5:] = 0

    calls = []
    monkeypatch.setattr(o1trl, "fused_linear_logprobs", lambda *a, **k: calls.append(1) or FUSED(*a, **k))
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    scored = [
        t._get_per_token_logps_and_entropies(t.model, ids, mask, COMPLETION_LEN, compute_entropy=True)
        for t in trainers
    ]
    assert calls, "the patched trainer did not call fused_linear_logprobs"
    (logp_trl, ent_trl, _), (logp, ent, _) = scored
    torch.testing.assert_close(logp, logp_trl, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent, ent_trl, rtol=1e-5, atol=1e-5)
    masked = inputs["completion_mask"] == 0
    assert (logp[masked] == 0).all() and (ent[masked] == 0).all()
    assert (logp[~masked] < 0).all()

    losses, grads = [], []
    for t in trainers:
        t.model.zero_grad()
        t.current_gradient_accumulation_steps = 1  # what Trainer's loop sets before compute_loss
        loss = t.compute_loss(t.model, inputs)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None})
    assert rel_err(losses[1], losses[0]) <= 1e-4
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name, g in grads[0].items():
        assert g.norm() > 0, name
        assert rel_err(grads[1][name], g) <= 1e-4, name


@pytest.mark.slow
def test_full_train_step_same_update(tmp_path):
    """TRL's own train() (generation, reward, loss, SGD step) moves the weights the same way."""
    updates = []
    for patched in (False, True):
        trainer = build_trainer(patched, tmp_path, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant")
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        updates.append({n: p.detach() - before[n] for n, p in trainer.model.named_parameters()})
    assert sum(u.norm() for u in updates[0].values()) > 0
    for name, u in updates[0].items():
        if u.norm() > 0:
            assert rel_err(updates[1][name], u) <= 1e-4, name


def test_refuses_a_trl_with_another_protocol(monkeypatch):
    import trl.trainer.grpo_trainer as grpo

    monkeypatch.setattr(grpo, "add_fused_lm_head", lambda model, temperature=1.0: None)
    with pytest.raises(RuntimeError, match="fused-LM-head protocol"):
        o1trl.patch_grpo_trainer()


def test_refuses_models_whose_logits_are_transformed():
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        o1trl.add_fused_lm_head(copy.deepcopy(model), outputs=("log_probs",))
    with pytest.raises(NotImplementedError, match="is_top1"):
        o1trl.add_fused_lm_head(model, outputs=("log_probs", "is_top1"))


def test_missing_trl_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)
    with pytest.raises(ImportError, match="`trl` package"):
        o1trl.patch_grpo_trainer()


def test_patch_is_idempotent_and_undone():
    import trl.trainer.grpo_trainer as grpo

    trl_head = grpo.add_fused_lm_head
    o1trl.patch_grpo_trainer()
    o1trl.patch_grpo_trainer()
    assert grpo.add_fused_lm_head is o1trl.add_fused_lm_head
    o1trl.unpatch_grpo_trainer()
    assert grpo.add_fused_lm_head is trl_head


def test_refuses_deepspeed_zero3(monkeypatch):
    import transformers.integrations.deepspeed as hf_deepspeed

    monkeypatch.setattr(hf_deepspeed, "is_deepspeed_zero3_enabled", lambda: True)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    with pytest.raises(NotImplementedError, match="ZeRO-3"):
        o1trl.add_fused_lm_head(model)
