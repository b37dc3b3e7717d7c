# Fresh machine: `make train` installs everything into .venv and runs the main job; `make test` installs and tests.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export DS_BUILD_OPS := 0

.PHONY: install build train test bench clean

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
