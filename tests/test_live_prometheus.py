"""Debian's Prometheus scrapes the real exporter in a namespace holding the known socket mix;
every dashboard query and every rule expression goes through its HTTP API."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import load_script, new_netns, unavailable
from tests.kernel import build_mix, wait_for

pytestmark = pytest.mark.netns
ROOT = Path(__file__).resolve().parents[1]
preview = load_script(ROOT / "grafana" / "preview" / "render.py", "preview_render")

PROM = "http://127.0.0.1:19090"
VARIABLES = {"cluster": ".*", "job": "netstat", "instance": "127.0.0.1:10101", "state": "SYN_RECV",
             "datasource": "prometheus"}


def api(ns, path, **params):
    with ns.entered():
        url = f"{PROM}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.loads(response.read())


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if shutil.which("prometheus") is None:
        unavailable("prometheus is not installed (Debian package 'prometheus')")
    a, b = new_netns(), new_netns()
    tmp = tmp_path_factory.mktemp("prom")
    procs = []
    mix = None
    try:
        mix = build_mix(a, b)
        # conntrack in this namespace (a rule using it makes the kernel track connections)
        a.exec("iptables", "-A", "INPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED",
               "-j", "ACCEPT", check=False)
        config = tmp / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: ['{ROOT}/deploy/prometheus/alerts.yml', '{ROOT}/deploy/prometheus/recording.yml']\n"
            "scrape_configs:\n  - job_name: netstat\n    static_configs: [{targets: ['127.0.0.1:10101']}]\n")
        log = open(tmp / "logs.txt", "w")
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", a.name, sys.executable, "-m", "exporter",
             "--web.listen-address=127.0.0.1:10101", "--sample.interval=1",
             "--collector.processes"],
            stdout=log, stderr=log))
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", a.name, "prometheus", f"--config.file={config}",
             f"--storage.tsdb.path={tmp / 'data'}", "--web.listen-address=127.0.0.1:19090"],
            stdout=log, stderr=log))

        def scraped():
            try:
                result = api(a, "/api/v1/query", query='count_over_time(up{job="netstat"}[1m])')
            except OSError:
                return False
            values = result["data"]["result"]
            return bool(values) and float(values[0]["value"][1]) >= 20
        wait_for(scraped, timeout=90, what="twenty scrapes")
        yield a
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        if mix:
            mix.close()
        a.destroy()
        b.destroy()


def dashboard_exprs():
    for path in sorted((ROOT / "grafana" / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                yield path.name, panel["title"], target["expr"]


def rule_exprs():
    for name in ("alerts.yml", "recording.yml"):
        for group in yaml.safe_load((ROOT / "deploy" / "prometheus" / name).read_text())["groups"]:
            for rule in group["rules"]:
                yield name, rule["expr"]


# Global sysctls (net.ipv4.tcp_max_orphans, tcp_mem) exist only in the initial network
# namespace's /proc/sys; an exporter in a child namespace, like this one, rightly leaves
# them out rather than report zeros. Every other query must return data.
GLOBAL_ONLY = ("netstat_sockstat_tcp_max_orphans", "netstat_sockstat_tcp_mem_limit_bytes")


def test_every_dashboard_query_returns_data(stack):
    empty = []
    for _dash, title, expr in dashboard_exprs():
        query = preview.substitute(expr, VARIABLES, "15s")
        result = api(stack, "/api/v1/query", query=query)
        assert result["status"] == "success", (title, query, result)
        if not result["data"]["result"]:
            empty.append(query)
    # nothing fires on the mix (test_rules_load_and_evaluate_without_errors), so the table of
    # firing alerts is rightly empty; the stat counting them says 0 through `or vector(0)`
    unexpected = [q for q in empty if not any(name in q for name in GLOBAL_ONLY + ("ALERTS{",))]
    assert not unexpected, "queries without data:\n" + "\n".join(unexpected)
    assert len(empty) == len(GLOBAL_ONLY) + 1


def test_alert_annotation_queries_evaluate(stack):
    for path in sorted((ROOT / "grafana" / "dashboards").glob("*.json")):
        for annotation in json.loads(path.read_text())["annotations"]["list"]:
            if "expr" in annotation:
                query = preview.substitute(annotation["expr"], VARIABLES, "15s")
                assert api(stack, "/api/v1/query", query=query)["status"] == "success", query


def test_sample_timestamp_is_recent(stack):
    result = api(stack, "/api/v1/query", query='time() - netstat_exporter_sample_timestamp_seconds{job="netstat"}')
    (age,) = [float(r["value"][1]) for r in result["data"]["result"]]
    assert -1 < age < 5, age


def test_every_rule_expression_parses_and_evaluates(stack):
    exprs = list(rule_exprs())
    assert len(exprs) >= 24
    for name, expr in exprs:
        result = api(stack, "/api/v1/query", query=expr)
        assert result["status"] == "success", (name, expr, result)


def test_rules_load_and_evaluate_without_errors(stack):
    groups = api(stack, "/api/v1/rules")["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) >= 24
    bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not bad, bad
    # the mix has no CLOSE_WAIT growth, floods or overflows: nothing may be firing
    firing = [r["name"] for r in rules if r.get("state") == "firing"]
    assert firing == [], firing


def test_recording_rules_produce_the_mix(stack):
    result = api(stack, "/api/v1/query",
                 query='instance_state:netstat_tcp_connections:sum{state="SYN_RECV"}')
    assert [float(r["value"][1]) for r in result["data"]["result"]] == [7.0]


def test_previews_render(stack, tmp_path):
    out = Path(os.environ.get("PREVIEW_OUT", tmp_path))
    with stack.entered():
        for path in sorted((ROOT / "grafana" / "dashboards").glob("*.json")):
            png = preview.render(PROM, path, out, VARIABLES)
            assert png.stat().st_size > 20_000
