# Set-up and entry points. `make demo` and `make test` are the README's two commands: each creates
# .venv, installs torch==2.13.0 when no torch is there (never an open range, which pulls several GB of
# CUDA packages), then this package with --no-build-isolation so the extension builds against that torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.metaformer-installed

.PHONY: setup demo test test-gpu bench cuda-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install "torch==$(TORCH_VERSION)"
	@$(PY) -c "import torch; print('torch', torch.__version__)" > $(VENV)/torch-version.txt
	@echo "torch==$$($(PY) -c 'import torch; print(torch.__version__.split("+")[0])')" > $(VENV)/constraints.txt
	$(PIP) install -c $(VENV)/constraints.txt setuptools wheel ninja pybind11
	$(PIP) install -c $(VENV)/constraints.txt --no-build-isolation -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/metaformer demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# The op on a GPU against the float64 CPU reference (needs a CUDA build of torch and a GPU; fails, never
# skips, without one). TEST_DEVICE=cpu runs the same checks on the CPU kernel.
TEST_DEVICE ?= cuda
test-gpu: $(STAMP)
	METAFORMER_TEST_DEVICE=$(TEST_DEVICE) HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests/gpu

bench: $(STAMP)
	$(PY) scripts/bench_inner_update.py

# Compiles the torch-free CUDA kernels and their self-test for sm_80 and sm_90 (no GPU needed).
cuda-check:
	bash scripts/check_cuda_build.sh

clean:
	rm -rf build *.egg-info metaformer/_C*.so
