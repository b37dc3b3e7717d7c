# Fresh machine: `make train` installs everything into .venv and runs the main job; `make test` installs and tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export DS_BUILD_OPS := 0

.PHONY: install build train test bench clean test-gpu-host-versions test-cpu-matrix offline-bundle

install: $(VENV)/.installed build

$(VENV)/.installed: pyproject.toml setup.py
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q "pybind11>=2.11" "setuptools>=68" wheel  # `make build` compiles csrc/ outside pip's build env
	$(PIP) install -q -e ".[dev]"
	touch $@

# Rebuild the C++ extension in place whenever csrc/ changed (the editable install does not watch it).
build: $(VENV)/.installed
	$(PY) setup.py -q build_ext --inplace

train: install
	$(VENV)/bin/bioclip-fast train

test: install
	$(PY) -m pytest

bench: install
	$(VENV)/bin/bioclip-fast bench-loss

clean:
	rm -rf build bioclip_fast/*.so runs

# --- The GPU host's versions (Python 3.12, torch 2.11.0, triton 3.6.0, numpy < 2.4: triton 3.6's interpreter fails
# with numpy >= 2.4) in their own venv, from pip: the interpreter kernel tests and the sm_90a static compile (ptxas
# spill check of the default configs) under triton 3.6. Results: runs/gpu-host-versions/junit.xml.
PY312 ?= $(shell p="$$(pyenv root 2>/dev/null)/versions/3.12.1/bin/python3.12"; [ -x "$$p" ] && echo "$$p" || echo python3.12)
GPUHOST_VENV ?= .venv-gpuhost
GPUHOST_PY := $(GPUHOST_VENV)/bin/python
GPUHOST_TESTS ?= tests/test_triton_kernels.py tests/test_loss_precision.py

$(GPUHOST_VENV)/.installed: pyproject.toml setup.py
	$(PY312) -m venv $(GPUHOST_VENV)
	$(GPUHOST_PY) -m pip install -q --upgrade pip
	$(GPUHOST_PY) -m pip install -q torch==2.11.0 triton==3.6.0 torchvision==0.26.0 "numpy<2.4"
	$(GPUHOST_PY) -m pip install -q pytest pytest-timeout tqdm "pybind11>=2.11" "setuptools>=68" wheel
	$(GPUHOST_PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

test-gpu-host-versions: $(GPUHOST_VENV)/.installed
	mkdir -p runs/gpu-host-versions
	$(GPUHOST_PY) -c "import sys, torch, triton, numpy; print('gpu-host versions:', sys.version.split()[0], torch.__version__, triton.__version__, numpy.__version__)"
	TRITON_INTERPRET=1 $(GPUHOST_PY) -m pytest $(GPUHOST_TESTS) -q -p no:cacheprovider -rfEs \
		--junitxml=runs/gpu-host-versions/junit.xml

# --- Numerics on other CPUs: the numerics tests under every OPENBLAS_CORETYPE x ATEN_CPU_CAPABILITY x
# OMP_NUM_THREADS cell (numpy's OpenBLAS kernels = the interpreter's tl.dot; ATen's vector ISA = the torch
# reference and the C++ path's torch glue). Long (24 cells): CELLS="Haswell:avx2:1 ..." runs a subset. One line per
# cell in runs/cpu-matrix/summary.txt, a junit file per cell.
MATRIX_TESTS ?= tests/test_loss_precision.py tests/test_loss_parity.py tests/test_loss_backends.py \
	tests/test_triton_kernels.py tests/test_train.py::test_grad_cache_equals_no_cache
CELLS ?= $(foreach c,Haswell SkylakeX Zen Prescott,$(foreach a,default avx2 avx512,$(foreach t,1 2,$(c):$(a):$(t))))

test-cpu-matrix: install
	mkdir -p runs/cpu-matrix
	: > runs/cpu-matrix/summary.txt
	@fail=0; tests="$$(for t in $(MATRIX_TESTS); do [ -e $${t%%::*} ] && echo $$t; done)"; \
	for cell in $(CELLS); do \
		c=$${cell%%:*}; rest=$${cell#*:}; a=$${rest%%:*}; t=$${rest#*:}; \
		log=runs/cpu-matrix/$$c-$$a-$$t; \
		OPENBLAS_CORETYPE=$$c ATEN_CPU_CAPABILITY=$$a OMP_NUM_THREADS=$$t \
			$(PY) -m pytest $$tests -q -p no:cacheprovider -x -m "not slow" --junitxml=$$log.xml > $$log.log 2>&1; \
		rc=$$?; line="$$c ATEN_CPU_CAPABILITY=$$a OMP_NUM_THREADS=$$t: $$(tail -n 1 $$log.log)"; \
		echo "$$line" | tee -a runs/cpu-matrix/summary.txt; [ $$rc = 0 ] || fail=1; \
	done; exit $$fail

# --- Packages for an offline GPU host (Python 3.12, torch, triton, no package index): wheels + an unpacked site tree
# + DALI in parts, checked to install with the index off (docs/gpu-host.md). BUNDLE_GROUPS=base,deepspeed,test,project
# leaves out DALI (~190 MB).
BUNDLE_DIR ?= .devpack/bundle
BUNDLE_GROUPS ?= base,deepspeed,test,project,dali
BUNDLE_XZ_PRESET ?= 6

offline-bundle: $(VENV)/.installed
	$(PY) tools/pack_offline_host.py --out $(BUNDLE_DIR) --groups $(BUNDLE_GROUPS) --python $(PY) \
		--xz-preset $(BUNDLE_XZ_PRESET)
