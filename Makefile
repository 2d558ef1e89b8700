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

# The demo: a tiny random-weight SD 1.x model and a generated dataset, then each stage in turn. Every stage skips
# itself when its output is up to date, so a second `make demo` only reports.
DEMO_FAMILY ?= sd1x

$(DEMO)/model/model_index.json:
	$(ST) tiny-model $(DEMO_FAMILY) $(DEMO)/model

$(DEMO)/data/config.json: | $(DEMO)/model/model_index.json
	$(ST) sample-data $(DEMO)/data --family $(DEMO_FAMILY) --model $(DEMO)/model

demo: $(DEMO)/data/config.json
	$(ST) prepare --config $(DEMO)/data/config.json --output $(DEMO)/prepare
	$(ST) cache --config $(DEMO)/data/config.json --input $(DEMO)/prepare --output $(DEMO)/cache
	$(ST) train --config $(DEMO)/data/config.json --input $(DEMO)/cache --output $(DEMO)/train
	$(ST) publish --config $(DEMO)/data/config.json --input $(DEMO)/train --output $(DEMO)/publish \
		--set lora_format=\"comfyui\"

bench:
	$(BIN)/python bench/prepare.py

clean-demo:
	rm -rf $(DEMO)
