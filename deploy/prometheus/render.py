"""Render the Prometheus rules (and the suggested Alertmanager inhibitions) from templates/
and one configuration, the way node-mixin's `_config` works, without jsonnet.

    python deploy/prometheus/render.py                      # write the shipped files
    python deploy/prometheus/render.py --check              # compare only, write nothing
    python deploy/prometheus/render.py --config mine.yml --out /etc/prometheus/netstat
    python deploy/prometheus/render.py --set selector='job="netstat"' --set keepFiringFor=15m

`--config` takes YAML (needs PyYAML) or JSON holding any keys of CONFIG below; `--set` wins
over both. The shipped files in this directory, deploy/kubernetes/prometheusrule.yaml and
deploy/alertmanager/inhibit_rules.yml are rendered with CONFIG as it stands (a test checks
they are current).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEPLOY = HERE.parent
FILES = ("alerts.yml", "recording.yml", "alerts_test.yml")
PROMETHEUS_RULE = DEPLOY / "kubernetes" / "prometheusrule.yaml"
INHIBIT_RULES = DEPLOY / "alertmanager" / "inhibit_rules.yml"

# Every key a template may name as %key%. Durations are Prometheus durations; thresholds
# are plain numbers. Keep the comments: deploy/prometheus/README.md points here.
CONFIG: dict[str, object] = {
    # Which series come from netstat-exporters: goes into every selector.
    "selector": 'job=~"netstat.*"',
    # The target label naming a cluster (kept on every alert, used by the inhibitions).
    "clusterLabel": "cluster",
    # Absolute URLs: alerts travel to chat and pagers, where a relative path is a dead link.
    "runbookURL": "https://github.com/netstat-exporter/netstat-exporter/blob/main/deploy/prometheus/RUNBOOK.md",
    "dashboardURL": "http://localhost:3000/d/netstat-overview/netstat-exporter",
    # How long an alert stays firing after its condition went away or its data vanished:
    # an exporter restart or a failed scrape neither resolves nor restarts it.
    "keepFiringFor": "10m",
    # Alerts on a gauge read its last sample within this window, so one failed scrape (its
    # series go stale for one evaluation) does not reset a pending alert's `for:` timer.
    "gapTolerance": "1m",
    # The window of rate() for counters.
    "rateWindow": "5m",
    # CLOSE_WAIT / FIN_WAIT2 leaks: the floor is the lowest count over floorWindow (a leak
    # raises it, a busy but healthy server does not); the alert wants the floor to have risen
    # by at least leakMinRise over leakWindow AND the floor's trend over leakWindow to reach
    # the state's ceiling within leakHorizon. At 1 leaked socket per minute it fires 28 min
    # after the leak starts, at 6 per minute after 16 min (alerts_test.yml).
    "floorWindow": "5m",
    "leakWindow": "30m",
    "leakHorizon": "24h",
    "leakFor": "5m",
    "closeWaitLeakMinRise": 10,
    "finWait2LeakMinRise": 10,
    "closeWaitHigh": 1000,
    "closeWaitHighFor": "5m",
    "finWait2High": 1000,
    # SYN floods: a listener's SYN_RECV over its backlog (the SYN queue's size with
    # syncookies on), syncookies sent, SYN-queue drops.
    "synQueueFullRatio": 0.8,
    "synFloodFor": "1m",
    "synRecvHigh": 1024,
    "synRecvHighFor": "5m",
    "synRecvConcentratedShare": 0.5,
    "synRecvConcentratedMin": 100,
    # Accept queues.
    "listenBacklogFullRatio": 0.8,
    "listenFor": "5m",
    # TIME_WAIT over the ephemeral range, corroborated by failing connection attempts.
    "timeWaitRatio": 0.7,
    "timeWaitFor": "10m",
    # Client-side TIME_WAIT toward one destination over the ephemeral range.
    "clientTimeWaitRatio": 0.5,
    "orphansRatio": 0.5,
    "orphansFor": "10m",
    # Retransmitted segments (SYN and SYN-ACK retransmits left out) over segments sent.
    "retransmitRatio": 0.05,
    "retransmitMinSegmentsPerSecond": 10,
    "retransmitFor": "10m",
    "conntrackFillingRatio": 0.8,
    "conntrackFillingFor": "5m",
    "conntrackFullRatio": 0.9,
    "conntrackFullFor": "2m",
    # Predictive: the table's trend over conntrackPredictWindow reaches conntrackFullRatio of
    # the limit within conntrackPredictHorizon, while already above conntrackPredictMinRatio.
    "conntrackPredictWindow": "1h",
    "conntrackPredictHorizon": "4h",
    "conntrackPredictMinRatio": 0.5,
    "conntrackPredictFor": "15m",
    # Entries dropped (table full, insert races under UDP load) or early-dropped (the kernel
    # evicting unassured entries to make room): any, sustained over conntrackDropsFor.
    "conntrackDropsFor": "5m",
    # The exporter itself.
    "exporterDownFor": "5m",
    "exporterAbsentFor": "15m",
    "targetVanishedLookback": "1h",
    "collectorFailingFor": "10m",
    "sampleStaleFor": "5m",
    # alert name -> severity, to move an alert between critical, warning and info.
    "severityOverrides": {},
}


def merged(overrides: dict | None = None) -> dict:
    """CONFIG with overrides applied; unknown keys are an error, not a silent no-op."""
    config = dict(CONFIG)
    unknown = sorted(set(overrides or {}) - set(config))
    if unknown:
        raise SystemExit(f"unknown config keys: {', '.join(unknown)} (see CONFIG in {__file__})")
    config.update(overrides or {})
    return config


PLACEHOLDER = re.compile(r"%(\w+)%")
DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def seconds(duration: str) -> int | float:
    """A Prometheus duration in seconds, for functions that take a number: "1h30m" -> 5400.
    (%keySeconds% in a template is the duration key `key` in seconds.)"""
    parts = DURATION.findall(duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        raise SystemExit(f"{duration!r} is not a Prometheus duration")
    total = sum(int(n) * UNIT_SECONDS[u] for n, u in parts)
    return int(total) if total == int(total) else total


def render(text: str, config: dict | None = None, alerts: bool = False) -> str:
    """Substitute %key% from the config; a key the config lacks is an error. In the alert
    rules (alerts=True) apply severityOverrides too."""
    config = merged(config)

    def value(match: re.Match) -> str:
        key = match.group(1)
        if key.endswith("Seconds") and key[:-len("Seconds")] in config:
            return str(seconds(str(config[key[:-len("Seconds")]])))
        if key not in config or key == "severityOverrides":
            raise KeyError(f"template names %{key}%, which is not a config key")
        return str(config[key])

    header = "# GENERATED by render.py from templates/ -- edit the template or the config, not this file.\n"
    text = PLACEHOLDER.sub(value, text)
    return header + (override_severities(text, config["severityOverrides"]) if alerts else text)


def override_severities(text: str, overrides: dict) -> str:
    for name, severity in overrides.items():
        if severity not in ("critical", "warning", "info"):
            raise SystemExit(f"severityOverrides[{name}]: {severity!r} is not critical, warning or info")
        block = re.compile(rf"(      - alert: {name}\n(?:        .*\n|\n)*?          severity: )\w+")
        text, count = block.subn(rf"\g<1>{severity}", text)
        if not count:
            raise SystemExit(f"severityOverrides: no alert named {name}")
    return text


def prometheus_rule(alerts: str, recording: str) -> str:
    """The Kubernetes PrometheusRule carrying the same groups as alerts.yml and recording.yml
    (their `groups:` lists, indented under spec)."""
    def groups(text: str) -> str:
        body = text.split("\ngroups:\n", 1)[1]
        return "".join(f"  {line}\n" if line else "\n" for line in body.splitlines())
    return ("# GENERATED by deploy/prometheus/render.py from alerts.yml and recording.yml.\n"
            "apiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\nmetadata:\n"
            "  name: netstat-exporter\n  namespace: netstat-exporter\n  labels:\n"
            "    app.kubernetes.io/name: netstat-exporter\nspec:\n  groups:\n"
            + groups(alerts) + groups(recording))


def outputs(config: dict | None = None) -> dict[str, str]:
    """Every rendered file by its name in this directory (the PrometheusRule and the
    Alertmanager inhibitions by their own names)."""
    out = {name: render((HERE / "templates" / name).read_text(), config, name == "alerts.yml")
           for name in FILES}
    out[PROMETHEUS_RULE.name] = prometheus_rule(out["alerts.yml"], out["recording.yml"])
    out[INHIBIT_RULES.name] = render((HERE / "templates" / "inhibit_rules.yml").read_text(), config)
    return out


def write(out_dir: Path, config: dict | None = None) -> list[Path]:
    """Render into out_dir (all files side by side); returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in outputs(config).items():
        (out_dir / name).write_text(text)
        paths.append(out_dir / name)
    return paths


