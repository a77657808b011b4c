"""bench/readme_figures.py: marked-region rewriting, flag checks, and rendering from result files."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import figure_render as render
from bench import readme_figures

ROOT = Path(__file__).resolve().parent.parent


def test_replace_regions_rewrites_only_the_named_region():
    text = "intro\n<!-- figures:demo -->\nold demo\n<!-- /figures:demo -->\nmiddle\n<!-- figures:profile -->\nold p\n<!-- /figures:profile -->\nend\n"
    out = render.replace_regions(text, {"demo": "| new | table |"})
    assert "old demo" not in out and "| new | table |" in out and "old p" in out
    assert out.startswith("intro\n<!-- figures:demo -->\n| new | table |\n<!-- /figures:demo -->\nmiddle")
    assert render.replace_regions(out, {"demo": "| new | table |"}) == out  # idempotent
    appended = render.replace_regions(out, {"kernels": "k"}, append_missing=True)
    assert appended.endswith("<!-- figures:kernels -->\nk\n<!-- /figures:kernels -->\n")


@pytest.mark.parametrize("text, where", [
    ("no markers at all\n", "nowhere"),
    ("a\n<!-- /figures:demo -->\nb\n<!-- figures:demo -->\n", "line 4, line 2"),
    ("<!-- figures:demo -->\n<!-- /figures:demo -->\n<!-- figures:demo -->\n<!-- /figures:demo -->\n", "line 1, line 3"),
])
def test_replace_regions_refuses_broken_markers(text, where):
    with pytest.raises(ValueError, match=f"README.md: need exactly one <!-- figures:demo -->.*{where}"):
        render.replace_regions(text, {"demo": "x"}, source="README.md")


def test_flags_are_checked_before_any_work(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- figures:demo -->\n<!-- /figures:demo -->\n")
    with pytest.raises(ValueError, match="figures:profile"):
        readme_figures.parse(["--only", "demo", "profile", "--readme", str(readme)])
    with pytest.raises(SystemExit):
        readme_figures.parse(["--only", "demo", "nonsense"])
    assert readme_figures.parse(["--only", "demo", "--readme", str(readme)])[1] == ["demo"]
    # Space-separated like every list flag; the older comma-joined value still names the same figures.
    assert readme_figures.parse(["--only", "kernels", "profile"])[1] == ["kernels", "profile"]
    assert readme_figures.parse(["--only", "kernels,profile"])[1] == ["kernels", "profile"]
    assert "paper" not in readme_figures.parse([])[1]  # an hour's run: only when named


def test_regions_spread_over_several_pages_are_each_rewritten_in_their_own_file(tmp_path):
    # The README holds the demo's region, a docs page the others: one --readme run rewrites both, once each.
    run, out = tmp_path / "demo_run", tmp_path / "figs"
    _demo_run(run)
    assert readme_figures.main(["--only", "demo", "--demo-run", str(run), "--out", str(out)]) == 0
    (out / "figures.json").write_text(json.dumps({**json.loads((out / "figures.json").read_text()), "figures": {
        **json.loads((out / "figures.json").read_text())["figures"], "kernels": {"returncode": 0}}}))
    (out / "kernels").mkdir()
    (out / "kernels" / "kernels_cpu.csv").write_text(
        "op,provider,N,D,V,device,total_ms,peak_mem_mib,status\nlogprobs,eager,1024,,8192,cpu,60.5,nan,ok\n")
    readme, page = tmp_path / "README.md", tmp_path / "bench.md"
    readme.write_text("top\n<!-- figures:demo -->\nold demo\n<!-- /figures:demo -->\n")
    page.write_text("page\n<!-- figures:kernels -->\nold kernels\n<!-- /figures:kernels -->\nend\n")
    assert readme_figures.main(["--render", str(out), "--readme", str(readme), str(page)]) == 0
    assert "| base | greedy | 0.990 |" in readme.read_text() and "old demo" not in readme.read_text()
    assert "| logprobs (N=1024, V=8192) | 60.50 |" in page.read_text() and "old kernels" not in page.read_text()
    assert "figures:kernels" not in readme.read_text() and "figures:demo" not in page.read_text()


def test_a_region_in_two_pages_or_in_none_is_refused_before_any_work(tmp_path):
    one, two = tmp_path / "one.md", tmp_path / "two.md"
    one.write_text("<!-- figures:demo -->\n<!-- /figures:demo -->\n")
    two.write_text("<!-- figures:demo -->\n<!-- /figures:demo -->\n")
    with pytest.raises(ValueError, match=r"figures:demo -->: need its region in exactly one of .*found in .*one.md, .*two.md"):
        readme_figures.parse(["--only", "demo", "--readme", str(one), str(two)])
    with pytest.raises(ValueError, match=r"figures:kernels -->: .*found in none"):
        readme_figures.parse(["--only", "kernels", "--readme", str(one)])
    two.write_text("<!-- /figures:kernels -->\n<!-- figures:kernels -->\n")  # in one file, but out of order
    with pytest.raises(ValueError, match=r"two.md: need exactly one <!-- figures:kernels -->"):
        readme_figures.parse(["--only", "kernels", "--readme", str(one), str(two)])


def test_the_repository_pages_hold_every_figure_region_once():
    # What `python bench/readme_figures.py --readme README.md docs/*.md` (docs/benchmarks.md) needs of the real pages.
    pages = [str(ROOT / "README.md"), *map(str, sorted((ROOT / "docs").glob("*.md")))]
    held = readme_figures.region_files(pages, list(readme_figures.FIGURES))
    assert held[str(ROOT / "README.md")] == ["demo"]
    assert sorted(n for names in held.values() for n in names) == sorted(readme_figures.FIGURES)


def _demo_run(run: Path) -> None:
    (run / "bench").mkdir(parents=True)
    (run / "bench" / "results.md").write_text("| model | mode | accuracy |\n|---|---|---|\n| base | greedy | 0.990 |\n")
    (run / "bench" / "results.json").write_text("{}")
    (run / "samples.summary.json").write_text(json.dumps({
        "samples": 9600, "problems": 1200, "accuracy": 1.0, "mean_length": 150.2,
        "generation_samples_per_s": 123.4, "samples_per_s": 110.0}))
    (run / "demo_timing.json").write_text(json.dumps({
        "total_s": 200.0, "nproc": 1, "omp_num_threads": "2", "ckpt_every": 100, "finished": "2026-01-02T03:04:05Z",
        "stages": [{"stage": "pre-sampling", "wall_s": 80.0, "command": "x"},
                   {"stage": "training (torchrun)", "wall_s": 120.0, "command": "y"}]}))


def test_adopted_demo_renders_with_stamp_and_stage_split(tmp_path):
    run, out = tmp_path / "demo_run", tmp_path / "figs"
    _demo_run(run)
    (run / "samples.jsonl").write_text("big\n")  # not a figure: never copied
    readme = tmp_path / "README.md"
    readme.write_text("top\n<!-- figures:demo -->\nstale\n<!-- /figures:demo -->\nbottom\n")
    rc = readme_figures.main(["--only", "demo", "--demo-run", str(run), "--out", str(out),
                              "--into", str(tmp_path / "curated"), "--readme", str(readme)])
    assert rc == 0
    text = readme.read_text()
    assert "stale" not in text and text.startswith("top\n") and text.endswith("bottom\n")
    assert "| base | greedy | 0.990 |" in text and "| pre-sampling | 80.0 | 40% |" in text
    assert "adopted a run that finished 2026-01-02T03:04:05Z" in text and "123.4 samples/s" in text and "| total | 200.0 (3.3 min) | |" in text
    assert "out of its depth" not in text  # the embedded set alone
    meta = json.loads((out / "figures.json").read_text())
    assert meta["commit"] and meta["date"] in text and meta["figures"]["demo"]["wall_s"] == 200.0
    assert not (tmp_path / "curated" / "demo" / "run" / "samples.jsonl").exists()
    assert (tmp_path / "curated" / "demo" / "run" / "bench" / "results.md").is_file()
    assert "<!-- figures:demo -->" in (tmp_path / "curated" / "figures.md").read_text()


def test_the_demo_says_where_the_embedded_model_is_out_of_its_depth():
    def run(model, dataset, accuracy, truncation):
        return {"model": model, "dataset": dataset, "accuracy": accuracy, "truncation_rate": truncation,
                "problems": 400 if dataset.startswith("embedded") else 100}
    results = {"runs": [run("base", "embedded:test", 1.0, 0.0), run("base", "math500", 0.01, 0.015),
                        run("base", "gsm8k", 0.04, 0.0), run("pruned", "embedded:test", 1.0, 0.0),
                        run("pruned", "math500", 0.02, 0.12), run("pruned", "gsm8k", 0.03, 0.06)]}
    note = render.out_of_depth_note(results)
    assert "real sets (math500 100, gsm8k 100 problems)" in note and "base accuracy 0.010 to 0.040" in note
    assert "truncated 6.0% to 12.0%" in note  # the pruned model's, not the base's
    assert render.out_of_depth_note({"runs": results["runs"][:1] + results["runs"][3:4]}) == ""


def test_adopting_an_unfinished_demo_is_a_clear_error(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit, match="bench/results.json is missing"):
        readme_figures.main(["--only", "demo", "--demo-run", str(tmp_path / "run"), "--out", str(tmp_path / "o")])


def test_kernels_and_presample_renderers_read_their_files(tmp_path):
    fields = ["op", "provider", "N", "D", "V", "device", "total_ms", "peak_mem_mib", "status"]
    rows = [["logprobs", "eager", "1024", "", "8192", "cpu", "60.5", "nan", "ok"],
            ["logprobs", "compile", "1024", "", "8192", "cpu", "45.25", "nan", "ok"],
            ["fused_linear", "kernels-torch", "8192", "512", "32000", "cpu-rss", "", "116", "ok"],
            ["fused_linear", "eager", "8192", "512", "32000", "cpu-rss", "", "2794", "ok"]]
    with (tmp_path / "kernels_cpu.csv").open("w", newline="") as f:
        csv.writer(f).writerows([fields, *rows])
    md = render.kernels(tmp_path)
    assert "| logprobs (N=1024, V=8192) | 60.50 | 45.25 |" in md and "ratio 0.042" in md
    report = {"settings": {"num_problems": 32, "k": 8, "temperature": 0.5, "top_p": 0.8}, "machine": {"cpus": 2},
              "vllm": {"load_s": 3.0, "generate_s": 2.0, "samples": 256, "samples_per_s": 128.0, "tokens_per_s": 9000.0,
                       "engine": {"in_process": True, "max_num_seqs": 1024, "max_num_batched_tokens": 16384}},
              "hf": {"load_s": 0.2, "generate_s": 8.0, "samples": 256, "samples_per_s": 32.0, "tokens_per_s": 2250.0},
              "speedup_samples_per_s": 4.0}
    (tmp_path / "presample_vs_hf.json").write_text(json.dumps(report))
    md = render.presample(tmp_path)
    assert "**4.00x**" in md and "| vLLM (`pruner.generation`) | 3.0 | 2.0 | 256 | 128.0 | 9000 |" in md
    assert "in-process, max_num_seqs 1024" in md


def test_failed_figure_leaves_nothing_and_touches_no_readme(tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- figures:kernels -->\nold\n<!-- /figures:kernels -->\n")
    failing = readme_figures.Figure(lambda d: [sys.executable, "-c", f"open('{d}/x.csv', 'w'); raise SystemExit(3)"],
                                    render.kernels)
    monkeypatch.setitem(readme_figures.FIGURES, "kernels", failing)
    rc = readme_figures.main(["--only", "kernels", "--out", str(tmp_path / "o"), "--readme", str(readme)])
    assert rc == 1 and "old" in readme.read_text()
    assert not (tmp_path / "o" / "kernels").exists() and not (tmp_path / "o" / "kernels.partial").exists()
    assert json.loads((tmp_path / "o" / "figures.json").read_text())["figures"]["kernels"]["returncode"] == 3


def test_script_runs_from_a_checkout():
    # `python bench/readme_figures.py` puts bench/ first on sys.path; its help must still come up
    out = subprocess.run([sys.executable, "bench/readme_figures.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "--demo-run" in out.stdout



def test_render_rerenders_a_results_folder_without_measuring(tmp_path):
    run, out = tmp_path / "demo_run", tmp_path / "figs"
    _demo_run(run)
    assert readme_figures.main(["--only", "demo", "--demo-run", str(run), "--out", str(out)]) == 0
    (out / "demo" / "run" / "bench" / "results.md").write_text("| model |\n|---|\n| re-rendered |\n")
    readme = tmp_path / "README.md"
    readme.write_text("<!-- figures:demo -->\n<!-- /figures:demo -->\n")
    assert readme_figures.main(["--render", str(out), "--readme", str(readme)]) == 0
    assert "| re-rendered |" in readme.read_text()
    with pytest.raises(SystemExit):
        readme_figures.main(["--render", str(tmp_path / "nothing")])


def test_paper_figure_adopts_a_run_and_into_keeps_each_figures_own_stamp(tmp_path):
    # The curated paper table is rendered from the moved results.json, row for row as the README shows it.
    curated = ROOT / "docs" / "results"
    md = render.paper(curated / "paper")
    assert "| **O1-Pruner, lambda = 2** | 1.000 | 74.9 (0.438) | 0.993 | 80.2 (0.541) | 0.607 |" in md
    assert md.splitlines()[2].startswith("| base | 1.000 | 171.1 | 0.968 | 148.4 | 1 |")
    assert json.loads((curated / "figures.json").read_text())["figures"]["paper"]["commit"] == "be83d01"
    # adopting a finished run into a curated folder that holds another figure: that figure keeps its stamp
    run, into = tmp_path / "paper_run", tmp_path / "curated"
    (run / "bench").mkdir(parents=True)
    for name in ("results.json", "results.md"):
        (run / "bench" / name).write_text((curated / "paper" / "run" / "bench" / name).read_text())
    (run / "samples.jsonl").write_text("big\n")
    into.mkdir()
    (into / "figures.json").write_text(json.dumps({"commit": "old", "date": "d0", "figures": {
        "kernels": {"commit": "k1", "returncode": 0}, "profile": {"returncode": 0}}}))
    rc = readme_figures.main(["--only", "paper", "--paper-run", str(run), "--out", str(tmp_path / "o"), "--into", str(into)])
    assert rc == 0
    meta = json.loads((into / "figures.json").read_text())
    assert meta["figures"]["kernels"] == {"commit": "k1", "date": "d0", "returncode": 0} and meta["commit"] != "old"
    assert meta["figures"]["profile"]["commit"] == "old"  # a figure without its own stamp keeps the old top level
    assert meta["figures"]["paper"]["commit"] == meta["commit"] and meta["figures"]["paper"]["wall_s"] is None
    assert (into / "paper" / "run" / "bench" / "results.json").is_file() and not list(into.glob("paper/**/*.jsonl"))
    assert "| DPO, shortest vs longest |" in (into / "figures.md").read_text()
    with pytest.raises(SystemExit, match="--paper-run .*results.json is missing"):
        readme_figures.main(["--only", "paper", "--paper-run", str(tmp_path / "o"), "--out", str(tmp_path / "o2")])
