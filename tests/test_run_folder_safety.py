"""Loading a run folder never runs what it contains, and damaged state is recovered or named (issue 25).

Every crafted payload below is a pickle whose `__reduce__` would write a marker file when loaded;
each test checks the load is refused with a message naming the file, and that the marker never
appears. The damaged-state cases: a truncated trainer state or data file in the newest checkpoint
falls back to the previous complete one (and says so), a torn last metrics line is cut, a damaged
old-log-prob cache is recomputed, a read-only training set caches in the run folder.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

from pruner import distributed
from pruner.checkpoint import (checkpoints, load_checkpoint, read_trainer_state, resume_checkpoint,
                               save_checkpoint)
from pruner.metrics import MetricsLogger, read_metrics
from pruner.old_logps import attach_response_offsets, cache_path, content_key, old_logprobs
from pruner.safe_load import DamagedFileError, UnsafeFileError, read_dcp_metadata


class Payload:
    """What an attacker puts in a pickle: loading it runs `exec`, which writes `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


class ToyPolicy(torch.nn.Module):
    """A policy in the trainer's calling convention: (ids, mask, labels) -> per-position log-probs."""

    def __init__(self, vocab: int = 32, nan: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(vocab, vocab)
        self.nan = nan

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logps = torch.log_softmax(self.emb(ids), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return logps * float("nan") if self.nan else logps


def toy_data(samples: int = 6, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(2, 5, (samples,), generator=gen)
    responses = torch.randint(1, 6, (samples,), generator=gen)
    offsets = torch.zeros(samples + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(prompts + responses, 0)
    ids = torch.randint(0, 32, (int(offsets[-1]),), generator=gen)
    return attach_response_offsets({"input_ids": ids, "offsets": offsets, "prompt_lengths": prompts,
                                    "response_lengths": responses})


def _tiny_training(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    return model, optimizer, scheduler


@pytest.fixture
def d():
    return distributed.init("cpu")


@pytest.fixture
def run(tmp_path, d):
    """A checkpoint folder with complete checkpoints at steps 2 and 4 of a tiny model."""
    model, optimizer, scheduler = _tiny_training()
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
        scheduler.step()
        save_checkpoint(root, step, model, optimizer, scheduler, {"round": 0}, d)
    return root


# ---------------------------------------------------------------- security: crafted files refused


def test_trainer_state_is_json_and_holds_no_pickle(run):
    files = sorted(p.name for p in (run / "step-0000004").iterdir())
    assert "trainer-rank0.json" in files and not any(f.endswith(".pt") for f in files)
    state = json.loads((run / "step-0000004" / "trainer-rank0.json").read_text())
    assert state["step"] == 4 and state["round"] == 0


def test_a_crafted_trainer_state_pt_is_refused_and_does_not_run(run, d, tmp_path):
    """The old trainer-rank0.pt was read with torch.load(weights_only=False): the payload ran on --resume."""
    marker = tmp_path / "pwned"
    ckpt = run / "step-0000004"
    (ckpt / "trainer-rank0.json").unlink()
    torch.save({"step": 4, "scheduler": Payload(marker), "rng": {}}, ckpt / "trainer-rank0.pt")
    with pytest.raises(UnsafeFileError, match=r"trainer-rank0\.pt: refused: it loads (builtins\.)?exec"):
        resume_checkpoint(run, d)
    with pytest.raises(UnsafeFileError, match=r"trainer-rank0\.pt"):
        load_checkpoint(ckpt, *_tiny_training(), d)
    assert not marker.exists()


def test_an_older_versions_trainer_state_pt_still_resumes(run, d):
    import random

    import numpy as np

    ckpt = run / "step-0000004"
    state = json.loads((ckpt / "trainer-rank0.json").read_text())
    (ckpt / "trainer-rank0.json").unlink()
    legacy = {"step": 4, "round": 0, "scheduler": state["scheduler"],
              "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}}
    torch.save(legacy, ckpt / "trainer-rank0.pt")  # what the previous version wrote
    assert resume_checkpoint(run, d) == ckpt
    assert load_checkpoint(ckpt, *_tiny_training(1), d)["step"] == 4


def test_a_crafted_dcp_metadata_is_refused_by_name_and_does_not_run(run, d, tmp_path):
    """torch's reader unpickled `.metadata` with pickle.load: the payload ran before any check."""
    marker = tmp_path / "pwned"
    ckpt = run / "step-0000004"
    (ckpt / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(UnsafeFileError, match=r"\.metadata: refused to load builtins\.exec"):
        read_dcp_metadata(ckpt)
    with pytest.raises(UnsafeFileError, match=r"builtins\.exec"):
        resume_checkpoint(run, d)  # refused, not skipped: a crafted file is never silently passed over
    with pytest.raises(UnsafeFileError, match=r"builtins\.exec"):
        load_checkpoint(ckpt, *_tiny_training(), d)
    assert not marker.exists()


def test_a_payload_nested_inside_real_metadata_is_refused(run, d, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = run / "step-0000004"
    metadata = read_dcp_metadata(ckpt)
    metadata.storage_meta.modules = [Payload(marker)]
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnsafeFileError, match=r"refused to load builtins\.exec"):
        load_checkpoint(ckpt, *_tiny_training(), d)
    assert not marker.exists()


def test_metadata_naming_a_file_outside_the_checkpoint_is_refused(run):
    ckpt = run / "step-0000004"
    metadata = read_dcp_metadata(ckpt)
    next(iter(metadata.storage_data.values())).relative_path = "../../secret"
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnsafeFileError, match=r"refused data file name '\.\./\.\./secret'"):
        read_dcp_metadata(ckpt)


def test_a_crafted_non_tensor_entry_in_a_distcp_file_is_refused(tmp_path, d):
    """DCP stores non-tensor values (the optimizer's lr, betas...) with torch.save and torch read them back
    with weights_only=False."""
    marker = tmp_path / "pwned"
    root = tmp_path / "checkpoints"
    model, optimizer, scheduler = _tiny_training()
    ckpt = save_checkpoint(root, 2, model, optimizer, scheduler, {}, d)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    optim_sd["param_groups"][0]["lr"] = Payload(marker)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(ckpt))
    assert resume_checkpoint(root, d) == ckpt  # nothing looks wrong before the entry is read
    refused = r"__0_0\.distcp: refused entry optim\.param_groups\.0\.lr: it loads (builtins\.)?exec"
    with pytest.raises(UnsafeFileError, match=refused):
        load_checkpoint(ckpt, *_tiny_training(1), d)
    assert not marker.exists()


def test_a_pickle_posing_as_an_old_logps_cache_is_never_unpickled(tmp_path, d, capsys):
    marker = tmp_path / "pwned"
    data, trainset = toy_data(), tmp_path / "set"
    trainset.mkdir()
    from pruner.model_files import model_fingerprint

    path = cache_path(trainset, model_fingerprint("toy"), 1.0, content_key(data))
    path.write_bytes(pickle.dumps(Payload(marker)))
    flat, where, hit = old_logprobs(ToyPolicy(), data, trainset, "toy", d, temperature=1.0, micro_batch=2, pad_id=0)
    assert not hit and where == path and not marker.exists()
    assert "unreadable" in capsys.readouterr().out


# ---------------------------------------------------------------- damaged state: recover or name it


def test_a_truncated_trainer_state_falls_back_to_the_previous_checkpoint(run, d, capsys):
    """Before: a raw OSError / JSONDecodeError from the newest checkpoint stopped --resume."""
    state = run / "step-0000004" / "trainer-rank0.json"
    state.write_bytes(state.read_bytes()[:40])
    assert resume_checkpoint(run, d) == run / "step-0000002"
    out = capsys.readouterr().out
    assert f"{state}: not valid JSON" in out and "resuming from the previous complete checkpoint" in out
    assert [p.name for p in checkpoints(run)] == ["step-0000002"]  # set aside, so pruning keeps the good one
    assert (run / "step-0000004.damaged").is_dir()
    assert load_checkpoint(run / "step-0000002", *_tiny_training(1), d)["step"] == 2


@pytest.mark.parametrize("name", ["__0_0.distcp", ".metadata"])
def test_a_truncated_dcp_file_falls_back_before_any_weight_is_read(run, d, capsys, name):
    target = run / "step-0000004" / name
    target.write_bytes(target.read_bytes()[:len(target.read_bytes()) // 2])
    assert resume_checkpoint(run, d) == run / "step-0000002"
    assert str(target) in capsys.readouterr().out


def test_when_every_checkpoint_is_damaged_the_error_names_the_files_and_what_to_do(run, d):
    for ckpt in checkpoints(run):
        (ckpt / "trainer-rank0.json").write_text("{")
    with pytest.raises(DamagedFileError, match=r"(?s)no checkpoint in .* is complete.*trainer-rank0\.json.*--overwrite"):
        resume_checkpoint(run, d)


def test_a_checkpoint_of_another_world_size_is_refused_not_skipped(run, d):
    shutil.copy(run / "step-0000004" / "trainer-rank0.json", run / "step-0000004" / "trainer-rank1.json")
    with pytest.raises(FileNotFoundError, match="written by 2 process.*--nproc_per_node"):
        resume_checkpoint(run, d)


def test_trainer_state_field_errors_name_the_field(run):
    state = run / "step-0000004" / "trainer-rank0.json"
    state.write_text(json.dumps({"format": "o1-pruner trainer state", "step": "four", "scheduler": {}, "rng": {}}))
    with pytest.raises(DamagedFileError, match=r"trainer-rank0\.json: field step"):
        read_trainer_state(run / "step-0000004", 0)


def _rows(steps) -> str:
    return "".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in steps)


def test_a_torn_last_metrics_line_is_cut_and_said(tmp_path, capsys):
    """Before: json.loads of the torn line raised JSONDecodeError when the run resumed."""
    path = tmp_path / "metrics.jsonl"
    path.write_text(_rows([1, 2, 3]) + '{"step": 4, "lo')
    MetricsLogger(path, enabled=True, total_steps=8, start_step=3).close()
    assert [r["step"] for r in read_metrics(path)[0]] == [1, 2, 3] and path.read_text() == _rows([1, 2, 3])
    assert "dropped a torn last line" in capsys.readouterr().out


def test_a_bad_metrics_line_before_the_last_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_rows([1]) + "garbage\n" + _rows([2]))
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a metrics row"):
        MetricsLogger(path, enabled=True, total_steps=8, start_step=2)


@pytest.mark.parametrize("damage", ["truncate", "wrong_length", "nan"])
def test_a_damaged_old_logps_cache_is_recomputed_and_said(tmp_path, d, capsys, damage):
    """Before: a truncated cache raised a raw SafetensorError."""
    from safetensors.torch import save_file

    data, trainset = toy_data(), tmp_path / "set"
    trainset.mkdir()
    first, path, hit = old_logprobs(ToyPolicy(), data, trainset, "toy", d, temperature=1.0, micro_batch=2, pad_id=0)
    assert not hit
    meta = {"model_key": path.name.split("-")[1], "data_key": content_key(data)}
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:30])
    elif damage == "wrong_length":
        save_file({"logps": first[:-1].contiguous()}, str(path), metadata=meta)
    else:
        save_file({"logps": torch.full_like(first, float("nan"))}, str(path), metadata=meta)
    again, path2, hit = old_logprobs(ToyPolicy(), data, trainset, "toy", d, temperature=1.0, micro_batch=2,
                                     pad_id=0)
    assert not hit and path2 == path and torch.equal(again, first)
    said = capsys.readouterr().out
    assert f"old log-prob cache {path}" in said and "recomputing it" in said
    assert old_logprobs(ToyPolicy(), data, trainset, "toy", d, temperature=1.0, micro_batch=2, pad_id=0)[2]


def test_a_damaged_cache_that_cannot_be_recomputed_is_named(tmp_path, d):
    data, trainset = toy_data(), tmp_path / "set"
    trainset.mkdir()
    _, path, _ = old_logprobs(ToyPolicy(), data, trainset, "toy", d, temperature=1.0, micro_batch=2, pad_id=0)
    path.write_bytes(b"\0" * 16)
    with pytest.raises(FileNotFoundError, match=f"{path.name}.*resume from the checkpoint at the round's start"):
        old_logprobs(ToyPolicy(), data, trainset, "toy", d, temperature=1.0, micro_batch=2, pad_id=0,
                     may_compute=False)


# ---------------------------------------------------------------- silent choices said


@contextlib.contextmanager
def _read_only(folder: Path):
    """`folder` unwritable for this process: chmod, plus (as root, which ignores modes) a nobody euid."""
    mode = folder.stat().st_mode
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    root = os.geteuid() == 0
    try:
        if root:
            os.seteuid(65534)
        yield
    finally:
        if root:
            os.seteuid(0)
        folder.chmod(mode)


def test_a_read_only_training_set_caches_in_the_run_folder_and_says_so(d, capsys):
    """Before: writing the cache next to a read-only training set failed with a raw SafetensorError."""
    base = Path(tempfile.mkdtemp(prefix="ro-set-"))
    try:
        base.chmod(0o755)
        trainset, out = base / "set", base / "run"
        trainset.mkdir()
        out.mkdir(mode=0o777)
        out.chmod(0o777)
        data = toy_data()
        with _read_only(trainset):
            flat, path, hit = old_logprobs(ToyPolicy(), data, trainset, "toy", d, temperature=1.0, micro_batch=2,
                                           pad_id=0, run_dir=out)
            assert not hit and path.parent == out / "old_logps" and path.exists()
            assert not any(trainset.iterdir())
            said = capsys.readouterr().out
            assert f"{trainset} is not writable" in said and f"cached in {path} instead" in said
            again, path2, hit = old_logprobs(ToyPolicy(), data, trainset, "toy", d, temperature=1.0, micro_batch=2,
                                             pad_id=0, run_dir=out)
            assert hit and path2 == path and torch.equal(again, flat)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
def test_resume_with_no_checkpoint_says_it_starts_from_step_0(tiny_model_dir, tmp_path, capsys):
    from test_train_integrity import _samples, _train

    from pruner.dataset import build_trainset

    trainset = build_trainset(_samples(tmp_path / "samples.jsonl", tiny_model_dir), tmp_path / "lh",
                              tokenizer=str(tiny_model_dir), report=False)
    out = tmp_path / "run"
    rows = _train(tiny_model_dir, trainset, out, "--max-steps", "1", "--resume")
    assert [r["step"] for r in rows] == [1]
    assert f"no checkpoint in {out}: starting from step 0" in capsys.readouterr().out


@pytest.mark.slow
def test_resume_past_a_truncated_checkpoint_and_a_torn_metrics_line(tiny_model_dir, tmp_path, capsys):
    """End to end through the trainer: the newest checkpoint's trainer state truncated, metrics.jsonl torn."""
    from test_train_integrity import _samples, _train

    from pruner.dataset import build_trainset

    trainset = build_trainset(_samples(tmp_path / "samples.jsonl", tiny_model_dir), tmp_path / "lh",
                              tokenizer=str(tiny_model_dir), report=False)
    out = tmp_path / "run"
    full = _train(tiny_model_dir, trainset, out, "--max-steps", "3", "--stop-after", "2")
    assert [r["step"] for r in full] == [1, 2]
    state = out / "checkpoints" / "step-0000002" / "trainer-rank0.json"
    state.write_bytes(state.read_bytes()[:50])
    with (out / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 3, "los')
    capsys.readouterr()
    rows = _train(tiny_model_dir, trainset, out, "--max-steps", "3", "--resume")
    said = capsys.readouterr().out
    assert "resuming from the previous complete checkpoint" in said and "dropped a torn last line" in said
    assert "resumed from" in said and "step-0000001" in said
    assert [r["step"] for r in rows] == [1, 2, 3]
