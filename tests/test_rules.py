"""Prometheus rules: rendered files current, promtool check and unit tests, conventions."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import load_script, unavailable

RULES = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
render = load_script(RULES / "render.py", "rules_render")


def promtool():
    path = shutil.which("promtool")
    if path is None:
        unavailable("promtool is not installed (Debian package 'prometheus')")
    return path


@pytest.mark.parametrize("name", render.FILES)
def test_rendered_files_are_current(name):
    expected = render.render((RULES / "templates" / name).read_text())
    assert (RULES / name).read_text() == expected, "run python deploy/prometheus/render.py"


def test_promtool_check_rules():
    done = subprocess.run([promtool(), "check", "rules", "alerts.yml", "recording.yml"],
                          cwd=RULES, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_unit_tests():
    done = subprocess.run([promtool(), "test", "rules", "alerts_test.yml"], cwd=RULES,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def alerts():
    text = (RULES / "alerts.yml").read_text()
    return re.findall(r"- alert: (\w+)\n(.*?)(?=\n      - alert: |\n  - name: |\Z)", text, re.S)


def test_every_alert_is_complete_and_tested_both_ways():
    tests = (RULES / "alerts_test.yml").read_text()
    runbook = (RULES / "RUNBOOK.md").read_text()
    names = []
    for name, body in alerts():
        names.append(name)
        for key in ("summary:", "description:", "runbook_url:", "severity:"):
            assert key in body, (name, key)
        assert re.search(r"severity: (critical|warning|info)\n", body), name
        assert "{{ $value" in body or name in ("NetstatExporterDown", "NetstatCollectorFailing"), name
        assert f"## {name}\n" in runbook, name
        assert f"#{name.lower()}\"" in body, name
        cases = re.findall(rf"alertname: {name}\n        exp_alerts:(.*?)(?=\n      - eval_time|\n  - interval|\Z)", tests, re.S)
        assert any(c.strip() == "[]" for c in cases), f"{name}: no case that must not fire"
        assert any("exp_labels" in c for c in cases), f"{name}: no case that fires"
    assert len(names) == len(set(names)) >= 19


def test_selector_is_in_every_expression():
    for name in ("alerts.yml", "recording.yml"):
        text = (RULES / name).read_text()
        for metric in re.findall(r"\b((?:netstat_\w+|up))\{([^}]*)\}", text):
            assert render.SELECTOR in metric[1], (name, metric)
