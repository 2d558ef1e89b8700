# Two commands on a fresh machine: `make setup`, then `make test`. `make demo` runs the pipeline on generated data.
PYTHON ?= python3
VENV ?= .venv
# Installed before the project so that its `torch>=2.4` requirement is already met (and no CUDA build is pulled).
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
ST := $(BIN)/st
DEMO ?= demo

.PHONY: setup test demo bench clean-demo

setup:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"

test:
	$(BIN)/python -m pytest -q

# The demo's stages are Make targets keyed by their manifests; each stage also skips itself when up to date.
$(DEMO)/data/config.json:
	$(ST) sample-data $(DEMO)/data

demo: $(DEMO)/data/config.json
	$(ST) prepare --config $(DEMO)/data/config.json --output $(DEMO)/prepare

bench:
	$(BIN)/python bench/prepare.py

clean-demo:
	rm -rf $(DEMO)
