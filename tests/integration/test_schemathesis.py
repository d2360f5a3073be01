"""Schemathesis against the real service: every operation of /openapi.json, every check.

The service runs as `quota-gateway serve` in a process of its own (on the test's Redis,
under its own key prefix, and on a database of its own, since plan PUTs change the
catalog), so what is tested is what is deployed: uvicorn's HTTP parsing, the route table,
the handlers, the scripts. Schemathesis loads the spec the process serves and, per
operation, runs its examples, coverage and fuzzing phases with a fixed seed and
derandomized Hypothesis: the same cases every run.

Each case is checked by every check schemathesis has: no 5xx, answers (statuses, content
types, headers, bodies) as the spec declares them, requests the spec calls invalid
refused, the ones it calls valid accepted (2xx, or 401/403/404/409 for a state they meet),
405 with Allow for undeclared methods, and 401 without the key. Two adjustments keep
"valid" meaning what the spec can say:

* A valid request's idempotency keys (``ref``, ``order_id``) and a credit's user are made
  fresh per case: the same key with another request is 422 ``ref_reused`` /
  ``order_reused`` by contract (README), and a user's credits are capped (422
  ``balance_limit``): state of earlier cases, not the request's shape.
* A plan PUT's body ``plan_code``, when sent, is set to the path's: the spec says it must
  equal the path's, which JSON Schema cannot state.

The payment webhook runs without ``positive_data_acceptance``: a valid notification needs
a signature over its body by the provider's key, which no generated case has (the service
has no key configured here), so every one is refused 401 by design; all the other checks
apply to it.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from ops.devservers import free_port
from tests.conftest import Servers
from tests.support import KEY

#: Fuzzing examples per operation (the examples and coverage phases add their own cases).
MAX_EXAMPLES = 50
SEED = 20261205
#: A generated value is cut to this length before a fresh prefix goes on (refs, ids).
MAX_KEY = 128
#: The idempotency keys of a body, wherever they are (a batch's items too), and the
#: fields of a credit made fresh with them.
KEYS = frozenset({"ref", "order_id"})
CREDIT_KEYS = KEYS | {"user_id"}

cases_run: Counter[str] = Counter()
serial = itertools.count(1)


def _wait_ready(url: str, process: subprocess.Popen[bytes], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    last = ""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            said = process.stdout.read().decode(errors="replace") if process.stdout else ""
            raise AssertionError(f"the service exited during start-up:\n{said[-4000:]}")
        try:
            ready = httpx.get(f"{url}/ready", timeout=2)
            if ready.status_code == 200:
                return
            last = ready.text
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise AssertionError(f"not ready in {seconds}s: {last}")


@pytest.fixture
def service(servers: Servers, own_db_dsn: str, prefix: str, raw_redis: Any) -> Iterator[str]:
    """`quota-gateway serve` on a free port, on the test's servers and prefix (raw_redis
    deletes the prefix's keys afterwards); its base URL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PORT"}
    env.update(REDIS_URL=servers.redis_url, DB_DSN=own_db_dsn, KEY_PREFIX=prefix, ENV="test",
               N_SHARDS="16", SERVICE_TOKEN=KEY)
    process = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "serve", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process, 60)
        yield url
    finally:
        process.terminate()
        process.communicate(timeout=30)


@pytest.fixture
def api_schema(service: str) -> Iterator[schemathesis.BaseSchema]:
    """The spec the process serves, with the key, the seed, and the example budget; after
    the run, every operation must have run cases."""
    cases_run.clear()
    config = schemathesis.Config.from_dict({
        "seed": SEED,
        "headers": {"X-Internal-Key": KEY},
        "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True,
                       "database": "none"},
        "checks": {"enabled": True},
    })
    schema = schemathesis.openapi.from_url(f"{service}/openapi.json", config=config)
    yield schema
    operations = {result.ok().label for result in schema.get_all_operations()}
    assert set(cases_run) == operations, sorted(operations - set(cases_run))
    print(f"\nschemathesis: {sum(cases_run.values())} cases over {len(cases_run)} "
          f"operations: {dict(sorted(cases_run.items()))}")


def _fresh(value: Any, tag: str) -> Any:
    """``value`` (a string the spec admits) behind a prefix no other case has."""
    if not isinstance(value, str):
        return value
    head = f"{tag}{next(serial)}-"
    return head + value[:MAX_KEY - len(head)]


def _freshen(node: Any, keys: frozenset[str]) -> None:
    """Every ``keys`` field within a body made fresh, in place."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in keys:
                node[key] = _fresh(value, "k")
            else:
                _freshen(value, keys)
    elif isinstance(node, list):
        for item in node:
            _freshen(item, keys)


def _as_valid_as_the_spec_says(case: schemathesis.Case) -> None:
    """The adjustments of the module's docstring, on a case generated valid."""
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return
    name = case.operation.definition.raw.get("operationId")
    _freshen(case.body, CREDIT_KEYS if name == "quota_credit" else KEYS)
    if name == "plan_put" and isinstance(case.body, dict) \
            and case.body.get("plan_code") is not None:
        case.body["plan_code"] = case.path_parameters["plan_code"]


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    """schemathesis' from_fixture renames the running node per operation through
    ``Node._nodeid``, which pytest 9 no longer has: give it one (only its report reads it)."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_every_operation_passes_every_check(case: schemathesis.Case) -> None:
    """Every generated case: no server error, answers as declared, invalid requests
    refused and valid ones accepted (the webhook aside: see the module's docstring)."""
    _as_valid_as_the_spec_says(case)
    cases_run[case.operation.label] += 1
    webhook = case.operation.definition.raw.get("operationId") == "payment_webhook"
    case.call_and_validate(excluded_checks=[positive_data_acceptance] if webhook else None)
