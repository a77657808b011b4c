#!/usr/bin/env bash
# All GPU-only checking and measuring in one run (<= 9.5 minutes on an H100/H200; `--budget` prints the
# per-stage budget table and exits, `--dry` prints it too, then runs every stage on the CPU):
#   1. the kernel test suite on CUDA (fp32 and bf16 cases),
#   2. bench/kernel_ops.py at D=3584, V=152064, N=4k/8k/16k against eager, torch.compile, Liger, CCE,
#   3. training steps of a Qwen2.5-1.5B-shaped model (random init, 4k-token sequences) under FSDP2
#      on 1 GPU, against the paper code's recipe (second reference model, full fp32 logits),
#   4. the REAL trainer, `torchrun --nproc_per_node 1 pruner/train.py` (NCCL on a GPU), on a
#      Qwen2.5-1.5B-shaped random-weight model with 4k-token responses (bench/trainer_fixture.py):
#      old log-probs once (the reference model's, first round), bf16 MixedPrecisionPolicy, Liger patched,
#      fused head, a DCP checkpoint, --resume, the HF export loaded back by transformers; then the same at
#      --activation-checkpointing. Peak memory, tokens/s and the memory planner's estimate go to the summary,
#   5. the summary table, printed last.
# Nothing from this project is installed there: it runs from the tree (PYTHONPATH below), without vLLM.
# Results go to $OUT (default runs/gpu_check/, ignored by git).
#
# Liger-Kernel and Cut Cross-Entropy come as wheels from $GPU_WHEELS (default .cache/gpu-wheels/, ignored).
# The GPU machine has no network: first, on a machine that has one, run `make gpu-wheels` (pip download of
# the versions pinned by hash in bench/gpu-wheels.txt), then carry .cache/gpu-wheels/ there with the
# checkout. Without the wheels the run goes on; the Liger/CCE columns and the Liger patch are then missing.
# Without a GPU (or with --dry) the same steps run on the CPU at small shapes, with the Triton interpreter,
# so the script is known to work before GPU time is spent.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_check}"
GPU_WHEELS="${GPU_WHEELS:-.cache/gpu-wheels}"
PY="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
DRY=0
BUDGET_ONLY=0
for arg in "$@"; do
  case "$arg" in
    --dry) DRY=1 ;;
    --budget) BUDGET_ONLY=1 ;;
    *) echo "gpu_check.sh: unknown argument $arg (use --dry or --budget)" >&2; exit 2 ;;
  esac
done

# The whole-run budget, one row per stage: name, expected seconds on an H100 (an estimate: nothing has run on a
# GPU yet), limit in seconds. Every limit is >= 1.5x its expectation; the limits plus set-up fit one 10-minute
# command. kernel_tests: about 60 Triton compiles on a cold cache (2-3 s each) plus the tests themselves.
STAGES=(
  "prerequisites 5 10"
  "kernel_tests 120 190"
  "kernel_bench 55 85"
  "train_step 25 40"
  "trainer_fixture 15 25"
  "trainer_run 35 55"
  "trainer_resume 25 40"
  "trainer_export_loads 8 15"
  "trainer_ac 25 40"
)
SETUP_S=25            # wheels, versions, the summary: outside the stages
KILL_AFTER_S=5        # `timeout -k`: a stage that ignores SIGTERM (a hung NCCL call) is killed this much later
LIMIT_SCALE=1
[ "$DRY" = 1 ] && LIMIT_SCALE=8  # the interpreter and a 2-core CPU are far slower than the GPU the limits are for

