# Fresh-machine entry points; each sets up what it needs in .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED ?= ../shared

.PHONY: demo test clean gpu-check
DEMO_OUT ?= demo-output/mussel_nuclei_denoised.tif

# The main job on a fresh machine: the runtime alone (no PyTorch), then the bundled real EM
# sample restored (denoise, noise level estimated) with the bundled model on the CPU.
$(VENV)/.demo-installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

demo: $(VENV)/.demo-installed
	mkdir -p $(dir $(DEMO_OUT))
	$(VENV)/bin/df5t restore "$$($(PY) -m df5t_deploy.samples)" -o $(DEMO_OUT) --sigma0 auto

# The runtime needs no PyTorch; tests also exercise export, so they install the CPU build
# that pip finds locally (torch==2.13.0) before the [export] extra can pull anything bigger.
$(VENV)/.test-installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[export,test]"
	touch $@

test: $(VENV)/.test-installed
	$(PY) -m pytest -q -ra

clean:
	rm -rf $(VENV) build *.egg-info

# What needs a GPU, on a machine with one (README, "GPUs"), using the machine's own Python
# (the GPU test machine is offline). gpu-check: the GPU tests, then the kernels' GPU tests
# again under compute-sanitizer's memcheck. gpu-bench: the GPU benchmark (several minutes;
# GPU_BENCH_ARGS="--tiles 256" runs one tile size).
GPU_PYTHON ?= python3
GPU_BENCH_ARGS ?=
.PHONY: gpu-bench
gpu-check:
	$(GPU_PYTHON) -m pytest -m gpu -rs -q
	compute-sanitizer --tool memcheck --error-exitcode 1 $(GPU_PYTHON) -m pytest -m gpu -q -k gpu tests/test_cuda_kernels.py

gpu-bench:
	$(GPU_PYTHON) benchmarks/gpu_throughput.py $(GPU_BENCH_ARGS)
