# One entry point for a fresh clone: `make run` serves the example model, `make test` runs every check.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint soak bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/calibserve serve

lint: $(STAMP)
	$(BIN)/ruff check service tests bench scripts
	$(BIN)/ruff format --check service tests bench scripts

test: lint
	$(BIN)/python -m pytest -q -m "not slow"

soak: $(STAMP)
	CALIBSERVE_SOAK=1 $(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python bench/bench_core.py --threads 1 --write

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
