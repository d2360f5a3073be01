# Quick start: `make run` serves on :8001, `make test` runs the suite.
# With REDIS_URL / DB_DSN unset, both start embedded Redis and PostgreSQL themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-unit smoke lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/quota-gateway serve --migrate --with-reconciler --port $${PORT:-8001}

test: $(STAMP)
	$(BIN)/pytest

test-unit: $(STAMP)
	$(BIN)/pytest tests/unit

smoke: $(STAMP)
	$(BIN)/pytest -m smoke

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	bash bench/run.sh

clean:
	rm -rf $(VENV) .data .pytest_cache .mypy_cache .ruff_cache
