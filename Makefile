# goalstream: `make run` starts a local stack with a demo, `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv run test test-e2e lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,embedded,dev]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/goalstream dev --demo-events 10000

test: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

test-e2e: $(STAMP)
	$(BIN)/pytest -m e2e $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check goalstream tests
	$(BIN)/ruff format --check goalstream tests
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/goalstream bench --json bench-results.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