def shipped_paths() -> dict[str, Path]:
    paths = {name: HERE / name for name in FILES}
    paths[PROMETHEUS_RULE.name] = PROMETHEUS_RULE
    paths[INHIBIT_RULES.name] = INHIBIT_RULES
    return paths


def stale_files() -> list[Path]:
    """Shipped files that differ from what the default CONFIG renders."""
    rendered = outputs()
    return [path for name, path in shipped_paths().items()
            if not path.exists() or path.read_text() != rendered[name]]


def load_config(path: Path) -> dict:
    text = path.read_text()
    if path.suffix == ".json":
        return json.loads(text)
    import yaml  # only for YAML configs
    return yaml.safe_load(text) or {}


def parse_set(item: str) -> tuple[str, object]:
    key, _, raw = item.partition("=")
    try:
        return key, json.loads(raw)  # numbers and JSON objects as such
    except ValueError:
        return key, raw  # durations, selectors, URLs as text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="YAML or JSON file of CONFIG keys")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, help="write every file here instead of the tree")
    parser.add_argument("--check", action="store_true",
                        help="compare the shipped files with a fresh render; write nothing")
    args = parser.parse_args(argv)
    overrides = load_config(args.config) if args.config else {}
    overrides.update(parse_set(item) for item in args.set)
    if args.check:
        stale = stale_files()
        for path in stale:
            print(f"{path} is not what render.py writes", file=sys.stderr)
        return 1 if stale else 0
    if args.out:
        write(args.out, overrides)
        return 0
    rendered = outputs(overrides)
    for name, path in shipped_paths().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rendered[name])
    return 0


if __name__ == "__main__":
    sys.exit(main())
