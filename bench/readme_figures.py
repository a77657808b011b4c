"""Regenerate every figure the README and docs/ pages quote, from one command, stamped with the date and commit.

    python bench/readme_figures.py                           # every figure but paper -> runs/figures/<date>-<commit>/
    python bench/readme_figures.py --only profile kernels    # some of them
    python bench/readme_figures.py --only demo --demo-run runs/demo   # tables of a `make demo` already run
    python bench/readme_figures.py --into docs/results       # also update the curated copy
    python bench/readme_figures.py --readme README.md docs/*.md   # also rewrite the pages' marked regions
    python bench/readme_figures.py --render runs/figures/X --readme README.md docs/*.md   # re-render, measure nothing
    python bench/readme_figures.py --only paper --paper-run runs/paper --into docs/results   # adopt the hour-long run

Figures (each the script that measures it, run as its own process):
  demo       `python -m pruner.demo` (pre-sample, train, benchmark) : result tables + per-stage wall time
  profile    bench/profile_default.py : the embedded default on its 400 test problems
  presample  bench/presample_vs_hf.py : pre-sampling throughput, vLLM against HF generate
  kernels    bench/kernel_ops.py (CPU: PyTorch paths, small shapes) : time and peak memory
  train_step bench/train_step.py : one trainer step against the paper code's recipe
  paper      bench/paper_comparisons.py (about an hour; only when named) : baselines and the lambda ablation

The results folder holds each figure's raw output in a subfolder, `figures.md` (one Markdown
region per figure between `<!-- figures:NAME -->` and `<!-- /figures:NAME -->`) and
`figures.json` (date, commit, machine, load, command and wall time of each figure; `--into` merges it,
so the curated copy keeps each figure's own date and commit). `--readme`
replaces the same regions in Markdown files (the README holds the demo's, docs/ pages the others; each region
must be in exactly one of the files named); regions of figures not regenerated stay as they are.
A figure whose command fails leaves nothing behind, and then neither `--into` nor `--readme` is touched.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `python bench/<this>.py` from a checkout: `bench.*` and `pruner`

from bench import figure_render as render  # noqa: E402
from pruner.cli import parse_config  # noqa: E402


@dataclass(frozen=True)
class Figure:
    """How to measure one figure into a folder, what of it to keep, and how to show it."""

    command: Callable[[Path], list[str]]
    render: Callable[[Path], str]
    keep: tuple[str, ...] = ("*.json", "*.md", "*.csv", "*.png")  # the curated copy's files
    slow: bool = False  # measured only when named in --only
    adopt_needs: tuple[str, ...] = ()  # files of a finished run folder that --<name>-run can adopt


def _py(script: str, *args: str) -> list[str]:
    return [sys.executable, script, *args]


FIGURES: dict[str, Figure] = {
    "demo": Figure(lambda d: [sys.executable, "-m", "pruner.demo", "--run", str(d / "run")], render.demo,
                   keep=("run/demo_timing.json", "run/samples.summary.json", "run/bench/*.json", "run/bench/*.md",
                         "run/bench/*.png", "run/train/*.png", "run/train/*.json"),
                   adopt_needs=("bench/results.json", "bench/results.md", "demo_timing.json")),
    "profile": Figure(lambda d: _py("bench/profile_default.py", "--out", str(d / "default_profile")), render.profile),
    "presample": Figure(lambda d: _py("bench/presample_vs_hf.py", "--out", str(d / "presample_vs_hf.json")),
                        render.presample),
    "kernels": Figure(lambda d: _py("bench/kernel_ops.py", "--out", str(d / "kernels_cpu.csv")), render.kernels),
    "train_step": Figure(lambda d: _py("bench/train_step.py", "--out", str(d)), render.train_step),
    "paper": Figure(lambda d: _py("bench/paper_comparisons.py", "--run", str(d / "run")), render.paper,
                    keep=("run/bench/*.json", "run/bench/*.md", "run/bench/*.png",
                          "run/set-o1-pruner-lam2/report/report.md", "run/set-o1-pruner-lam2/report/*.png"),
                    slow=True, adopt_needs=("bench/results.json", "bench/results.md")),
}


@dataclass
class FiguresConfig:
    """Regenerate every figure the README and docs/ pages quote, from one command, stamped with the date and commit."""

    only: list[str] = field(default_factory=list, metadata={"help": "figures, space-separated: " + " ".join(FIGURES) + " (default: all but paper; with --render, those the folder has)"})
    out: str = field(default="", metadata={"help": "results folder (default runs/figures/<date>-<commit>)"})
    demo_run: str = field(default="", metadata={"help": "a finished demo run folder to take the demo's tables from"})
    paper_run: str = field(default="", metadata={"help": "a finished bench/paper_comparisons.py run folder to take the paper table from"})
    into: str = field(default="", metadata={"help": "also copy the kept files and merge figures.md/json here (e.g. docs/results)"})
    readme: list[str] = field(default_factory=list, metadata={"help": "also rewrite the figure regions of these Markdown files (e.g. README.md docs/*.md); each figure's region must be in exactly one of them"})
    render: str = field(default="", metadata={"help": "measure nothing: render the figures of this results folder"})

    def adopted(self, name: str) -> Path | None:
        """The finished run folder given for figure `name` (--demo-run, --paper-run), if any."""
        folder = {"demo": self.demo_run, "paper": self.paper_run}.get(name)
        return Path(folder) if folder else None


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


def adopt(name: str, run: Path, folder: Path) -> dict:
    """Take the tables of a run already made (a timed `make demo`, an hour of paper comparisons)."""
    for needed in FIGURES[name].adopt_needs:
        if not (run / needed).is_file():
            raise SystemExit(f"--{name}-run {run}: {run / needed} is missing (a finished run folder has it)")
    _copy_kept(run, folder / name / "run", tuple(g.removeprefix("run/") for g in FIGURES[name].keep))
    timing = run / "demo_timing.json"
    if timing.is_file():
        record = json.loads(timing.read_text())
        total, finished = record["total_s"], record.get("finished")
    else:  # the results file's time stands for the run's end
        made = (run / FIGURES[name].adopt_needs[0]).stat().st_mtime
        total, finished = None, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(made))
    return {"command": f"(adopted) {run}", "wall_s": total, "finished": finished, "returncode": 0}


def _copy_kept(src: Path, dst: Path, globs: tuple[str, ...]) -> None:
    for pattern in globs:
        for file in src.glob(pattern):
            if file.is_file():
                (dst / file.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, dst / file.relative_to(src))


def fragments(folder: Path, names: list[str], meta: dict) -> dict[str, str]:
    """Each figure's Markdown region body: the stamp (the figure's own date and commit), then the figure."""
    out = {}
    for name in names:
        fig = meta["figures"][name]
        load = (f"adopted a run that finished {fig.get('finished')}" if "load_before" not in fig
                else f"load average {fig['load_before']} at the start")
        wall = "" if fig.get("wall_s") is None else f", {fig['wall_s']:.0f} s"
        line = (f"_`python bench/readme_figures.py --only {name}`: {fig.get('date', meta['date'])}, commit "
                f"{fig.get('commit', meta['commit'])}, {meta['machine']}, {load}{wall}._")
        out[name] = f"{line}\n\n{FIGURES[name].render(folder / name).strip()}\n"
    return out


def update_curated(folder: Path, into: Path, names: list[str], bodies: dict[str, str], meta: dict) -> None:
    """Replace <into>/<figure>/ by the kept files of this run; merge figures.json and figures.md."""
    for name in names:
        staged = into / f"{name}.partial"
        shutil.rmtree(staged, ignore_errors=True)
        _copy_kept(folder / name, staged, FIGURES[name].keep)
        shutil.rmtree(into / name, ignore_errors=True)
        staged.rename(into / name)
    curated = into / "figures.json"
    merged = json.loads(curated.read_text()) if curated.is_file() else {"figures": {}}
    # the figures kept from earlier runs keep their own stamp (the old top level's, if they had none);
    # the top level is this update's
    for fig in merged["figures"].values():
        fig.setdefault("date", merged.get("date"))
        fig.setdefault("commit", merged.get("commit"))
    merged.update({k: v for k, v in meta.items() if k != "figures"})
    merged["figures"].update({name: {"date": meta["date"], "commit": meta["commit"], **meta["figures"][name]}
                              for name in names})
    curated.write_text(json.dumps(merged, indent=2) + "\n")
    merge_markdown(into / "figures.md", bodies)


def merge_markdown(md: Path, bodies: dict[str, str]) -> None:
    """Replace (or append) the figures' regions of `md`; the other regions stay as they are."""
    md.write_text(render.replace_regions(md.read_text() if md.exists() else "", bodies, append_missing=True))


