"""The deployment's configuration (docker-compose.yml, deploy/): it validates, its alert rules
load and fire as meant, and every metric its dashboard and rules name is one the service or
the reconciler exports, with labels it has.

``docker-compose`` and ``promtool`` (Debian's docker-compose and prometheus packages, which
.ci/run installs) check the files as the tools will read them; without them those checks
skip, and the structural checks here still run.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from core import metrics

ROOT = Path(__file__).parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "quota-gateway.json"
DATASOURCE = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
OPERATIONS = ROOT / "docs" / "operations.md"
#: Series Prometheus makes itself, per target.
PROMETHEUS_SERIES = {"up": frozenset({"job", "instance"})}
#: Labels every scraped series carries besides its own.
TARGET_LABELS = frozenset({"job", "instance"})
#: The commands of the one image (Dockerfile) in docker-compose.yml.
QUOTA_SERVICES = {"migrate": "migrate", "billing-service": "serve", "reconciler": "reconcile"}


def exported() -> dict[str, frozenset[str]]:
    """Every series name the service and the reconciler export (core/metrics.py), with
    the labels each has: counters as ``_total``, histograms as ``_bucket``/``_count``/
    ``_sum``, and the ``_created`` timestamps of both."""
    series: dict[str, frozenset[str]] = dict(PROMETHEUS_SERIES)
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        labels = frozenset(value._labelnames) | TARGET_LABELS
        for family in value.describe():
            kind, name = family.type, family.name
            suffixes = {"counter": ("_total", "_created"), "gauge": ("",),
                        "histogram": ("_count", "_sum", "_created")}[kind]
            for suffix in suffixes:
                series[name + suffix] = labels
            if kind == "histogram":
                series[name + "_bucket"] = labels | {"le"}
    return series


def selectors(expr: str) -> Iterator[tuple[str, set[str]]]:
    """The metric name and matcher label names of every selector of a PromQL expression
    (Grafana's ``$__rate_interval``, ``$__range`` and ``$variables`` stand in as values)."""
    expr = re.sub(r"\$__(rate_interval|interval|range)", "5m", expr)
    expr = re.sub(r"\$(\w+)", r"\1", expr)
    found: list[tuple[str, set[str]]] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            labels = {m.name for m in node.matchers.matchers}
            name = node.name or next((m.value for m in node.matchers.matchers
                                      if m.name == "__name__"), None)
            assert name, f"a selector without a metric name in {expr!r}"
            found.append((name, labels - {"__name__"}))

    promql_parser.walk(promql_parser.parse(expr), visit)
    yield from found


def unknown_names(exprs: dict[str, str]) -> list[str]:
    """Problems of a set of named expressions: metrics not exported, labels they lack."""
    known = exported()
    problems = []
    for where, expr in exprs.items():
        for name, labels in selectors(expr):
            if name not in known:
                problems.append(f"{where}: {name} is not exported")
            elif labels - known[name]:
                problems.append(f"{where}: {name} has no label {sorted(labels - known[name])}")
    return problems


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"]
            for rule in group["rules"]]


