#!/usr/bin/env bash
# One benchmark run (about 11 minutes): see docs/benchmarks.md. Options: bench/run.py --help.
# Needs: the venv (.venv/bin/pip install -e '.[dev]'), wrk and redis-benchmark
# (apt-get install -y wrk redis-tools), Redis and PostgreSQL at the URLs given (defaults:
# redis://127.0.0.1:6379/0 and postgresql://postgres@127.0.0.1:5432).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m bench.run "$@"
