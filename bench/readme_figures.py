"""Regenerate every figure the README quotes, from one command, stamped with the date and commit.

    python bench/readme_figures.py                           # all figures -> runs/figures/<date>-<commit>/
    python bench/readme_figures.py --only profile,kernels    # some of them
    python bench/readme_figures.py --only demo --demo-run runs/demo   # tables of a `make demo` already run
    python bench/readme_figures.py --into docs/results       # also update the curated copy
    python bench/readme_figures.py --readme README.md        # also rewrite README's marked regions
    python bench/readme_figures.py --render runs/figures/X --readme README.md   # re-render, measure nothing

Figures (each the script that measures it, run as its own process):
  demo       `python -m pruner.demo` (pre-sample, train, benchmark) : result tables + per-stage wall time
  profile    bench/profile_default.py : the embedded default on its 400 test problems
  presample  bench/presample_vs_hf.py : pre-sampling throughput, vLLM against HF generate
  kernels    bench/kernel_ops.py (CPU: PyTorch paths, small shapes) : time and peak memory
  train_step bench/train_step.py : one trainer step against the paper code's recipe

The results folder holds each figure's raw output in a subfolder, `figures.md` (one Markdown
region per figure between `<!-- figures:NAME -->` and `<!-- /figures:NAME -->`) and
`figures.json` (date, commit, machine, load, command and wall time of each figure). `--readme`
replaces the same regions in a Markdown file; regions of figures not regenerated stay as they are.
A figure whose command fails leaves nothing behind, and then neither `--into` nor `--readme` is touched.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `python bench/<this>.py` from a checkout: `bench.*` and `pruner`

from bench import figure_render as render  # noqa: E402


@dataclass(frozen=True)
class Figure:
    """How to measure one figure into a folder, what of it to keep, and how to show it."""

    command: Callable[[Path], list[str]]
    render: Callable[[Path], str]
    keep: tuple[str, ...] = ("*.json", "*.md", "*.csv", "*.png")  # the curated copy's files


def _py(script: str, *args: str) -> list[str]:
    return [sys.executable, script, *args]


FIGURES: dict[str, Figure] = {
    "demo": Figure(lambda d: [sys.executable, "-m", "pruner.demo", "--run", str(d / "run")], render.demo,
                   keep=("run/demo_timing.json", "run/samples.summary.json", "run/bench/*.json", "run/bench/*.md",
                         "run/bench/*.png", "run/train/*.png", "run/train/*.json")),
    "profile": Figure(lambda d: _py("bench/profile_default.py", "--out", str(d / "default_profile")), render.profile),
    "presample": Figure(lambda d: _py("bench/presample_vs_hf.py", "--out", str(d / "presample_vs_hf.json")),
                        render.presample),
    "kernels": Figure(lambda d: _py("bench/kernel_ops.py", "--out", str(d / "kernels_cpu.csv")), render.kernels),
    "train_step": Figure(lambda d: _py("bench/train_step.py", "--out", str(d)), render.train_step),
}


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def stamp() -> dict:
    """Date, commit (with +dirty when the tree has changes) and machine of this run."""
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "python": platform.python_version()}


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _env() -> dict:
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "PYTHONPATH": path, "PYTHONSAFEPATH": "1"}


def measure(name: str, folder: Path) -> dict:
    """Run one figure's command into folder/<name>; on failure nothing of it is left."""
    final, partial = folder / name, folder / f"{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    cmd = FIGURES[name].command(partial)
    record = {"command": " ".join(cmd[1:]).replace(str(partial), f"<{name}>"), "load_before": _load()}
    print(f"[{name}] $ {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    with (folder / f"{name}.log").open("w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    record.update(wall_s=round(time.perf_counter() - start, 1), load_after=_load(), returncode=proc.returncode)
    if proc.returncode:
        shutil.rmtree(partial, ignore_errors=True)
        tail = (folder / f"{name}.log").read_text(errors="replace")[-3000:]
        print(f"[{name}] FAILED (exit {proc.returncode}); log {folder / f'{name}.log'}:\n{tail}", file=sys.stderr)
        return record
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    print(f"[{name}] done in {record['wall_s']:.0f} s", flush=True)
    return record


def adopt_demo(run: Path, folder: Path) -> dict:
    """Take the tables of a demo already run (e.g. a timed `make demo`) instead of running one."""
    for needed in ("bench/results.json", "bench/results.md", "demo_timing.json"):
        if not (run / needed).is_file():
            raise SystemExit(f"--demo-run {run}: {run / needed} is missing (a finished `python -m pruner.demo` "
                             "run folder has it)")
    target = folder / "demo" / "run"
    _copy_kept(run, target, tuple(g.removeprefix("run/") for g in FIGURES["demo"].keep))
    timing = json.loads((run / "demo_timing.json").read_text())
    return {"command": f"(adopted) {run}", "wall_s": timing["total_s"], "finished": timing.get("finished"),
            "returncode": 0}


def _copy_kept(src: Path, dst: Path, globs: tuple[str, ...]) -> None:
    for pattern in globs:
        for file in src.glob(pattern):
            if file.is_file():
                (dst / file.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, dst / file.relative_to(src))


def fragments(folder: Path, names: list[str], meta: dict) -> dict[str, str]:
    """Each figure's Markdown region body: the stamp, then the figure."""
    out = {}
    for name in names:
        fig = meta["figures"][name]
        load = (f"adopted a run that finished {fig.get('finished')}" if "load_before" not in fig
                else f"load average {fig['load_before']} at the start")
        line = (f"_`python bench/readme_figures.py --only {name}`: {meta['date']}, commit {meta['commit']}, "
                f"{meta['machine']}, {load}, {fig['wall_s']:.0f} s._")
        out[name] = f"{line}\n\n{FIGURES[name].render(folder / name).strip()}\n"
    return out


def update_curated(folder: Path, into: Path, names: list[str], bodies: dict[str, str]) -> None:
    """Replace <into>/<figure>/ by the kept files of this run and merge figures.md."""
    for name in names:
        staged = into / f"{name}.partial"
        shutil.rmtree(staged, ignore_errors=True)
        _copy_kept(folder / name, staged, FIGURES[name].keep)
        shutil.rmtree(into / name, ignore_errors=True)
        staged.rename(into / name)
    for extra in ("figures.json",):
        shutil.copy2(folder / extra, into / extra)
    md = into / "figures.md"
    md.write_text(render.replace_regions(md.read_text() if md.exists() else "", bodies, append_missing=True))


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help=f"comma list of figures: {', '.join(FIGURES)} (default: all; with --render, "
                   "those the folder has)")
    p.add_argument("--out", type=Path, help="results folder (default runs/figures/<date>-<commit>)")
    p.add_argument("--demo-run", type=Path, help="a finished demo run folder to take the demo's tables from")
    p.add_argument("--into", type=Path, help="also copy the kept files and figures.md here (e.g. docs/results)")
    p.add_argument("--readme", type=Path, help="also rewrite this Markdown file's figure regions")
    p.add_argument("--render", type=Path, help="measure nothing: render the figures of this results folder")
    args = p.parse_args(argv)
    if args.render is not None:
        if not (args.render / "figures.json").is_file():
            p.error(f"--render {args.render}: no figures.json there (a results folder of this script has one)")
        made = json.loads((args.render / "figures.json").read_text())["figures"]
        if args.only is None:
            args.only = ",".join(n for n in made if made[n]["returncode"] == 0)
    args.names = [n for n in (args.only or ",".join(FIGURES)).split(",") if n]
    unknown = sorted(set(args.names) - set(FIGURES))
    if unknown or not args.names:
        p.error(f"--only: unknown figure(s) {unknown}; choose from {', '.join(FIGURES)}")
    if args.readme is not None:
        # Checked before any heavy work: every region must already be there, once.
        render.replace_regions(args.readme.read_text(), {n: "" for n in args.names}, source=str(args.readme))
    return args


