# make demo    : create .venv on first use, install, run the main job (a PPO training demo)
# make test    : create .venv on first use, install, run ruff and the test suite (what CI runs)
# make example : one loss call on an esper-shaped batch with its per-head telemetry table
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 (a CPU build) is pinned: an unpinned torch pulls a multi-GB CUDA build
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.6.0
DEPS := numpy "pytest>=8" "hypothesis>=6.100" "ruff>=0.6" matplotlib "scikit-build-core>=0.10" "pybind11>=2.12" ninja cmake
# the interop test tier (tests/test_interop_*.py) and the packaging test (python -m build): pinned
DEPS += "sb3-contrib==2.9.2" "stable-baselines3==2.9.2" "torchrl==0.14.1" "tensordict==0.14.3" "build==1.6.1"
# a new subpackage (its __init__.py) needs a new editable install too
SOURCES := pyproject.toml CMakeLists.txt esper_kernels/schema.py $(wildcard esper_kernels/*/__init__.py) $(wildcard csrc/*) $(wildcard csrc/*/*)

.PHONY: install example demo test test-fast lint bench info clean

$(VENV)/.deps: Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH_SPEC) $(TRITON_SPEC) $(DEPS)
	touch $@

$(VENV)/.installed: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m esper_kernels demo

example: install
	$(PY) -m esper_kernels example

info: install
	$(PY) -m esper_kernels info

test: install
	$(PY) -m ruff check .
	cd tests && ../$(PY) -m pytest -q -c ../pyproject.toml .

lint: install
	$(PY) -m ruff check .

bench: install
	$(PY) -m esper_kernels bench

clean:
	rm -rf build $(VENV) .pytest_cache .hypothesis
