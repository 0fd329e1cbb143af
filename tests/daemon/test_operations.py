"""The operator's kit (docs/operations/) against the real daemon: every metric and label
that the Grafana dashboard and the Prometheus alert rules use is one the daemon exports,
and (where promtool is installed) the rules are valid and fire as their unit tests say.

The daemon is the real ``ftimer-server run --metrics-address``: a worker hangs and is
reaped with an incident, a junk line and a refused arm are written, and the scrape is
read once every labelled family has samples (a family without samples shows no labels).
The queries are read with a small PromQL reader that knows selectors, matchers, grouping
clauses and function calls: enough for these files, which a test keeps that way.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import urllib.request
from typing import Callable, Dict, Iterator, List, NamedTuple, Set, Tuple

import pytest
from tests.conftest import wait_until

from ftimer_protocol import Arm, encode

from .conftest import PATIENCE, DaemonProcess, Worker

ROOT = pathlib.Path(__file__).resolve().parents[2]
OPERATIONS = ROOT / "docs" / "operations"
DASHBOARD = OPERATIONS / "ftimer-dashboard.json"
RULES = OPERATIONS / "ftimer-alerts.yml"
RULE_TESTS = OPERATIONS / "ftimer-alerts.test.yml"

#: Labels Prometheus adds to every series it scrapes (the target's), not the daemon.
TARGET_LABELS = {"job", "instance"}
#: Series Prometheus makes itself for every target.
PROMETHEUS_SERIES = {"up"}
#: Values Grafana substitutes, for promtool (it parses the queries as rules).
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "6h",
    "$__range_s": "21600",
    "$__interval_ms": "60000",
    "$job": "ftimer",
    "$instance": ".*",
}

# The PromQL reader.
SELECTOR = re.compile(r"(?P<metric>[A-Za-z_:][\w:]*)?\s*\{(?P<matchers>[^{}]*)\}")
MATCHER = re.compile(r'(?P<label>\w+)\s*(?P<op>=~|!~|!=|=)\s*"(?P<value>(?:[^"\\]|\\.)*)"')
GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\((?P<labels>[^()]*)\)"
)
RANGE = re.compile(r"\[[^\]]*\]")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
NAME = re.compile(r"(?<![\w.$])[A-Za-z_:][\w:]*(?![\w(])(?!\s*\()")
KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "group_left", "group_right"}
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")
TEMPLATE_LABEL = re.compile(r"\$labels\.(\w+)")


class Matcher(NamedTuple):
    metric: str
    label: str
    op: str
    value: str


class Query(NamedTuple):
    """One PromQL expression of the kit, and the labels its presentation uses."""

    where: str
    expr: str
    shown_labels: Set[str]


class Parsed(NamedTuple):
    metrics: Set[str]
    matchers: List[Matcher]
    grouping: Set[str]


def parse(expr: str) -> Parsed:
    """The metric names, label matchers and grouping labels of a PromQL expression."""
    matchers: List[Matcher] = []

    def selector(m: re.Match[str]) -> str:
        metric = m["metric"] or ""
        body = m["matchers"]
        found = list(MATCHER.finditer(body))
        rest = MATCHER.sub("", body).replace(",", "").strip()
        assert not rest, f"a matcher this reader does not know in {m[0]!r}"
        matchers.extend(Matcher(metric, x["label"], x["op"], x["value"]) for x in found)
        return f" {metric} "

    text = SELECTOR.sub(selector, expr)
    grouping: Set[str] = set()
    for m in GROUPING.finditer(text):
        grouping |= {label.strip() for label in m["labels"].split(",") if label.strip()}
    text = GROUPING.sub(" ", text)
    text = STRING.sub(" ", RANGE.sub(" ", text))
    names = {n for n in NAME.findall(text) if n.lower() not in KEYWORDS}
    metrics = {n for n in names if not re.fullmatch(r"\d.*", n)}
    return Parsed(metrics, matchers, grouping)


def rules() -> List[Dict[str, str]]:
    """Each alert rule of RULES: its name, expression and annotations' text.

    Read line by line, as the file is written: ``- alert:``, then ``expr:`` on one line or
    as a block (``|`` or ``>-``) of deeper lines, then labels and annotations.
    """
    found: List[Dict[str, str]] = []
    lines = RULES.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if m := re.match(r"^(\s*)- alert: (\w+)$", line):
            found.append({"alert": m[2], "expr": "", "text": ""})
        elif found and (m := re.match(r"^(\s*)expr: ?(.*)$", line)):
            indent, value = len(m[1]), m[2].strip()
            if value in ("|", ">-", ">", "|-"):
                block = []
                while i + 1 < len(lines) and (
                    not lines[i + 1].strip()
                    or len(lines[i + 1]) - len(lines[i + 1].lstrip()) > indent
                ):
                    i += 1
                    block.append(lines[i].strip())
                value = " ".join(block)
            found[-1]["expr"] = value
        elif found:
            found[-1]["text"] += line + "\n"
        i += 1
    return found


def dashboard() -> Dict[str, object]:
    doc: Dict[str, object] = json.loads(DASHBOARD.read_text())
    return doc


def dashboard_queries() -> List[Query]:
    """Every query of the dashboard: its panels', its annotations' and its variables'."""
    doc = dashboard()
    found = []
    for panel in doc["panels"]:  # type: ignore[attr-defined]
        for target in panel.get("targets", []):
            legend = set(LEGEND_LABEL.findall(target.get("legendFormat", "")))
            found.append(Query(f"panel {panel['title']!r}", target["expr"], legend))
    for note in doc["annotations"]["list"]:  # type: ignore[index]
        if "expr" in note:
            shown = set(LEGEND_LABEL.findall(note.get("titleFormat", "")))
            found.append(Query(f"annotation {note['name']!r}", note["expr"], shown))
    for variable in doc["templating"]["list"]:  # type: ignore[index]
        if variable["type"] != "query":
            continue
        m = re.fullmatch(
            r"label_values\((?:(?P<sel>.+),\s*)?(?P<label>\w+)\)", variable["definition"]
        )
        assert m, f"variable {variable['name']}: a query this test cannot read"
        assert m["sel"], f"variable {variable['name']}: a label_values() of no metric"
        found.append(Query(f"variable {variable['name']!r}", m["sel"], {m["label"]}))
    return found


