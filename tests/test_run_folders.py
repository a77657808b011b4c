"""Run folders (issues 25 and 26): `--overwrite` deletes only what its stage wrote, and a failed start
(a manifest but no checkpoint, samples or results) does not hold its folder hostage."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pruner.manifest import STAGE_FILES, Output, RunStateError, build_manifest, claim_output


def _m(stage: str, **config) -> dict:
    return build_manifest(stage, {"lr": 1.0, **config}, {"model": "sha256:m"})


def _foreign(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("mine")
    (folder / "src").mkdir()
    (folder / "src" / "main.py").write_text("print()")


@pytest.mark.parametrize("stage", sorted(STAGE_FILES))
def test_overwrite_refuses_a_folder_of_foreign_files_and_names_them(tmp_path: Path, stage: str) -> None:
    folder = tmp_path / "out"
    _foreign(folder)
    with pytest.raises(RunStateError, match=r"no .* run writes \(notes\.txt, src/\)") as err:
        claim_output(Output.folder(folder), _m(stage), what="folder", resume=False, overwrite=True)
    assert "--overwrite deletes only" in str(err.value)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "src"]   # nothing deleted
    assert (folder / "src" / "main.py").exists()


def test_a_refusal_names_at_most_five_files(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    for i in range(8):
        (folder / f"f{i}.txt").write_text("x")
    with pytest.raises(RunStateError, match=r"\(f0\.txt, f1\.txt, f2\.txt, f3\.txt, f4\.txt and 3 more\)"):
        claim_output(Output.folder(folder), _m("dataset"), what="folder", resume=False, overwrite=True)


def test_overwrite_of_a_run_deletes_its_own_files_and_keeps_the_users(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "trainset"
    claim_output(Output.folder(folder), _m("dataset"), what="folder", resume=False, overwrite=False).release()
    for name in ("trainset.safetensors", "meta.json", "problem_stats.jsonl", "old_logps-m-t1-d.safetensors"):
        (folder / name).write_text("run 1")
    (folder / "report").mkdir()
    (folder / "notes.txt").write_text("mine")
    claim_output(Output.folder(folder), _m("dataset", lr=2.0), what="folder", resume=False, overwrite=True).release()
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "notes.txt"]
    assert "kept 1 file(s) that no dataset run writes: notes.txt" in capsys.readouterr().err


def test_overwrite_never_replaces_another_stages_run(tmp_path: Path) -> None:
    folder = tmp_path / "trainset"
    claim_output(Output.folder(folder), _m("dataset"), what="folder", resume=False, overwrite=False).release()
    (folder / "trainset.safetensors").write_text("set")
    with pytest.raises(RunStateError, match="holds a dataset run .* not a train run"):
        claim_output(Output.folder(folder), _m("train"), what="folder", resume=False, overwrite=True)
    assert (folder / "trainset.safetensors").read_text() == "set"


def test_presampling_overwrite_refuses_a_file_that_is_not_a_samples_file(tmp_path: Path) -> None:
    from pruner.samples import samples_output

    out = tmp_path / "notes.jsonl"
    out.write_text("my notes\n")
    with pytest.raises(RunStateError, match=r"no presample run writes \(notes\.jsonl\)"):
        claim_output(samples_output(out), _m("presample"), what="samples", resume=False, overwrite=True)
    assert out.read_text() == "my notes\n"
    out.write_text('{"problem_id": "1", "sample_index": 0}\n')   # a samples file without its meta: replaced
    claim_output(samples_output(out), _m("presample"), what="samples", resume=False, overwrite=True).release()
    assert not out.exists()


# ---------------------------------------------------------------------- failed starts (issue 26)

FAILED_START = {  # stage: (what a failed start leaves besides its manifest, what completed work looks like)
    "train": (["config.json", "memory_plan.json"], "checkpoints/step-0000002/trainer-rank0.pt"),
    "bench": (["vllm-base.log"], "raw_base.json"),
    "dataset": ([], "trainset.safetensors"),
}


@pytest.mark.parametrize("stage", sorted(FAILED_START))
def test_a_failed_start_is_taken_over_and_completed_work_is_not(tmp_path: Path, stage: str, capsys) -> None:
    leftovers, work = FAILED_START[stage]
    folder = tmp_path / stage
    claim_output(Output.folder(folder), _m(stage, flag="wrong"), what="folder", resume=False, overwrite=False).release()
    for name in leftovers:
        (folder / name).write_text("from the failed start")
    # the corrected rerun differs only in the flag that was wrong: it takes the folder over, and says so
    claim_output(Output.folder(folder), _m(stage, flag="right"), what="folder", resume=False, overwrite=False).release()
    assert "taking it over: it holds no completed work" in capsys.readouterr().err
    assert json.loads((folder / "manifest.json").read_text())["config"]["flag"] == "right"
    assert not any((folder / name).exists() for name in leftovers)
    # an identical rerun without --resume is no continuation either: taken over too
    claim_output(Output.folder(folder), _m(stage, flag="right"), what="folder", resume=False, overwrite=False).release()
    # once the folder holds work, the manifest protects it
    (folder / work).parent.mkdir(parents=True, exist_ok=True)
    (folder / work).write_text("done")
    with pytest.raises(RunStateError, match="config.flag: was 'right', now 'other'"):
        claim_output(Output.folder(folder), _m(stage, flag="other"), what="folder", resume=False, overwrite=False)
    assert (folder / work).read_text() == "done"


def test_a_failed_start_with_the_users_files_beside_it_is_not_taken_over(tmp_path: Path) -> None:
    folder = tmp_path / "bench"
    claim_output(Output.folder(folder), _m("bench", n=1), what="folder", resume=False, overwrite=False).release()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(RunStateError, match="config.n: was 1, now 2"):
        claim_output(Output.folder(folder), _m("bench", n=2), what="folder", resume=False, overwrite=False)


def test_a_benchmark_that_failed_before_any_result_is_taken_over(tmp_path: Path, capsys) -> None:
    """bench/speed.py's own claim: the rerun differs only in the model path that was wrong."""
    import dataclasses

    from bench.speed import claim_out
    from pruner.configs import SpeedConfig

    wrong, right = tmp_path / "wrong", tmp_path / "right"
    for folder, text in ((wrong, '{"a": 1}'), (right, '{"a": 2}')):
        folder.mkdir()
        (folder / "config.json").write_text(text)
    cfg = SpeedConfig(data=["embedded:test"], limit=3, modes=["greedy"], out=str(tmp_path / "bench"))
    with claim_out(cfg, [("base", str(wrong))]):
        (tmp_path / "bench" / "vllm-base.log").write_text("engine failed")   # then the worker died
    with claim_out(dataclasses.replace(cfg), [("base", str(right))]):
        (tmp_path / "bench" / "raw_base.json").write_text("[]")
    assert "taking it over" in capsys.readouterr().err
    with pytest.raises(RunStateError, match="inputs.models.base"):   # now it holds a result
        claim_out(cfg, [("base", str(wrong))])


