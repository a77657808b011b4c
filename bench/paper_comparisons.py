"""The paper's comparisons on the embedded default, in one table through bench/speed.py.

    python bench/paper_comparisons.py --run runs/paper

Models: the base; the base with the paper's fast-solving prompt; SFT on the shortest correct sample
per problem; DPO (shortest correct chosen, longest rejected); O1-Pruner at lambda = 0, 1, 2, 5 (the
ablation; lambda = 2 is the method's main row). Every fine-tune is the same trainer
(`pruner/train.py`) with another loss (`--loss sft|dpo|lh`) on a set from `pruner/dataset.py --kind`.

The training pool is pre-sampled first (resumed if present) at temperature 1.0, top-p 1.0: at the
paper's 0.5 / 0.8 the embedded default answers every training problem right in all K samples, the
accuracy term of the reward is then zero everywhere, and lambda could not matter.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: list[str]) -> None:
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", default="", help="pre-sampled responses of the base model (default <run>/samples.jsonl, "
                   "sampled first if missing)")
    p.add_argument("--k", type=int, default=8, help="samples per training problem when pre-sampling")
    p.add_argument("--train-problems", type=int, default=1200, help="training problems to pre-sample")
    p.add_argument("--temperature", type=float, default=1.0, help="pre-sampling temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="pre-sampling top-p")
    p.add_argument("--run", default="runs/paper", help="output folder")
    p.add_argument("--lams", type=float, nargs="*", default=[0.0, 1.0, 2.0, 5.0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--test-problems", type=int, default=400)
    p.add_argument("--modes", nargs="*", default=["greedy", "sampled"])
    p.add_argument("--train-args", default="", help="extra flags for every pruner/train.py run")
    args = p.parse_args()
    run, py = Path(args.run), sys.executable
    samples = args.samples or str(run / "samples.jsonl")
    if not args.samples:  # resumes to nothing when complete
        _run([py, "pruner/presample.py", "--out", samples, "--k", str(args.k), "--limit", str(args.train_problems),
              "--temperature", str(args.temperature), "--top-p", str(args.top_p)])
    sets = {f"o1-pruner-lam{lam:g}": ("lh", ["--lam", str(lam)]) for lam in args.lams}
    sets.update({"sft-shortest": ("sft", []), "dpo": ("dpo", [])})
    models = ["base=embedded", "fast-prompt=embedded"]
    for name, (kind, extra) in sets.items():
        data, out = run / f"set-{name}", run / f"train-{name}"
        if not (data / "meta.json").exists():
            _run([py, "pruner/dataset.py", "--samples", samples, "--out", str(data), "--kind", kind, *extra])
        if not (out / "export" / "config.json").exists():
            _run([py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                  "pruner/train.py", "--data", str(data), "--out", str(out), "--resume",
                  *shlex.split(args.train_args)])
        models.append(f"{name}={out / 'export'}")
    _run([py, "bench/speed.py", "--models", *models, "--fast-prompt", "fast-prompt", "--limit",
          str(args.test_problems), "--modes", *args.modes, "--out", str(run / "bench"), "--overwrite"])


if __name__ == "__main__":
    main()
