"""The operator kit: Prometheus alerting rules (etc/prometheus), their promtool unit tests, the Grafana dashboard
(etc/grafana), and that every metric they use is one a running daemon exports.

The rule files are read with a small block-style YAML reader (PyYAML is not a dependency); promtool, when
installed, parses them for real and must agree on the number of rules.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "etc" / "prometheus" / "syncd-alerts.yml"
RULE_TESTS = ROOT / "etc" / "prometheus" / "syncd-alerts.test.yml"
DASHBOARD = ROOT / "etc" / "grafana" / "syncd-dashboard.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian package prometheus) not installed")

METRIC = re.compile(r"\bsyncd_[a-zA-Z0-9_]*[a-zA-Z0-9]")
VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range", "__interval_ms", "__range_s"}


# -- reading the files ------------------------------------------------------------------------------------------


def yaml_values(text: str, key: str) -> list[str]:
    """The value of every `key:` in block-style YAML: plain, quoted, or a `>`/`|` block scalar."""
    lines = text.splitlines()
    pattern = re.compile(rf"^(\s*)(?:- )?{re.escape(key)}:(?:\s+(.*))?$")
    values = []
    for i, line in enumerate(lines):
        m = pattern.match(line)
        if not m:
            continue
        indent, value = len(m.group(1)), (m.group(2) or "").strip()
        if value[:1] in (">", "|"):
            block = []
            for following in lines[i + 1:]:
                if following.strip() and len(following) - len(following.lstrip()) <= indent:
                    break
                block.append(following.strip())
            value = (" " if value[0] == ">" else "\n").join(part for part in block if part)
        elif value.startswith('"'):
            value = json.loads(value)
        elif value.startswith("'"):
            value = value[1:-1].replace("''", "'")
        values.append(value)
    return values


def chunks(text: str, start: str) -> list[str]:
    """`text` cut at every line that starts a list item `- START:`; the part before the first one is dropped."""
    starts = [m.start() for m in re.finditer(rf"(?m)^\s*- {re.escape(start)}:", text)]
    return [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)], strict=True)]


def alerts() -> dict[str, dict[str, str]]:
    out = {}
    for chunk in chunks(RULES.read_text(), "alert"):
        rule = {key: (yaml_values(chunk, key) or [""])[0]
                for key in ("alert", "expr", "for", "severity", "summary", "description")}
        assert rule["alert"] not in out, f"alert {rule['alert']} defined twice"
        out[rule["alert"]] = rule
    return out


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict]) -> list[dict]:
    out = []
    for panel in panels:
        out.append(panel)
        out.extend(all_panels(panel.get("panels", [])))  # panels inside a collapsed row
    return out


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and templating queries."""
    d = dashboard()
    exprs = [t["expr"] for p in all_panels(d["panels"]) for t in p.get("targets", [])]
    for var in d["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def as_promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced, for promtool to parse."""
    if expr.startswith("label_values("):  # Grafana's function, not PromQL: check its series selector
        expr = expr[len("label_values("):].rsplit(",", 1)[0]
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h")
    return VARIABLE.sub(".*", expr)


def used_metrics() -> dict[str, set[str]]:
    """syncd_* name -> where it is used."""
    used: dict[str, set[str]] = {}
    for name, rule in alerts().items():
        for metric in METRIC.findall(rule["expr"]):
            used.setdefault(metric, set()).add(f"alert {name}")
    for expr in dashboard_queries():
        for metric in METRIC.findall(expr):
            used.setdefault(metric, set()).add("dashboard")
    return used


# -- the alerting rules -------------------------------------------------------------------------------------------


def test_every_alert_has_severity_summary_and_a_next_command():
    from syncd.cli import build_parser

    rules = alerts()
    assert len(rules) >= 10, sorted(rules)
    for name, rule in rules.items():
        assert name.startswith("Syncd"), name
        assert rule["expr"], name
        assert re.fullmatch(r"\d+[smh]", rule["for"]), f"{name}: needs a `for:` so that it does not flap"
        assert rule["severity"] in ("warning", "critical"), name
        assert rule["summary"] and rule["description"], name
        if re.search(r"syncd_(sync|delivery|deliveries)_", rule["expr"]):  # per-sync series
            assert "{{ $labels.sync }}" in rule["summary"] and "{{ $labels.sync }}" in rule["description"], name
        commands = re.findall(r"`([^`]+)`", " ".join(rule["description"].split()))
        runnable = [c for c in commands if c.split()[0] in ("syncd", "journalctl", "systemctl")]
        assert runnable, f"{name}: the description names no command to run next"
        for command in runnable:
            argv = shlex.split(command.replace("{{ $labels.sync }}", "orders"))
            if argv[0] == "syncd":
                try:
                    build_parser().parse_args(argv[1:])
                except SystemExit:
                    pytest.fail(f"{name}: `{command}` is not a valid syncd command line")
            else:
                assert "syncd" in argv, f"{name}: `{command}`"
    assert {r["severity"] for r in rules.values()} == {"warning", "critical"}


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    rules = alerts()
    firing, quiet = set(), set()
    for case in chunks(RULE_TESTS.read_text(), "eval_time"):
        names = yaml_values(case, "alertname")
        assert names, case
        if "exp_labels:" in case:
            firing.add(names[0])
            assert yaml_values(case, "alertname")[1:] == [names[0]] * (len(names) - 1)
        elif re.search(r"exp_alerts:\s*\[\]", case):
            quiet.add(names[0])
    assert firing >= set(rules), f"alerts without a firing case: {sorted(set(rules) - firing)}"
    assert quiet >= set(rules), f"alerts without a case where they stay quiet: {sorted(set(rules) - quiet)}"
    assert firing | quiet <= set(rules), f"tests of unknown alerts: {sorted((firing | quiet) - set(rules))}"


@needs_promtool
def test_promtool_checks_and_unit_tests_the_rules():
    check = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    # The block-style reader above sees the same rules as Prometheus does.
    assert f"SUCCESS: {len(alerts())} rules found" in check.stdout, check.stdout
    unit = subprocess.run([PROMTOOL, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                          capture_output=True, text=True, timeout=60)
    assert unit.returncode == 0, unit.stdout + unit.stderr
    assert "SUCCESS" in unit.stdout, unit.stdout


# -- the dashboard ------------------------------------------------------------------------------------------------


def test_dashboard_is_importable_grafana_json():
    d = dashboard()
    assert d["title"] == "syncd" and d["uid"] == "syncd"
    assert 36 <= d["schemaVersion"] <= 41
    assert "id" not in d or d["id"] is None  # an id would tie it to one Grafana's database

    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    sync = variables["sync"]
    query = sync["query"]["query"] if isinstance(sync["query"], dict) else sync["query"]
    assert sync["type"] == "query" and re.fullmatch(r"label_values\(syncd_sync_up(\{[^}]*\})?, *sync\)", query), query
    assert sync["multi"] and sync["includeAll"] and sync["allValue"] == ".*"
    datasource = {"type": "prometheus", "uid": "${datasource}"}
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"] == datasource, var["name"]

    panels = all_panels(d["panels"])
    assert len([p for p in panels if p["type"] != "row"]) >= 15
    ids, cells = set(), set()
    for panel in panels:
        title = panel.get("title")
        assert title and panel["id"] not in ids, panel
        ids.add(panel["id"])
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, title
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not mine & cells, f"panel {title!r} overlaps another"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["type"] in ("stat", "table", "timeseries", "gauge", "bargauge", "text"), title
        assert panel["datasource"] == datasource, title
        targets = panel["targets"]
        assert targets, f"panel {title!r} has no query"
        assert len({t["refId"] for t in targets}) == len(targets), title
        for target in targets:
            assert target["expr"].strip() and target["datasource"] == datasource, title
            for a, b in VARIABLE.findall(target["expr"]):
                assert (a or b) in variables or (a or b) in GRAFANA_BUILTINS, f"{title}: unknown variable ${a or b}"
    kinds = {p["type"] for p in panels}
    assert {"stat", "table", "timeseries"} <= kinds

    used = {m for expr in dashboard_queries() for m in METRIC.findall(expr)}
    assert used >= {
        "syncd_sync_up", "syncd_sync_poll_duration_seconds_bucket", "syncd_sync_records", "syncd_sync_events_total",
        "syncd_deliveries_total", "syncd_delivery_failures_total", "syncd_delivery_queue_depth",
        "syncd_delivery_oldest_pending_age_seconds", "syncd_delivery_dead_letters",
    }
    assert any(expr.startswith("histogram_quantile(") and "syncd_sync_poll_duration_seconds_bucket" in expr
               for expr in dashboard_queries())


@needs_promtool
def test_promtool_parses_every_dashboard_query(tmp_path):
    rules = ["groups:", "  - name: dashboard", "    rules:"]
    for n, expr in enumerate(dashboard_queries()):
        rules += [f"      - record: dashboard:query_{n}", f"        expr: {json.dumps(as_promql(expr))}"]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text("\n".join(rules) + "\n")
    check = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


# -- the metrics they use -----------------------------------------------------------------------------------------


async def test_every_metric_used_is_exported_by_a_running_daemon(upstream, receiver, conf_dir, state_path, daemons):
    upstream.body = {"items": [{"id": 1, "v": 1}, {"id": 2, "v": 1}]}
    (conf_dir / "orders.toml").write_text(
        f'webhook_url = "{receiver.url}/hook"\nlist_identifier = "$.items"\nrecord_identifier = "$.id"\n'
        f'interval = "1s"\n\n[api_details]\nbase_url = "{upstream.url}"\npath = "/orders"\n'
    )
    d = await daemons("--config-dir", str(conf_dir), "--state-path", str(state_path))
    await wait_for(lambda: len(receiver.delivered()) == 2, timeout=10)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get(f"http://{d.address}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    assert await d.stop() == 0

    # Series names as Prometheus stores them: counters end in _total, histograms in _bucket/_sum/_count.
    exported: dict[str, set[tuple]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            exported.setdefault(sample.name, set()).add(tuple(sorted(sample.labels)))
    used = used_metrics()
    assert len(used) >= 15, sorted(used)
    missing = []
    for metric, where in sorted(used.items()):
        if metric in exported:
            continue
        near = sorted(n for n in exported if n.startswith(metric + "_") or metric.startswith(n))
        missing.append(f"{metric} (used by {', '.join(sorted(where))}; exported: {near or 'nothing like it'})")
    assert not missing, "not exported by syncd:\n" + "\n".join(missing)
    # Per-sync series exist for the sync before anything went wrong (alerts can only see series that exist).
    # (The two duration histograms count all syncs together unless per_sync_histograms is on.)
    for metric in used:
        if re.match(r"syncd_(sync|delivery|deliveries)_", metric) and not re.match(
                r"syncd_(sync_poll|delivery)_duration_seconds", metric):
            assert any("sync" in labels for labels in exported[metric]), metric


def test_readme_explains_the_kit():
    readme = (ROOT / "README.md").read_text()
    assert "## Alerts and dashboards" in readme
    section = readme.split("## Alerts and dashboards", 1)[1].split("\n## ", 1)[0]
    for needle in ("etc/prometheus/syncd-alerts.yml", "etc/grafana/syncd-dashboard.json", 'job_name: syncd',
                   "promtool test rules"):
        assert needle in section, needle
    for name in alerts():
        assert name in section, f"README does not list alert {name}"