def parse(argv: list[str] | None) -> tuple[FiguresConfig, list[str]]:
    """The configuration and the figures it names, every flag checked before any work."""
    cfg = parse_config(FiguresConfig, argv, prog="bench/readme_figures.py")
    # Space-separated like every list flag; a comma-joined value (this flag's older form) still works.
    only = [n for value in cfg.only for n in value.split(",") if n]
    if cfg.render:
        if not (Path(cfg.render) / "figures.json").is_file():
            raise SystemExit(f"--render {cfg.render}: no figures.json there (a results folder of this script has one)")
        made = json.loads((Path(cfg.render) / "figures.json").read_text())["figures"]
        only = only or [n for n in made if made[n]["returncode"] == 0]
    names = only or [n for n, f in FIGURES.items() if not f.slow]
    unknown = sorted(set(names) - set(FIGURES))
    if unknown or not names:
        raise SystemExit(f"--only: unknown figure(s) {unknown}; choose from {', '.join(FIGURES)}")
    if cfg.readme:
        region_files(cfg.readme, names)  # checked before any heavy work: every region already there, once
    return cfg, names


def region_files(files: list[str], names: list[str]) -> dict[str, list[str]]:
    """Which figures' regions each Markdown file holds; each named figure must be in exactly one file, once."""
    texts = {f: Path(f).read_text() for f in files}
    held: dict[str, list[str]] = {f: [] for f in files}
    for name in names:
        opening, closing = render.marker(name), render.marker(name, closing=True)
        found = [f for f, text in texts.items() if opening in text or closing in text]
        if len(found) != 1:
            raise ValueError(f"{opening}: need its region in exactly one of {', '.join(files)}; "
                             f"found in {', '.join(found) or 'none'}")
        render.replace_regions(texts[found[0]], {name: ""}, source=found[0])  # once, in order
        held[found[0]].append(name)
    return held