def test_a_failed_presampling_start_is_taken_over(tmp_path: Path, capsys) -> None:
    from pruner.samples import meta_path, samples_output

    out = tmp_path / "samples.jsonl"
    claim_output(samples_output(out), _m("presample", k=4), what="samples", resume=True, overwrite=False).release()
    out.write_text("")   # killed before its first chunk
    claim_output(samples_output(out), _m("presample", k=8), what="samples", resume=True, overwrite=False).release()
    assert "taking it over" in capsys.readouterr().err
    assert json.loads(meta_path(out).read_text())["config"]["k"] == 8
    out.write_text('{"problem_id": "1", "sample_index": 0}\n')   # one sample is work
    with pytest.raises(RunStateError, match="config.k: was 8, now 2"):
        claim_output(samples_output(out), _m("presample", k=2), what="samples", resume=True, overwrite=False)


# ------------------------------------------------------------------------------ real stages

@pytest.mark.slow
def test_dataset_overwrite_keeps_unrelated_files(tiny_model_dir: Path, tmp_path: Path) -> None:
    from test_train import _write_samples

    from pruner.dataset import main as dataset_main

    samples = _write_samples(tmp_path / "samples.jsonl", tiny_model_dir, problems=4)
    folder = tmp_path / "mine"
    _foreign(folder)
    with pytest.raises(RunStateError, match=r"notes\.txt, src/"):
        dataset_main(["--samples", str(samples), "--out", str(folder), "--overwrite", "--no-report"])
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "src"]
    built = tmp_path / "set"
    dataset_main(["--samples", str(samples), "--out", str(built), "--no-report"])
    (built / "notes.txt").write_text("mine")
    dataset_main(["--samples", str(samples), "--out", str(built), "--overwrite", "--no-report", "--lam", "3"])
    assert (built / "notes.txt").read_text() == "mine" and (built / "trainset.safetensors").exists()