def rule_queries() -> List[Query]:
    return [
        Query(f"alert {r['alert']}", r["expr"], set(TEMPLATE_LABEL.findall(r["text"])))
        for r in rules()
    ]


# --- the daemon's real exposition ----------------------------------------------------


def scrape(url: str) -> Dict[str, Dict[str, Set[str]]]:
    """sample name -> label -> values seen, from the daemon's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=PATIENCE) as r:
        body = r.read().decode()
    samples: Dict[str, Dict[str, Set[str]]] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            labels = samples.setdefault(sample.name, {})
            for key, value in sample.labels.items():
                labels.setdefault(key, set()).add(value)
    return samples


#: Families whose labels only show once they have samples, and so must have some first.
LABELLED = (
    "ftimer_requests_total",
    "ftimer_refusals_total",
    "ftimer_received_total",
    "ftimer_decode_errors_total",
    "ftimer_reaps_total",
    "ftimer_incidents_total",
    "ftimer_capture_seconds_bucket",
)


@pytest.fixture
def exported(
    spawn: Callable[..., DaemonProcess],
    worker: Callable[..., Worker],
    short_dir: pathlib.Path,
) -> Iterator[Dict[str, Dict[str, Set[str]]]]:
    """What a daemon that reaped a worker (with an incident), read a junk line and refused
    an arm exports: sample name -> label -> values."""
    pytest.importorskip("prometheus_client")
    d = spawn(
        "--metrics-address",
        "127.0.0.1:0",
        "--state-file",
        str(short_dir / "state.json"),
        "--allow-signal",
        "SIGKILL",
    ).ready()
    url = d.wait_for_record(where=lambda r: r["msg"].startswith("metrics on"))["msg"].split()[-1]
    stuck = worker(d.fifo, "stuck", 0.2, 60)
    assert stuck.wait() == -signal.SIGKILL
    # SIGTERM while only SIGKILL is allowed: refused before any process is looked at. For
    # the test's own child, whatever the checks do.
    bystander = subprocess.Popen(["sleep", "600"])
    fd = os.open(d.fifo, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, b"not a message\n")
        os.write(fd, encode(Arm(pid=bystander.pid, scope_id="refused", deadline=1, signal=15)))
    finally:
        os.close(fd)

    def complete() -> Dict[str, Dict[str, Set[str]]]:
        samples = scrape(url)
        return samples if all(samples.get(name) for name in LABELLED) else {}

    try:
        yield wait_until(complete, what=f"samples of {LABELLED} on {url}")
        assert d.stop() == 0
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def allowed_labels(parsed: Parsed, exported: Dict[str, Dict[str, Set[str]]]) -> Set[str]:
    labels = set(TARGET_LABELS)
    for metric in parsed.metrics:
        labels |= set(exported.get(metric, {}))
    return labels


def test_every_metric_and_label_of_the_dashboard_and_the_alerts_is_exported(
    exported: Dict[str, Dict[str, Set[str]]],
) -> None:
    queries = dashboard_queries() + rule_queries()
    problems = []
    for q in queries:
        parsed = parse(q.expr)
        if not parsed.metrics:
            problems.append(f"{q.where}: names no metric: {q.expr}")
        for metric in sorted(parsed.metrics - PROMETHEUS_SERIES):
            if metric not in exported:
                problems.append(f"{q.where}: {metric} is not exported")
        allowed = allowed_labels(parsed, exported)
        for label in sorted((parsed.grouping | q.shown_labels) - allowed):
            problems.append(f"{q.where}: label {label!r} is on none of {sorted(parsed.metrics)}")
        for m in parsed.matchers:
            if m.metric in PROMETHEUS_SERIES or m.label in TARGET_LABELS:
                continue
            labels = exported.get(m.metric or next(iter(parsed.metrics)), {})
            if m.label not in labels:
                problems.append(f"{q.where}: {m.metric} has no label {m.label!r}")
            elif m.op == "=" and m.value not in labels[m.label]:
                problems.append(
                    f"{q.where}: {m.metric} never has {m.label}={m.value!r} "
                    f"(exported: {sorted(labels[m.label])})"
                )
    assert not problems, "\n".join(problems)


def test_the_reader_sees_what_a_query_names() -> None:
    # The checks above are only as good as this reader: it must not lose a metric or a
    # label, nor take a label or a function for a metric.
    parsed = parse(
        "histogram_quantile(0.9, sum by (method, le) (rate(ftimer_capture_seconds_bucket"
        '{job=~"$job", instance=~"$instance"}[$__rate_interval])))'
        ' / on (instance) group_left ftimer_workers > 1 / 60 unless absent(up{job="x"})'
    )
    assert parsed.metrics == {"ftimer_capture_seconds_bucket", "ftimer_workers", "up"}
    assert parsed.grouping == {"method", "le", "instance"}
    assert Matcher("ftimer_capture_seconds_bucket", "job", "=~", "$job") in parsed.matchers
    assert Matcher("up", "job", "=", "x") in parsed.matchers
    with pytest.raises(AssertionError, match="does not know"):
        parse('ftimer_workers{job=~"a" or}')


def test_the_kit_covers_what_an_operator_watches() -> None:
    used = set()
    for q in dashboard_queries():
        used |= parse(q.expr).metrics
    for metric in (
        "up",
        "ftimer_armed_timers",
        "ftimer_requests_total",
        "ftimer_reaps_total",
        "ftimer_escalations_total",
        "ftimer_refusals_total",
        "ftimer_decode_errors_total",
        "ftimer_reap_latency_seconds_bucket",
    ):
        assert metric in used, f"the dashboard shows no {metric}"
    alerts = {r["alert"]: r for r in rules()}
    assert set(alerts) >= {
        "FtimerDaemonDown",
        "FtimerWorkerReaped",
        "FtimerRefusalsClimbing",
        "FtimerDecodeErrorsClimbing",
        "FtimerReapsLate",
        "FtimerLoopStalled",
    }
    text = RULES.read_text()
    assert len(alerts) == text.count("- alert:") == text.count(" expr:")
    for name, rule in alerts.items():
        assert rule["expr"], f"{name}: no expression read"
        assert re.search(r"severity: (critical|warning|info)\n", rule["text"]), name
        assert "summary:" in rule["text"], name
        assert "description:" in rule["text"], name


def test_the_dashboard_is_a_grafana_dashboard_laid_out_on_its_grid() -> None:
    doc = dashboard()
    panels = doc["panels"]
    assert isinstance(panels, list)
    assert panels
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: Dict[Tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0, f"{p['title']} is left of the grid"
        assert g["x"] + g["w"] <= 24, f"{p['title']} is wider than the grid"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]
        if p["type"] == "row":
            continue
        assert p["type"] in {"stat", "timeseries", "heatmap"}, p["type"]
        assert p.get("description"), f"{p['title']} says nothing of what it shows"
        assert p["targets"], f"{p['title']} has no query"
        for t in p["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    variables = {v["name"] for v in doc["templating"]["list"]}  # type: ignore[index]
    assert variables == {"datasource", "job", "instance"}
    for q in dashboard_queries():
        for name in re.findall(r"\$(\w+)", q.expr):
            assert name in variables or f"${name}" in GRAFANA_VARIABLES, f"{q.where}: ${name}"


# --- promtool ------------------------------------------------------------------------


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(
            "promtool is not installed, so the rules are not checked by Prometheus itself "
            "(Debian: apt-get install prometheus; it is not on PyPI)"
        )
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=OPERATIONS)


def test_promtool_checks_the_rules() -> None:
    result = run(promtool(), "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    result = run(promtool(), "test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    # every alert has a unit test
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == {r["alert"] for r in rules()}


def test_promtool_parses_every_dashboard_query(tmp_path: pathlib.Path) -> None:
    # promtool has no command that parses a bare query, but it parses a rule's: each
    # query becomes a recording rule, with Grafana's variables given values.
    exe = promtool()
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, q in enumerate(dashboard_queries()):
        expr = q.expr
        for variable in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
            expr = expr.replace(variable, GRAFANA_VARIABLES[variable])
        lines += [f"      - record: dashboard:query_{i}", f"        expr: {json.dumps(expr)}"]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text("\n".join(lines) + "\n")
    result = run(exe, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dashboard_counts_the_reaps_a_restart_hides(tmp_path: pathlib.Path) -> None:
    # A daemon up for hours restarts and reaps (an overdue restored timer) before its first
    # scrape, which shows the count it had before: increase() sees no reset and no reap.
    # The "Reaps in range" stat and the "Reaps" annotation count it from the start time.
    exe = promtool()
    queries = {q.where: q.expr for q in dashboard_queries()}

    def query(where: str) -> str:
        expr = queries[where]
        for variable in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
            expr = expr.replace(variable, GRAFANA_VARIABLES[variable])
        return expr

    host = 'job="ftimer", instance="host-a:9464"'
    restart = 399 * 60 + 35  # more than $__range (6h) after the first start, at 0
    test = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": f"process_start_time_seconds{{{host}}}",
                        "values": f"0x399 {restart}x20",
                    },
                    {"series": f"ftimer_reap_latency_seconds_count{{{host}}}", "values": "1x420"},
                ],
                "promql_expr_test": [
                    # Up for 6h 30m with no reap in the range: none counted, none marked.
                    {
                        "expr": query("panel 'Reaps in range'"),
                        "eval_time": "390m",
                        "exp_samples": [{"labels": "{}", "value": 0}],
                    },
                    {"expr": query("annotation 'Reaps'"), "eval_time": "390m", "exp_samples": []},
                    # 85 s after the restart: its reap is counted and marked.
                    {
                        "expr": query("panel 'Reaps in range'"),
                        "eval_time": "401m",
                        "exp_samples": [{"labels": "{}", "value": 1}],
                    },
                    {
                        "expr": query("annotation 'Reaps'"),
                        "eval_time": "401m",
                        "exp_samples": [{"labels": '{instance="host-a:9464"}', "value": 1}],
                    },
                ],
            }
        ],
    }
    path = tmp_path / "dashboard.test.yml"
    path.write_text(json.dumps(test))
    result = run(exe, "test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