def dashboard_exprs() -> dict[str, str]:
    """Every query of the dashboard: panel targets and template variables."""
    board = json.loads(DASHBOARD.read_text())
    exprs = {}
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            exprs[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for var in board["templating"]["list"]:
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        found = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert found, f"variable {var['name']}: {query!r}"
        exprs[f"variable {var['name']}"] = f"{found[1]}"
    return exprs


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


# -- the metrics named -----------------------------------------------------------------------

def test_every_metric_the_rules_and_dashboard_name_is_exported() -> None:
    """Each selector of the alert rules and of the dashboard (targets and variables) names
    a series core/metrics.py exports (or Prometheus's own ``up``), matching only labels
    that series has: a renamed metric or a misspelt label fails here, not in production."""
    exprs = {f"alert {rule['alert']}": rule["expr"] for rule in alert_rules()}
    exprs |= dashboard_exprs()
    assert len(exprs) > 40
    assert unknown_names(exprs) == []


def test_the_metric_check_finds_a_name_that_is_not_exported() -> None:
    """The check above is not vacuous: a counter without ``_total``, a histogram's base
    name, a misspelt metric, a label a metric lacks, and a ``__name__`` matcher fail."""
    bad = {
        "no suffix": "rate(quota_debits[5m])",
        "histogram base": "quota_http_request_duration_seconds > 1",
        "misspelt": 'sum(rate(quota_debit_total{result="ok"}[5m]))',
        "wrong label": 'sum(rate(quota_debits_total{status="ok"}[5m]))',
        "name matcher": '{__name__="quota_nonexistent"}',
    }
    problems = unknown_names(bad)
    assert len(problems) == len(bad), problems
    assert unknown_names({"fine": 'histogram_quantile(0.99, sum by (le) (rate('
                                  'quota_http_request_duration_seconds_bucket{route="debit",'
                                  'job="quota-gateway"}[$__rate_interval])))'}) == []


def test_holds_and_the_issue_s_panels_are_on_the_dashboard() -> None:
    """The dashboard shows what issue #19 asks for: debits by result, latency
    percentiles, flush lag and backlog, cold loads, holds, webhook outcomes, dead letters,
    dependency errors; all against the provisioned datasource, on a 24-column grid."""
    board = json.loads(DASHBOARD.read_text())
    text = json.dumps(dashboard_exprs())
    for metric in ("quota_debits_total", "quota_http_request_duration_seconds_bucket",
                   "quota_ledger_oldest_seconds", "quota_ledger_backlog_entries",
                   "quota_user_loads_total", "quota_holds_total", "quota_open_holds",
                   "quota_webhooks_total", "quota_dead_letters_total",
                   "quota_dependency_errors_total", "quota_flushed_events_total"):
        assert metric in text, metric
    assert "sum by (result) (rate(quota_debits_total" in text
    assert {"0.5", "0.99"} <= set(re.findall(r"histogram_quantile\(([\d.]+)", text))
    uid = yaml.safe_load(DATASOURCE.read_text())["datasources"][0]["uid"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == uid, panel["title"]
            assert all(t["datasource"]["uid"] == uid for t in panel["targets"])


# -- Prometheus ------------------------------------------------------------------------------

def test_every_alert_has_a_severity_and_a_runbook_section() -> None:
    """Each alert carries a severity and a runbook link to its own section of
    docs/operations.md (a heading named after the alert), and promtool's unit tests make
    most of them fire."""
    headings = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.+)$", OPERATIONS.read_text(), re.M)}
    tested = set(re.findall(r"alertname: (\w+)", ALERT_TESTS.read_text()))
    rules = alert_rules()
    assert len({r["alert"] for r in rules}) == len(rules)
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        page, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert page == "docs/operations.md" and anchor == rule["alert"].lower()
        assert anchor in headings, f"no section {rule['alert']} in docs/operations.md"
    assert len(tested) >= 12, tested


def test_prometheus_scrapes_the_service_and_each_reconciler_where_compose_serves_them(
) -> None:
    """prometheus.yml's jobs reach the compose services on the ports they serve: the
    service's PORT and the reconcilers' METRICS_PORT; it loads the alert rules."""
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    services = compose()["services"]
    assert config["rule_files"] == ["alerts.yml"]
    sd = jobs["quota-gateway"]["dns_sd_configs"][0]
    assert sd["names"] == ["billing-service"] and sd["port"] == 8001
    assert services["billing-service"]["ports"][0].endswith(":8001")
    sd = jobs["quota-reconciler"]["dns_sd_configs"][0]
    assert sd["names"] == ["reconciler"]
    assert str(sd["port"]) == services["reconciler"]["environment"]["METRICS_PORT"]


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (Debian package prometheus; .ci/run installs it)")
    return found


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def test_promtool_checks_the_config_and_the_rules(promtool: str) -> None:
    """``promtool check config`` (which loads the rule files too) and ``check rules``."""
    for argv in (["check", "config", str(PROMETHEUS)], ["check", "rules", str(ALERTS)]):
        done = run(promtool, *argv)
        assert done.returncode == 0, done.stdout + done.stderr


def test_the_alerts_fire_on_trouble_and_stay_quiet_when_healthy(promtool: str) -> None:
    """``promtool test rules``: alerts_test.yml's series make each alert fire (service or
    reconcilers gone, nothing flushed while entries wait, lag, backlog, refusals, 5xx,
    dependency errors, dead letters, forged posts, expiring holds) with its annotations,
    and a healthy flush raises none."""
    done = run(promtool, "test", "rules", str(ALERT_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr


# -- docker-compose.yml ----------------------------------------------------------------------

def test_compose_file_is_structurally_complete() -> None:
    """Without Docker: every service the deployment needs is there, the quota services
    run the one image with the command of their role, every dependency, named volume and
    mounted file exists, and the Redis Cluster has six nodes (3 primaries + 3 replicas)
    with the fixed addresses redis-cluster-init joins, outside the dynamic range."""
    data = compose()
    services = data["services"]
    need = {"redis-cluster-init", "postgres", "prometheus", "grafana", *QUOTA_SERVICES}
    assert need <= set(services)
    images = {services[name]["image"] for name in QUOTA_SERVICES}
    assert len(images) == 1
    for name, command in QUOTA_SERVICES.items():
        assert services[name]["command"][:2] == ["quota-gateway", command]
        assert services[name]["build"] == "."
    assert "--workers" in services["billing-service"]["command"]
    for name, service in services.items():
        for dep in service.get("depends_on", {}):
            assert dep in services, (name, dep)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), (name, source)
            else:
                assert source in data["volumes"], (name, source)
    nodes = {n: s for n, s in services.items() if re.fullmatch(r"redis-\d", n)}
    assert len(nodes) == 6
    addresses = {s["networks"]["default"]["ipv4_address"] for s in nodes.values()}
    init = services["redis-cluster-init"]["command"]
    assert {a.split(":")[0] for a in init if re.match(r"\d+\.", a)} == addresses
    for node in nodes.values():
        command = node["command"]
        assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
        assert command[command.index("--cluster-enabled") + 1] == "yes"
    ipam = data["networks"]["default"]["ipam"]["config"][0]
    assert ipam["ip_range"].startswith("172.28.0.128/")
    assert all(int(a.rsplit(".", 1)[1]) < 128 for a in addresses)
    env = services["billing-service"]["environment"]
    assert env["REDIS_URL"].startswith("${REDIS_URL:-redis+cluster://")
    assert "postgresql://" in env["DB_DSN"] and "pg-data" in services["postgres"]["volumes"][0]


def test_docker_compose_validates_the_file() -> None:
    """``docker-compose config -q`` (Debian's docker-compose; no Docker engine needed)."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (Debian package docker-compose; "
                    ".ci/run installs it)")
    done = subprocess.run([binary, "-f", str(COMPOSE), "config", "-q"], capture_output=True,
                          text=True, timeout=120, check=False, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
