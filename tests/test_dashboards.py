"""Lint the Grafana dashboards: datasource variable, units, $__rate_interval, job/instance
regex matchers, unique ids, a valid non-overlapping grid; and that build.py made them."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "grafana"
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))
RANGE_FUNCS = re.compile(r"\b(rate|irate|increase|delta|deriv|avg_over_time|max_over_time)\(")


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


def test_there_are_dashboards_and_build_py_is_current(tmp_path):
    assert DASHBOARDS
    before = {p.name: p.read_text() for p in DASHBOARDS}
    subprocess.run([sys.executable, str(ROOT / "build.py")], check=True)
    assert {p.name: p.read_text() for p in sorted((ROOT / "dashboards").glob("*.json"))} == before, \
        "grafana/dashboards is not what build.py writes: run python grafana/build.py"


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
    for name in ("job", "instance"):
        assert variables[name]["multi"] and variables[name]["includeAll"]
        assert variables[name]["allValue"] == ".*"
    for p in panels(dash):
        if p["type"] != "row":
            assert p["fieldConfig"]["defaults"].get("unit"), f"{p['title']}: no unit"
            assert p["targets"], p["title"]
    for p, expr in exprs(dash):
        for call in RANGE_FUNCS.finditer(expr):
            window = re.match(r"[^\[]*\[([^\]]+)\]", expr[call.end():])
            assert window and window.group(1) == "$__rate_interval", (p["title"], expr)
        for selector in re.findall(r"\b(netstat_\w+)\{([^}]*)\}", expr):
            assert 'job=~"$job"' in selector[1] and 'instance=~"$instance"' in selector[1], (p["title"], expr)
        assert not re.search(r"\bnetstat_\w+(?![\w{])", expr), (p["title"], "metric without matchers", expr)


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
