"""Lint the Grafana dashboards: datasource variable, units, $__rate_interval, cluster/job/instance
regex matchers, unique ids, a valid non-overlapping grid, a description on every panel, stat
panels that mean the same with many hosts selected, per-host breakdowns, alert annotations,
runbook and drill-down links; and that build.py made them (checked with --check: no test
writes the tree)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import load_script

ROOT = Path(__file__).resolve().parents[1] / "grafana"
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))
RANGE_FUNCS = re.compile(r"\b(rate|irate|increase|delta|deriv|avg_over_time|max_over_time)\(")
RUNBOOK = (ROOT.parent / "deploy" / "prometheus" / "RUNBOOK.md").read_text()
render = load_script(ROOT.parent / "deploy" / "prometheus" / "render.py", "dash_rules_render")
CLUSTER = render.CONFIG["clusterLabel"]
MATCHERS = (f'{CLUSTER}=~"$cluster"', 'job=~"$job"', 'instance=~"$instance"')


def load(path):
    return json.loads(path.read_text())


def panels(dash):
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])


def exprs(dash):
    for p in panels(dash):
        for t in p.get("targets", []):
            yield p, t["expr"]


def test_there_are_dashboards_and_build_py_is_current():
    assert DASHBOARDS
    done = subprocess.run([sys.executable, str(ROOT / "build.py"), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_check_mode_reports_a_stale_dashboard_without_writing(tmp_path, monkeypatch):
    build = load_script(ROOT / "build.py", "grafana_build_check")
    stale = tmp_path / "netstat-overview.json"
    stale.write_text("{}\n")
    monkeypatch.setattr(build, "OUT", tmp_path)
    assert build.main(["--check"]) == 1
    assert stale.read_text() == "{}\n"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_datasource_is_a_template_variable(path):
    dash = load(path)
    text = path.read_text()
    assert "${DS_" not in text and "__inputs" not in dash
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for p in panels(dash):
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"], p["title"]
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            assert v["datasource"]["uid"] == "${datasource}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_units_rate_interval_and_matchers(path):
    dash = load(path)
    assert dash["schemaVersion"] in (41, 42)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    for name in ("cluster", "job", "instance"):
        assert variables[name]["multi"] and variables[name]["includeAll"]
        assert variables[name]["allValue"] == ".*"
    assert CLUSTER in variables["cluster"]["definition"]
    assert '"$cluster"' in variables["job"]["definition"] and '"$job"' in variables["instance"]["definition"]
    for p in panels(dash):
        if p["type"] != "row":
            assert p["fieldConfig"]["defaults"].get("unit"), f"{p['title']}: no unit"
            assert p["targets"], p["title"]
    for p, expr in exprs(dash):
        for call in RANGE_FUNCS.finditer(expr):
            window = re.match(r"[^\[]*\[([^\]]+)\]", expr[call.end():])
            assert window and window.group(1) == "$__rate_interval", (p["title"], expr)
        for selector in re.findall(r"\b(netstat_\w+|up|ALERTS)\{([^}]*)\}", expr):
            for matcher in MATCHERS:
                assert matcher in selector[1], (p["title"], matcher, expr)
        assert not re.search(r"\b(?:netstat_\w+|up|ALERTS)(?![\w{])", expr), (p["title"], "metric without matchers", expr)
        assert "sample_age_seconds" not in expr


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_ids_unique_and_grid_valid(path):
    dash = load(path)
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in panels(dash):
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["y"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"{p['title']} overlaps another panel"
        cells |= area


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_panel_is_described_in_plain_words(path):
    for p in panels(load(path)):
        if p["type"] == "row":
            continue
        text = p["description"]
        assert len(text) >= 40, p["title"]
        assert not re.search(r"seed|recipe", text, re.I), (p["title"], text)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_stats_mean_the_same_with_many_hosts(path):
    """A stat is a count of hosts (or things) or the worst single host: summing hosts and
    colouring with a per-host threshold turns "All" red with nothing wrong."""
    stats = [p for p in panels(load(path)) if p["type"] == "stat"]
    assert len(stats) >= 6
    for p in stats:
        (target,) = p["targets"]
        assert re.match(r"(count|max)\(", target["expr"]), (p["title"], target["expr"])
        assert p["fieldConfig"]["defaults"]["thresholds"]["steps"], p["title"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_per_host_breakdowns(path):
    by_title = {p["title"]: p for p in panels(load(path))}
    for title in ("Dropped incoming connections per host", "Retransmitted segments per host",
                  "Connection opens per host", "CLOSE_WAIT and FIN_WAIT2 per host"):
        for target in by_title[title]["targets"]:
            assert "by (instance" in target["expr"] and "{{instance}}" in target["legendFormat"], title
    up = [p for p in by_title.values() if any(t["expr"].startswith("up{") for t in p.get("targets", []))]
    assert up, "no scrape-health (up) panel"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_alert_annotations_and_links(path):
    dash = load(path)
    annotations = [a for a in dash["annotations"]["list"] if "ALERTS{" in a.get("expr", "")]
    assert annotations and all(m in annotations[0]["expr"] for m in MATCHERS)
    assert any(link["url"] == render.CONFIG["runbookURL"] for link in dash["links"])
    ids = {p["id"] for p in panels(dash)}
    runbook_links = drill_links = 0
    for p in panels(dash):
        for link in p.get("links", []):
            if link["url"].startswith(render.CONFIG["runbookURL"] + "#"):
                anchor = link["url"].split("#", 1)[1]
                assert any(h.lower() == anchor for h in re.findall(r"^## (\w+)$", RUNBOOK, re.M)), anchor
                runbook_links += 1
            else:
                target = re.search(r"[?&]viewPanel=(\d+)$", link["url"])
                assert target and int(target.group(1)) in ids, link
                assert "${__all_variables}" in link["url"], link
                drill_links += 1
    assert runbook_links >= 10 and drill_links >= 6, (runbook_links, drill_links)
