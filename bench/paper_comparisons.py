"""The paper's comparisons on the embedded default, in one table through bench/speed.py.

    python bench/paper_comparisons.py --samples runs/demo/samples.jsonl --run runs/paper

Models: the base; the base with the paper's fast-solving prompt; SFT on the shortest correct sample
per problem; DPO (shortest correct chosen, longest rejected); O1-Pruner at lambda = 0, 1, 2, 5 (the
ablation; lambda = 2 is the method's main row). Every fine-tune is the same trainer
(`pruner/train.py`) with another loss (`--loss sft|dpo|lh`) on a set from `pruner/dataset.py --kind`.
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
    p.add_argument("--samples", default="runs/demo/samples.jsonl", help="pre-sampled responses of the base model")
    p.add_argument("--run", default="runs/paper", help="output folder")
    p.add_argument("--lams", type=float, nargs="*", default=[0.0, 1.0, 2.0, 5.0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--test-problems", type=int, default=400)
    p.add_argument("--modes", nargs="*", default=["greedy", "sampled"])
    p.add_argument("--train-args", default="", help="extra flags for every pruner/train.py run")
    args = p.parse_args()
    run, py = Path(args.run), sys.executable
    sets = {f"o1-pruner-lam{lam:g}": ("lh", ["--lam", str(lam)]) for lam in args.lams}
    sets.update({"sft-shortest": ("sft", []), "dpo": ("dpo", [])})
    models = ["base=embedded", "fast-prompt=embedded"]
    for name, (kind, extra) in sets.items():
        data, out = run / f"set-{name}", run / f"train-{name}"
        if not (data / "meta.json").exists():
            _run([py, "pruner/dataset.py", "--samples", args.samples, "--out", str(data), "--kind", kind, *extra])
        if not (out / "export" / "config.json").exists():
            _run([py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                  "pruner/train.py", "--data", str(data), "--out", str(out), "--resume",
                  *shlex.split(args.train_args)])
        models.append(f"{name}={out / 'export'}")
    _run([py, "bench/speed.py", "--models", *models, "--fast-prompt", "fast-prompt", "--limit",
          str(args.test_problems), "--modes", *args.modes, "--out", str(run / "bench")])


if __name__ == "__main__":
    main()
