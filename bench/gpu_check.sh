#!/usr/bin/env bash
# All GPU-only checking and measuring in one run (<= 8 minutes on an H100/H200):
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
mkdir -p "$OUT"
PY="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
DRY=0
LIMIT_SCALE=1  # the stage limits below add up to 475 s on a GPU (<= 8 minutes with set-up)
[ "${1:-}" = "--dry" ] && DRY=1
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || DRY=1

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
  LIMIT_SCALE=8  # the interpreter and a 2-core CPU are far slower than the GPU the limits are set for
  KERNEL_ARGS=(--n 256 --d 64 --v 1000 --reps 2 --warmup 1 --dtype float32)
  STEP_ARGS=(--preset cpu-small --batch 2 --seq 128 --steps 1 --warmup 1)
  TEST_FILTER=(-k "not memory")
  FIXTURE_ARGS=(--arch cpu-small --response-tokens 48 --problems 2 --k 4)
  TRAIN_DEVICE=(--device cpu)  # --dry on a GPU machine too: the interpreter is on, so stay on the CPU
else
  KERNEL_ARGS=(--n 4096 8192 16384 --d 3584 --v 152064 --reps 10 --warmup 3 --dtype bfloat16)
  STEP_ARGS=(--preset qwen2.5-1.5b --batch 1 --seq 4096 --steps 3 --warmup 2 --activation-checkpointing)
  TEST_FILTER=()
  FIXTURE_ARGS=(--arch qwen2.5-1.5b --response-tokens 4096 --problems 2 --k 4)
  TRAIN_DEVICE=(--device cuda)
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu_info.csv" 2>/dev/null || true
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee "$OUT/versions.txt"

run_step() {  # name, time limit (s), command...
  local name="$1" limit=$(( $2 * LIMIT_SCALE )); shift 2
  echo "== $name =="
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - start))" | tee -a "$OUT/gpu_check_status.txt"
  tail -n 15 "$OUT/$name.log"
}
: > "$OUT/gpu_check_status.txt"
# Autotuning off for the tests: each odd test shape would benchmark every candidate (minutes of compiles);
# the configs test runs every candidate explicitly and drives the autotuned path itself.
run_step kernel_tests 90 env O1PRUNER_AUTOTUNE=0 $PY -m pytest -q -p no:cacheprovider tests/test_kernels_*.py "${TEST_FILTER[@]}" \
  --junitxml "$OUT/kernel_tests.xml"
run_step kernel_bench 100 $PY bench/kernel_ops.py --ops fused_linear logprobs ratio_loss "${KERNEL_ARGS[@]}" \
  --out "$OUT/kernels.csv"
run_step train_step 50 $PY bench/train_step.py --torchrun "${STEP_ARGS[@]}" --out "$OUT"

# The trainer as users run it. 8 samples, 2 per step, 3 steps: stop after 2 (DCP checkpoint), resume, export.
TR="$OUT/trainer"
rm -rf "$TR"
TRAIN=(-m torch.distributed.run --standalone --nproc_per_node 1 pruner/train.py --model "$TR/fixture/model"
       --data "$TR/fixture/trainset" --global-batch-size 2 --micro-batch-size 1 --lr 1e-6 --warmup-ratio 0
       --max-steps 3 --ckpt-every 100 --keep-checkpoints 1 "${TRAIN_DEVICE[@]}")
run_step trainer_fixture 40 $PY bench/trainer_fixture.py "${FIXTURE_ARGS[@]}" --device "${TRAIN_DEVICE[1]}" --out "$TR/fixture"
run_step trainer_run 75 $PY "${TRAIN[@]}" --out "$TR/run" --stop-after 2 --no-export
run_step trainer_resume 50 $PY "${TRAIN[@]}" --out "$TR/run" --resume
run_step trainer_export_loads 25 $PY -c "import sys, torch; from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); out = m(torch.tensor([[1, 2, 3]])).logits
assert torch.isfinite(out).all(); print('export loads:', type(m).__name__, sum(p.numel() for p in m.parameters()))" "$TR/run/export"
rm -rf "$TR/run/checkpoints"  # ~18 GB at 1.5B (params + AdamW states): free the disk for the next run
run_step trainer_ac 45 $PY "${TRAIN[@]}" --out "$TR/ac" --activation-checkpointing --no-export
rm -rf "$TR/ac/checkpoints"
$PY bench/gpu_summary.py --results "$OUT"