stage_limit() {  # name -> limit in seconds, scaled
  local row name expected limit
  for row in "${STAGES[@]}"; do
    read -r name expected limit <<< "$row"
    [ "$name" = "$1" ] && { echo $(( limit * LIMIT_SCALE )); return; }
  done
  echo "gpu_check.sh: no budget for stage $1" >&2; exit 2
}
print_budget() {
  local row name expected limit total_e=0 total_l=0
  echo "| stage | expected s (estimate) | limit s | margin |"
  echo "|---|---:|---:|---:|"
  for row in "${STAGES[@]}"; do
    read -r name expected limit <<< "$row"
    limit=$(( limit * LIMIT_SCALE )); expected=$(( expected * LIMIT_SCALE ))
    total_e=$(( total_e + expected )); total_l=$(( total_l + limit ))
    echo "| $name | $expected | $limit | $(( 100 * limit / expected - 100 ))% |"
  done
  local kill_total=$(( ${#STAGES[@]} * KILL_AFTER_S ))
  echo "| set-up, wheels, summary | | $SETUP_S | |"
  echo "| timeout -k grace (${#STAGES[@]} x ${KILL_AFTER_S} s, worst case) | | $kill_total | |"
  echo "| **whole run** | $(( total_e + SETUP_S )) | $(( total_l + SETUP_S + kill_total )) | |"
}
if [ "$BUDGET_ONLY" = 1 ]; then print_budget; exit 0; fi

mkdir -p "$OUT"
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null || DRY=1
[ "$DRY" = 1 ] && LIMIT_SCALE=8
echo "== budget ($([ "$DRY" = 1 ] && echo 'dry: CPU limits, 8x' || echo GPU)) =="
print_budget | tee "$OUT/budget.md"

SITE="$(mktemp -d)"
if ls "$GPU_WHEELS"/*.whl > /dev/null 2>&1; then
  $PY -m pip install --quiet --no-deps --no-index --target "$SITE" "$GPU_WHEELS"/*.whl 2>"$OUT/wheels.log" \
    || echo "note: could not install the wheels of $GPU_WHEELS (see $OUT/wheels.log); Liger/CCE columns will be missing"
else
  echo "note: no wheels in $GPU_WHEELS (run \`make gpu-wheels\` on a networked machine and carry the folder here);" \
    "Liger/CCE columns will be missing"
fi
export PYTHONPATH="$PWD:$PWD/kernels:$SITE${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
  echo "== dry mode: CPU, small shapes, Triton interpreter =="
  KERNEL_ARGS=(--n 256 --d 64 --v 1000 --reps 2 --warmup 1 --dtype float32)
  STEP_ARGS=(--preset cpu-small --batch 2 --seq 128 --steps 1 --warmup 1)
  TEST_FILTER=(-k "not memory")
  FIXTURE_ARGS=(--arch cpu-small --response-tokens 48 --problems 2 --k 4)
  FIXTURE_ARCH=cpu-small
  TRAIN_DEVICE=(--device cpu)  # --dry on a GPU machine too: the interpreter is on, so stay on the CPU
else
  KERNEL_ARGS=(--n 4096 8192 16384 --d 3584 --v 152064 --reps 10 --warmup 3 --dtype bfloat16)
  STEP_ARGS=(--preset qwen2.5-1.5b --batch 1 --seq 4096 --steps 3 --warmup 2 --activation-checkpointing)
  TEST_FILTER=()
  FIXTURE_ARGS=(--arch qwen2.5-1.5b --response-tokens 4096 --problems 2 --k 4)
  FIXTURE_ARCH=qwen2.5-1.5b
  TRAIN_DEVICE=(--device cuda)
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu_info.csv" 2>/dev/null || true
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee "$OUT/versions.txt"

run_step() {  # name, command...: the stage under its budget; SIGKILL KILL_AFTER_S after SIGTERM
  local name="$1" limit; limit=$(stage_limit "$1"); shift
  echo "== $name (limit ${limit} s) =="
  local start=$SECONDS
  timeout -k "$KILL_AFTER_S" "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - start)) limit=$limit" | tee -a "$OUT/gpu_check_status.txt"
  tail -n 15 "$OUT/$name.log"
}
skip_step() {  # name, why
  echo "$1 rc=skipped seconds=0 limit=$(stage_limit "$1") ($2)" | tee -a "$OUT/gpu_check_status.txt"
}
: > "$OUT/gpu_check_status.txt"

# Prerequisites before any stage: the libraries every stage imports, pytest for the tests, and disk for the
# model, ONE DCP checkpoint (fp32 params + AdamW's two states: 12 bytes a parameter) and the bf16 export.
run_step prerequisites $PY - "$FIXTURE_ARCH" "$OUT" <<'PYEOF'
import importlib.util, shutil, sys
missing = [m for m in ("torch", "triton", "transformers", "safetensors") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing {', '.join(missing)}: install the project (pip install -e .) before the GPU check")
from pruner.plan import model_layout
from pruner.presets import config_for
params = model_layout(config_for(sys.argv[1])).param_count
need = params * (12 + 2 + 2) + 2**31  # checkpoint + bf16 model + bf16 export + 2 GiB of logs and caches
free = shutil.disk_usage(sys.argv[2]).free
print(f"disk: {free / 2**30:.1f} GiB free, {need / 2**30:.1f} GiB needed ({params / 1e9:.2f} B params)")
if free < need:
    sys.exit(f"not enough disk under {sys.argv[2]}: free {free / 2**30:.1f} GiB, need {need / 2**30:.1f} GiB")
print("pytest:", "present" if importlib.util.find_spec("pytest") else "MISSING (kernel_tests is skipped)")
PYEOF
if ! grep -q "^prerequisites rc=0 " "$OUT/gpu_check_status.txt"; then
  echo "gpu_check: prerequisites failed (see $OUT/prerequisites.log); nothing else runs"; exit 1
fi
# Autotuning off for the tests: each odd test shape would benchmark every candidate (minutes of compiles);
# the configs test runs every candidate explicitly and drives the autotuned path itself.
if $PY -c "import pytest" 2>/dev/null; then
  run_step kernel_tests env O1PRUNER_AUTOTUNE=0 $PY -m pytest -q -p no:cacheprovider tests/test_kernels_*.py \
    "${TEST_FILTER[@]}" --junitxml "$OUT/kernel_tests.xml"
else
  skip_step kernel_tests "pytest is not installed: pip install pytest"
fi
run_step kernel_bench $PY bench/kernel_ops.py --ops fused_linear logprobs ratio_loss "${KERNEL_ARGS[@]}" \
  --out "$OUT/kernels.csv"
run_step train_step $PY bench/train_step.py --torchrun "${STEP_ARGS[@]}" --out "$OUT"

# The trainer as users run it. 8 samples, 2 per step, 3 steps: stop after 2 (the one DCP checkpoint), resume
# from it to the end without writing a second (--no-final-checkpoint), export; at most one checkpoint on disk.
TR="$OUT/trainer"
rm -rf "$TR"
TRAIN=(-m torch.distributed.run --standalone --nproc_per_node 1 pruner/train.py --model "$TR/fixture/model"
       --data "$TR/fixture/trainset" --global-batch-size 2 --micro-batch-size 1 --lr 1e-6 --warmup-ratio 0
       --max-steps 3 --ckpt-every 100 --keep-checkpoints 1 "${TRAIN_DEVICE[@]}")
run_step trainer_fixture $PY bench/trainer_fixture.py "${FIXTURE_ARGS[@]}" --device "${TRAIN_DEVICE[1]}" --out "$TR/fixture"
run_step trainer_run $PY "${TRAIN[@]}" --out "$TR/run" --stop-after 2 --no-export
run_step trainer_resume $PY "${TRAIN[@]}" --out "$TR/run" --resume --no-final-checkpoint
rm -rf "$TR/run/checkpoints"  # ~18 GB at 1.5B (params + AdamW states): free the disk before the next stages
run_step trainer_export_loads $PY -c "import sys, torch; from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); out = m(torch.tensor([[1, 2, 3]])).logits
assert torch.isfinite(out).all(); print('export loads:', type(m).__name__, sum(p.numel() for p in m.parameters()))" "$TR/run/export"
run_step trainer_ac $PY "${TRAIN[@]}" --out "$TR/ac" --activation-checkpointing --no-export --no-final-checkpoint
rm -rf "$TR/ac/checkpoints"
$PY bench/gpu_summary.py --results "$OUT"
