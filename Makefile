# make demo    : create .venv on first use, install, run the main job (a PPO training demo)
# make test    : create .venv on first use, install, run the linters (make lint) and the test suite (CI runs it)
# make lint    : the hooks of .pre-commit-config.yaml on every file (ruff, ruff format, clang-format); a hook
#                that changes a file fails it (run it, then commit the changes)
# make example : one loss call on an esper-shaped batch with its per-head telemetry table
# make sanitize: the C++ extension built with ASan + UBSan (build/sanitize), running the native tier and the
#                adversarial cases; any sanitizer report fails it
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 (a CPU build) is pinned: an unpinned torch pulls a multi-GB CUDA build
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.6.0
DEPS := numpy "pytest>=8" "hypothesis>=6.100" "ruff>=0.6" matplotlib "scikit-build-core>=0.10" "pybind11>=2.12" ninja cmake
# the interop test tier (tests/test_interop_*.py) and the packaging test (python -m build): pinned
DEPS += "sb3-contrib==2.9.2" "stable-baselines3==2.9.2" "torchrl==0.14.1" "tensordict==0.14.3" "build==1.6.1"
# the linters of .pre-commit-config.yaml (local hooks: these pinned versions, nothing fetched)
DEPS += "pre-commit==4.7.0" "clang-format==23.1.3"
# a new subpackage (its __init__.py) needs a new editable install too
SOURCES := pyproject.toml CMakeLists.txt esper_kernels/schema.py $(wildcard esper_kernels/*/__init__.py) $(wildcard csrc/*) $(wildcard csrc/*/*)

.PHONY: install example demo test test-fast lint bench info clean sanitize

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

test: lint
	cd tests && ../$(PY) -m pytest -q -c ../pyproject.toml .

lint: install
	PATH="$(abspath $(VENV))/bin:$$PATH" PRE_COMMIT_HOME="$(abspath $(VENV))/pre-commit" \
		$(VENV)/bin/pre-commit run --all-files --show-diff-on-failure

bench: install
	$(PY) -m esper_kernels bench

# The sanitizer build: csrc/ configured on its own (RelWithDebInfo: -g, no LTO, no strip, no CUDA) with
# -fsanitize=address,undefined and no recovery, the package copied beside the instrumented module
# (build/sanitize/pkg) and imported from there: python -S skips the editable install's import hook, PYTHONPATH
# names the copy and the venv's site-packages. ASan needs its runtime (and libstdc++, or PyTorch's C++
# exceptions abort it) preloaded into the uninstrumented interpreter; leak detection is off (Python's
# interpreter-lifetime allocations). Runs the native tier, the issue's reproductions and the fuzz for the cpu
# backend, and benchmarks/sanitize_case.py's hostile inputs; halt_on_error: the first report ends the run.
SAN_DIR := build/sanitize
SAN_FLAGS := -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer
SAN_ENV = LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
	ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1 \
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	PYTHONPATH="$(abspath $(SAN_DIR)/pkg):$$($(abspath $(PY)) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

sanitize: $(VENV)/.deps
	$(VENV)/bin/cmake -S . -B $(SAN_DIR)/cmake -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV)/bin/ninja) \
		-DCMAKE_BUILD_TYPE=RelWithDebInfo -DESPER_CUDA=OFF -DPython_EXECUTABLE=$(abspath $(PY)) \
		-Dpybind11_DIR="$$($(PY) -m pybind11 --cmakedir)" -DCMAKE_CXX_FLAGS="$(SAN_FLAGS)" \
		-DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined"
	$(VENV)/bin/cmake --build $(SAN_DIR)/cmake
	rm -rf $(SAN_DIR)/pkg && mkdir -p $(SAN_DIR)/pkg
	cp -r esper_kernels $(SAN_DIR)/pkg/ && rm -f $(SAN_DIR)/pkg/esper_kernels/_C*.so
	cp $(SAN_DIR)/cmake/csrc/_C*.so $(SAN_DIR)/pkg/esper_kernels/
	cd tests && $(SAN_ENV) ../$(PY) -S -m pytest -q -c ../pyproject.toml -p no:cacheprovider --capture=sys \
		-m "native or fuzz" -k "not triton" .
	cd tests && $(SAN_ENV) ../$(PY) -S -m pytest -q -c ../pyproject.toml -p no:cacheprovider --capture=sys -k cpu test_numerics.py
	$(SAN_ENV) $(PY) -S benchmarks/sanitize_case.py --backend cpu --device cpu

clean:
	rm -rf build $(VENV) .pytest_cache .hypothesis