def measure_all(cfg: FiguresConfig, names: list[str]) -> tuple[Path, dict]:
    """Measure the chosen figures into a new results folder; returns it and its figures.json."""
    meta = {**stamp(), "figures": {}}
    default = ROOT / "runs" / "figures" / f"{time.strftime('%Y%m%d-%H%M%S')}-{meta['commit']}"
    folder = Path(cfg.out) if cfg.out else default
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        run = cfg.adopted(name)
        meta["figures"][name] = adopt(name, run, folder) if run else measure(name, folder)
    (folder / "figures.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder, meta


def main(argv: list[str] | None = None) -> int:
    cfg, names = parse(argv)
    if cfg.render:
        folder = Path(cfg.render)
        meta = json.loads((folder / "figures.json").read_text())
    else:
        folder, meta = measure_all(cfg, names)
    done = [n for n in names if n in meta["figures"] and meta["figures"][n]["returncode"] == 0]
    bodies = fragments(folder, done, meta)
    merge_markdown(folder / "figures.md", bodies)
    print(f"\nwrote {folder / 'figures.md'} ({', '.join(done) or 'no figures'})")
    if len(done) < len(names):
        print("some figures failed: --into / --readme left unchanged", file=sys.stderr)
        return 1
    if cfg.into and Path(cfg.into).resolve() != folder.resolve():
        Path(cfg.into).mkdir(parents=True, exist_ok=True)
        update_curated(folder, Path(cfg.into), done, bodies, meta)
        print(f"updated {cfg.into}")
    for page, held in (region_files(cfg.readme, done) if cfg.readme else {}).items():
        if held:
            Path(page).write_text(render.replace_regions(Path(page).read_text(), {n: bodies[n] for n in held}, source=page))
            print(f"rewrote the regions {', '.join(held)} of {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
