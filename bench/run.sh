#!/usr/bin/env bash
# The benchmark of issue #20 (about 3 minutes): the deployed shape and its baselines, one table,
# bench/results/<date>-bench-<commit>.json. See docs/benchmarks.md; options: bench/run.sh --help
# (--only deployed,pg,... runs a subset). Needs the venv (make), wrk (apt-get install -y wrk),
# Redis and PostgreSQL at the URLs given (defaults: redis://127.0.0.1:6379/0 and
# postgresql://postgres@127.0.0.1:5432); it works under its own key prefix and database.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m bench.run "$@"