@pytest.mark.slow
def test_trainer_failed_before_its_first_step_does_not_hold_the_folder(tiny_model_dir: Path, tmp_path: Path,
                                                                        capsys) -> None:
    """A wrong --model (a folder whose weights are missing) fails after the folder is claimed; the
    corrected rerun, differing only in --model, takes the folder over and trains."""
    from test_train import _write_samples

    from pruner.dataset import build_trainset
    from pruner.train import main as train_main

    samples = _write_samples(tmp_path / "samples.jsonl", tiny_model_dir, problems=4)
    data = build_trainset(samples, tmp_path / "set", tokenizer=str(tiny_model_dir), report=False)
    wrong = tmp_path / "wrong-model"
    shutil.copytree(tiny_model_dir, wrong, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    out = tmp_path / "run"
    common = ["--data", str(data), "--out", str(out), "--global-batch-size", "4", "--micro-batch-size", "2",
              "--max-steps", "1", "--no-export", "--device", "cpu"]
    with pytest.raises(Exception):  # noqa: B017 - whatever the loader raises for missing weights
        train_main(["--model", str(wrong), *common])
    assert (out / "manifest.json").exists()   # the failed start claimed the folder (before: it then held it)
    capsys.readouterr()
    train_main(["--model", str(tiny_model_dir), *common])
    assert "taking it over: it holds no completed work" in capsys.readouterr().err
    assert (out / "checkpoints").is_dir() and (out / "metrics.jsonl").read_text().strip()


# ------------------------------------------------------------------------- moved state (issue 25)

def test_paths_of_fingerprinted_inputs_are_not_compared_but_their_content_is(tmp_path: Path) -> None:
    from pruner.manifest import diff_manifests

    inputs = {"model": "abc", "data": "sha256:d", "data_manifest": "sha256:m"}
    here = build_manifest("train", {"model": "/a/model", "data": "/a/set", "lr": 1.0}, inputs)
    moved = build_manifest("train", {"model": "../b/model", "data": "/b/set", "lr": 1.0}, inputs)
    assert diff_manifests(here, moved) == []
    other = build_manifest("train", {"model": "/a/model", "data": "/a/set", "lr": 1.0}, {**inputs, "data": "sha256:e"})
    assert diff_manifests(here, other) == ["inputs.data: was 'sha256:d', now 'sha256:e'"]
    legacy = {**here, "config": {**here["config"], "model": "/old/place", "data": "/old/set"}}  # an older manifest
    assert diff_manifests(legacy, moved) == []


@pytest.mark.slow
def test_a_run_folder_moved_with_its_training_set_continues(tiny_model_dir: Path, tmp_path: Path) -> None:
    from test_train import _write_samples

    from pruner.dataset import build_trainset
    from pruner.train import main as train_main

    first = tmp_path / "first"
    samples = _write_samples(tmp_path / "samples.jsonl", tiny_model_dir, problems=4)
    build_trainset(samples, first / "set", tokenizer=str(tiny_model_dir), report=False)
    flags = ["--model", str(tiny_model_dir), "--global-batch-size", "4", "--micro-batch-size", "2", "--max-steps", "2",
             "--no-export", "--device", "cpu", "--ckpt-every", "1"]
    train_main([*flags, "--data", str(first / "set"), "--out", str(first / "run"), "--stop-after", "1"])
    moved = tmp_path / "moved"
    shutil.move(str(first), str(moved))
    train_main([*flags, "--data", str(moved / "set"), "--out", str(moved / "run"), "--resume"])
    steps = [json.loads(line)["step"] for line in (moved / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2], steps
