# Fresh-machine entry points; each sets up what it needs in .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED ?= ../shared

.PHONY: demo test clean display-libraries
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
	$(PY) -m pip install -q -e ".[export,test,serve,cluster,napari-test]"
	touch $@

# The napari plugin's tests run napari on a virtual display: Xvfb, Mesa's OpenGL and the xcb
# libraries Qt's X11 platform loads, from Debian's packages (installed when missing).
X11_PACKAGES = xvfb libgl1-mesa-dri libglx-mesa0 libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-image0 \
	libxcb-render-util0 libxcb-randr0 libxcb-shape0 libxcb-cursor0 libxkbcommon-x11-0 libfontconfig1 libdbus-1-3
display-libraries:
	@dpkg -s $(X11_PACKAGES) >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q --no-install-recommends $(X11_PACKAGES); }

test: $(VENV)/.test-installed display-libraries
	$(PY) -m pytest -q -ra --durations=15

clean:
	rm -rf $(VENV) build *.egg-info

# What needs a GPU, on a machine with one (README, "GPUs"), with the machine's own Python
# (the GPU test machine is offline and receives only the checkout): gpu-verify installs the
# package, runs the GPU tests, the sanitizers and the GPU benchmark, and writes REPORT/report.md
# (PART=tests or PART=bench for one part). gpu-wheelhouse, run where PyPI is reachable, fills
# wheelhouse/ (git-ignored; carried to the GPU machine) with cp312 wheels of what that machine
# lacks; numpy, sympy and mpmath come with its PyTorch and are left out.
GPU_PYTHON ?= python3
REPORT ?= gpu-verify-report
PART ?= all
GPU_WHEELS := zarr mrcfile PyWavelets watchdog click tqdm "setuptools>=77" onnx onnxscript pytest
GPU_PLATFORMS := --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
.PHONY: gpu-verify gpu-wheelhouse

gpu-verify:
	$(GPU_PYTHON) -m df5t_deploy.gpu_verify --report $(REPORT) --part $(PART)

gpu-wheelhouse:
	rm -rf wheelhouse.partial
	python3 -m pip download -q --only-binary=:all: $(GPU_PLATFORMS) -d wheelhouse.partial $(GPU_WHEELS)
	rm -f wheelhouse.partial/numpy-* wheelhouse.partial/sympy-* wheelhouse.partial/mpmath-*
	rm -rf wheelhouse && mv wheelhouse.partial wheelhouse
	du -sh wheelhouse

# Deliberate bugs the tests must catch (tests/mutations.py): each mutation must fail the suite.
.PHONY: mutants
mutants: $(VENV)/.test-installed
	$(PY) tests/mutations.py