def measure_all(args: argparse.Namespace) -> tuple[Path, dict]:
    """Measure the chosen figures into a new results folder; returns it and its figures.json."""
    meta = {**stamp(), "figures": {}}
    folder = args.out or ROOT / "runs" / "figures" / f"{time.strftime('%Y%m%d-%H%M%S')}-{meta['commit']}"
    folder.mkdir(parents=True, exist_ok=True)
    for name in args.names:
        if name == "demo" and args.demo_run:
            meta["figures"][name] = adopt_demo(args.demo_run, folder)
        else:
            meta["figures"][name] = measure(name, folder)
    (folder / "figures.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder, meta


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.render:
        folder, meta = args.render, json.loads((args.render / "figures.json").read_text())
    else:
        folder, meta = measure_all(args)
    done = [n for n in args.names if n in meta["figures"] and meta["figures"][n]["returncode"] == 0]
    bodies = fragments(folder, done, meta)
    (folder / "figures.md").write_text(render.replace_regions("", bodies, append_missing=True))
    print(f"\nwrote {folder / 'figures.md'} ({', '.join(done) or 'no figures'})")
    if len(done) < len(args.names):
        print("some figures failed: --into / --readme left unchanged", file=sys.stderr)
        return 1
    if args.into:
        args.into.mkdir(parents=True, exist_ok=True)
        update_curated(folder, args.into, done, bodies)
        print(f"updated {args.into}")
    if args.readme:
        args.readme.write_text(render.replace_regions(args.readme.read_text(), bodies, source=str(args.readme)))
        print(f"rewrote the regions {', '.join(done)} of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
