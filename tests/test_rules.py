"""Prometheus rules: rendered files current, promtool check and unit tests, conventions, the
config that renders them, and the suggested Alertmanager inhibitions."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import load_script, unavailable

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus"
render = load_script(RULES / "render.py", "rules_render")
# Alerts about the target itself: they need no keep_firing_for (their condition is the outage).
PRESENCE = {"NetstatExporterDown", "NetstatTargetVanished", "NetstatExporterAbsent"}


def promtool():
    path = shutil.which("promtool")
    if path is None:
        unavailable("promtool is not installed (Debian package 'prometheus')")
    return path


def test_rendered_files_are_current():
    done = subprocess.run([sys.executable, str(RULES / "render.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr + "run python deploy/prometheus/render.py"


def test_check_mode_writes_nothing():
    before = {p: p.stat().st_mtime_ns for p in render.shipped_paths().values()}
    render.main(["--check"])
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_promtool_check_rules():
    done = subprocess.run([promtool(), "check", "rules", "alerts.yml", "recording.yml"],
                          cwd=RULES, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_unit_tests():
    done = subprocess.run([promtool(), "test", "rules", "alerts_test.yml"], cwd=RULES,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def rules(name="alerts.yml"):
    return [r for g in yaml.safe_load((RULES / name).read_text())["groups"] for r in g["rules"]]


def test_every_alert_is_complete_and_tested_both_ways():
    tests = (RULES / "alerts_test.yml").read_text()
    runbook = (RULES / "RUNBOOK.md").read_text()
    names = []
    for rule in rules():
        name = rule["alert"]
        names.append(name)
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description", "runbook_url", "dashboard_url"}, name
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert "{{ $value" in annotations["summary"] + annotations["description"] or name in (
            PRESENCE | {"NetstatCollectorFailing"}), name
        assert f"## {name}\n" in runbook, name
        assert annotations["runbook_url"] == f"{render.CONFIG['runbookURL']}#{name.lower()}", name
        assert annotations["dashboard_url"].startswith(render.CONFIG["dashboardURL"]), name
        assert ("keep_firing_for" in rule) == (name not in PRESENCE | {"NetstatSeriesTruncated"}), name
        cases = re.findall(rf"alertname: {name}\n        exp_alerts:(.*?)(?=\n      - eval_time|\n  - interval|\n  #|\Z)", tests, re.S)
        assert any(c.strip() == "[]" for c in cases), f"{name}: no case that must not fire"
        assert any("exp_labels" in c for c in cases), f"{name}: no case that fires"
    assert len(names) == len(set(names)) >= 24


def test_urls_are_absolute():
    for url in (render.CONFIG["runbookURL"], render.CONFIG["dashboardURL"]):
        assert re.match(r"https?://[^/]+/", url), url
    for name in ("alerts.yml", "alerts_test.yml"):
        for url in re.findall(r"(?:runbook|dashboard)_url: \"([^\"]*)\"", (RULES / name).read_text()):
            assert url.startswith(("https://", "http://")), (name, url)
    assert "deploy/prometheus/RUNBOOK.md#" not in (ROOT / "deploy" / "kubernetes" / "prometheusrule.yaml").read_text().replace(
        render.CONFIG["runbookURL"], "")


def test_selector_is_in_every_expression():
    for name in ("alerts.yml", "recording.yml"):
        for rule in rules(name):
            selectors = re.findall(r"\b((?:[a-z_]+:)?netstat_\w+(?::\w+)?|up)\{([^}]*)\}", rule["expr"])
            assert selectors, rule
            for metric, matchers in selectors:
                assert render.CONFIG["selector"] in matchers, (name, metric)
            bare = re.findall(r"\b(?:[a-z_]+:)?netstat_\w+(?::\w+)?(?![\w:{])", rule["expr"])
            assert not bare, (name, bare)


def test_target_labels_are_kept():
    """No aggregation names the labels it keeps: cluster, node and any other target label
    must reach Alertmanager, so every aggregation says what it drops. The one `on` matches
    `unless` (whose result keeps every label of its left side)."""
    for name in ("alerts.yml", "recording.yml"):
        for rule in rules(name):
            expr = rule["expr"].replace("unless on (", "unless (")
            assert not re.search(r"\b(by|on)\s*\(", expr), (name, rule.get("alert") or rule["record"])


def test_recording_rules_are_used():
    alerts = (RULES / "alerts.yml").read_text()
    for rule in rules("recording.yml"):
        assert rule["record"] + "{" in alerts, f"{rule['record']} is read by no alert"


def test_sample_age_is_gone():
    for path in [*RULES.glob("*.yml"), *RULES.glob("templates/*.yml"), RULES / "RUNBOOK.md"]:
        assert "sample_age_seconds" not in path.read_text(), path


def test_config_renders_everywhere(tmp_path):
    config = {"selector": 'job="edge"', "runbookURL": "https://wiki.example.com/netstat",
              "keepFiringFor": "30m", "closeWaitHigh": 5000,
              "severityOverrides": {"NetstatSyncookiesSent": "critical"}}
    render.write(tmp_path, config)
    alerts = yaml.safe_load((tmp_path / "alerts.yml").read_text())
    by_name = {r["alert"]: r for g in alerts["groups"] for r in g["rules"]}
    assert by_name["NetstatSyncookiesSent"]["labels"]["severity"] == "critical"
    assert by_name["NetstatSynQueueDrops"]["labels"]["severity"] == "warning"
    assert by_name["NetstatCloseWaitHigh"]["keep_firing_for"] == "30m"
    assert "> 5000" in by_name["NetstatCloseWaitHigh"]["expr"]
    assert by_name["NetstatCloseWaitHigh"]["annotations"]["runbook_url"] == \
        "https://wiki.example.com/netstat#netstatclosewaithigh"
    for name in ("alerts.yml", "recording.yml", "alerts_test.yml", "prometheusrule.yaml", "inhibit_rules.yml"):
        text = (tmp_path / name).read_text()
        assert 'job=~"netstat.*"' not in text and not re.search(r"%\w+%", text), name
    done = subprocess.run([promtool(), "check", "rules", "alerts.yml", "recording.yml"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("overrides, message", [
    ({"nonsense": 1}, "unknown config keys: nonsense"),
    ({"severityOverrides": {"NetstatNope": "critical"}}, "no alert named NetstatNope"),
    ({"severityOverrides": {"NetstatSyncookiesSent": "page"}}, "not critical, warning or info"),
    ({"leakHorizon": "a day"}, "not a Prometheus duration"),
])
def test_config_errors_are_reported(overrides, message):
    with pytest.raises(SystemExit, match=message):
        render.outputs(overrides)


def test_set_parses_numbers_and_text():
    assert render.parse_set("closeWaitHigh=2000") == ("closeWaitHigh", 2000)
    assert render.parse_set('selector=job="a"') == ("selector", 'job="a"')
    assert render.parse_set("leakFor=10m") == ("leakFor", "10m")
    assert render.seconds("1h30m") == 5400 and render.seconds("24h") == 86400


def test_inhibitions_parse_and_name_real_alerts(tmp_path):
    text = (ROOT / "deploy" / "alertmanager" / "inhibit_rules.yml").read_text()
    inhibit = yaml.safe_load(text)["inhibit_rules"]
    names = {r["alert"] for r in rules()}
    assert len(inhibit) >= 4
    matcher = re.compile(r'^alertname(=~|=)"([\w|]+)"$')
    for rule in inhibit:
        assert set(rule) == {"source_matchers", "target_matchers", "equal"}, rule
        assert {"job", "instance", render.CONFIG["clusterLabel"]} <= set(rule["equal"])
        sources, targets = set(), set()
        for key, into in (("source_matchers", sources), ("target_matchers", targets)):
            for item in rule[key]:
                match = matcher.match(item)
                assert match, item
                into.update(match.group(2).split("|"))
        assert sources <= names and targets <= names, (sources | targets) - names
        assert not sources & targets
        # an inhibition may only silence an alert about the same target with the same or a
        # lower severity
        rank = {"critical": 2, "warning": 1, "info": 0}
        severity = {r["alert"]: rank[r["labels"]["severity"]] for r in rules()}
        assert min(severity[s] for s in sources) >= max(severity[t] for t in targets), rule
    amtool = shutil.which("amtool")
    if amtool:  # Debian's prometheus-alertmanager, where installed: the real parser
        config = ROOT / "deploy" / "alertmanager" / "inhibit_rules.yml"
        full = yaml.safe_load(config.read_text())
        full.update({"route": {"receiver": "null"}, "receivers": [{"name": "null"}]})
        probe = tmp_path / "alertmanager.yml"
        probe.write_text(yaml.safe_dump(full))
        done = subprocess.run([amtool, "check-config", str(probe)], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
