"""Build grafana/dashboards/*.json from the panel lists below.

    python grafana/build.py

Panels are data here so that every one gets the same datasource, the same job/instance
matchers and a unit; tests/test_dashboards.py lints the JSON this writes.
"""
from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards"
SEL = 'job=~"$job",instance=~"$instance"'
DS = {"type": "prometheus", "uid": "${datasource}"}
RI = "$__rate_interval"


def target(expr, legend="", instant=False, ref="A"):
    t = {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref}
    if instant:
        t.update({"instant": True, "range": False, "format": "table"})
    return t


def panel(kind, title, targets, unit, w=12, h=8, description="", **extra):
    p = {"type": kind, "title": title, "description": description, "datasource": DS,
         "targets": [target(*t) if isinstance(t, tuple) else t for t in targets],
         "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
         "options": {}, "_size": (w, h)}
    p.update(extra)
    return p


def row(title):
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "_size": (24, 1)}


def stacked(p):
    p["fieldConfig"]["defaults"]["custom"] = {"stacking": {"mode": "normal", "group": "A"},
                                              "fillOpacity": 60, "lineWidth": 1}
    return p


def colour(p, series, color):
    p["fieldConfig"]["overrides"].append({
        "matcher": {"id": "byName", "options": series},
        "properties": [{"id": "color", "value": {"mode": "fixed", "fixedColor": color}}]})
    return p


def thresholds(p, *steps):
    p["fieldConfig"]["defaults"]["thresholds"] = {"mode": "absolute", "steps": [
        {"color": c, "value": v} for v, c in steps]}
    return p


def overview_panels():
    conn = f"netstat_tcp_connections{{{SEL}}}"
    states = stacked(panel("timeseries", "TCP connections by state",
                           [(f"sum by (state) ({conn})", "{{state}}")], "short", w=16, h=9,
                           description="netstat -ant | awk '{++S[$NF]}' over time, every host selected."))
    colour(colour(states, "CLOSE_WAIT", "red"), "SYN_RECV", "orange")
    return [
        row("Overview"),
        thresholds(panel("stat", "TCP connections", [(f"sum({conn})", "")], "short", w=4, h=4), (None, "blue")),
        thresholds(panel("stat", "CLOSE_WAIT", [(f'sum(netstat_tcp_connections{{state="CLOSE_WAIT",{SEL}}})', "")],
                         "short", w=4, h=4, description="Peer closed, program did not: a leak when it grows."),
                   (None, "green"), (50, "orange"), (1000, "red")),
        thresholds(panel("stat", "SYN_RECV", [(f'sum(netstat_tcp_connections{{state="SYN_RECV",{SEL}}})', "")],
                         "short", w=4, h=4), (None, "green"), (100, "orange"), (256, "red")),
        thresholds(panel("stat", "TIME_WAIT / ephemeral ports",
                         [(f'max by (instance) (sum by (instance) (netstat_tcp_connections{{state="TIME_WAIT",{SEL}}}) '
                           f'/ on (instance) netstat_sockstat_ephemeral_ports{{{SEL}}})', "{{instance}}")],
                         "percentunit", w=4, h=4), (None, "green"), (0.5, "orange"), (0.7, "red")),
        thresholds(panel("stat", "conntrack table fill",
                         [(f"max(netstat_conntrack_entries{{{SEL}}} / netstat_conntrack_entries_limit{{{SEL}}})", "")],
                         "percentunit", w=4, h=4), (None, "green"), (0.8, "orange"), (0.9, "red")),
        thresholds(panel("stat", "Collectors failing",
                         [(f"count(netstat_exporter_collector_success{{{SEL}}} == 0) or vector(0)", "")],
                         "short", w=4, h=4), (None, "green"), (1, "red")),
        row("TCP states"),
        states,
        panel("bargauge", "Peak per state (peak window)",
              [(f"max by (state) (netstat_tcp_connections_peak{{{SEL}}})", "{{state}}", True)], "short",
              w=8, h=9, options={"orientation": "horizontal", "displayMode": "gradient"}),
        panel("timeseries", "CLOSE_WAIT and SYN_RECV per host",
              [(f'sum by (instance, state) (netstat_tcp_connections{{state=~"CLOSE_WAIT|SYN_RECV",{SEL}}})',
                "{{instance}} {{state}}")], "short"),
        panel("timeseries", "Queued bytes by state",
              [(f"sum by (state, queue) (netstat_tcp_queue_bytes{{{SEL}}}) > 0", "{{state}} {{queue}}")],
              "bytes", description="Recv-Q / Send-Q summed: data the program has not read, or the peer has not acknowledged."),
        row("Who: remote addresses and ports"),
        panel("table", "Top remote addresses (all states)",
              [(f'topk(20, sum by (remote, state) (netstat_tcp_remote_connections{{remote!~"other|excluded",{SEL}}}))',
                "", True)], "short", w=8, h=10,
              description="The seed's recipe 1: netstat -an | awk '{print $5}' | sort | uniq -c | sort -nr | head -20."),
        panel("bargauge", "Top remotes in $state",
              [(f'topk(10, sum by (remote) (netstat_tcp_remote_connections{{state=~"$state",{SEL}}}))',
                "{{remote}}", True)], "short", w=8, h=10,
              description="Recipes 2 and 3: who holds TIME_WAIT, who sends SYNs (pick the state above).",
              options={"orientation": "horizontal", "displayMode": "gradient"}),
        panel("bargauge", "Connections per server port",
              [(f'topk(15, sum by (port) (netstat_tcp_local_port_connections{{port!="other",{SEL}}}))',
                ":{{port}}", True)], "short", w=8, h=10,
              options={"orientation": "horizontal", "displayMode": "gradient"}),
        panel("bargauge", "Sockets per program (netstat -p)",
              [(f'topk(15, sum by (program, state) (netstat_process_connections{{program!~"other|none",state!="LISTEN",{SEL}}}))',
                "{{program}} {{state}}", True)], "short", w=24, h=8,
              description="Needs --collector.processes. program=\"unknown\": a process we may not look into.",
              options={"orientation": "horizontal", "displayMode": "gradient"}),
        row("Listeners"),
        thresholds(panel("bargauge", "Accept queue fill",
                         [(f"max by (address, port) (netstat_tcp_listen_queue_length{{{SEL}}} "
                           f"/ netstat_tcp_listen_backlog{{{SEL}}})", "{{address}}:{{port}}", True)],
                         "percentunit", options={"orientation": "horizontal", "displayMode": "gradient"}),
                   (None, "green"), (0.5, "orange"), (0.8, "red")),
        panel("timeseries", "Accept queue length",
              [(f"max by (address, port) (netstat_tcp_listen_queue_length{{{SEL}}})", "{{address}}:{{port}}")],
              "short"),
        row("Protocol statistics (netstat -s)"),
        panel("timeseries", "Drops and resets",
              [(f"sum(rate(netstat_tcpext_listen_overflows_total{{{SEL}}}[{RI}]))", "listen overflows", False, "A"),
               (f"sum(rate(netstat_tcpext_listen_drops_total{{{SEL}}}[{RI}]))", "listen drops", False, "B"),
               (f"sum(rate(netstat_tcpext_tcp_req_q_full_drop_total{{{SEL}}}[{RI}]))", "SYN queue full drops", False, "C"),
               (f"sum(rate(netstat_tcpext_syncookies_sent_total{{{SEL}}}[{RI}]))", "syncookies sent", False, "D"),
               (f"sum(rate(netstat_tcp_out_rsts_total{{{SEL}}}[{RI}]))", "resets sent", False, "E"),
               (f"sum(rate(netstat_tcp_estab_resets_total{{{SEL}}}[{RI}]))", "established resets", False, "F")],
              "ops"),
        panel("timeseries", "Retransmitted segments",
              [(f"sum(rate(netstat_tcp_retrans_segs_total{{{SEL}}}[{RI}])) / "
                f"sum(rate(netstat_tcp_out_segs_total{{{SEL}}}[{RI}]))", "retransmit ratio")],
              "percentunit"),
        panel("timeseries", "Connection opens",
              [(f"sum(rate(netstat_tcp_active_opens_total{{{SEL}}}[{RI}]))", "active (connect)", False, "A"),
               (f"sum(rate(netstat_tcp_passive_opens_total{{{SEL}}}[{RI}]))", "passive (accept)", False, "B"),
               (f"sum(rate(netstat_tcp_attempt_fails_total{{{SEL}}}[{RI}]))", "failed attempts", False, "C")],
              "ops"),
        panel("timeseries", "Orphans and TIME_WAIT vs limits",
              [(f'sum(netstat_sockstat_orphan_sockets{{protocol="tcp",{SEL}}})', "orphans", False, "A"),
               (f"max(netstat_sockstat_tcp_max_orphans{{{SEL}}})", "tcp_max_orphans", False, "B"),
               (f'sum(netstat_sockstat_time_wait_sockets{{protocol="tcp",{SEL}}})', "TIME_WAIT", False, "C"),
               (f"max(netstat_sockstat_ephemeral_ports{{{SEL}}})", "ephemeral ports", False, "D")],
              "short"),
        panel("timeseries", "TCP memory vs tcp_mem",
              [(f'sum(netstat_sockstat_memory_bytes{{protocol="tcp",{SEL}}})', "TCP memory", False, "A"),
               (f'max(netstat_sockstat_tcp_mem_limit_bytes{{level="pressure",{SEL}}})', "pressure threshold", False, "B")],
              "bytes"),
        panel("timeseries", "conntrack entries vs limit",
              [(f"sum(netstat_conntrack_entries{{{SEL}}})", "entries", False, "A"),
               (f"max(netstat_conntrack_entries_limit{{{SEL}}})", "limit", False, "B")], "short"),
        row("UDP and interfaces"),
        panel("timeseries", "UDP sockets and buffer errors",
              [(f"sum by (state) (netstat_udp_sockets{{{SEL}}})", "{{state}} sockets", False, "A"),
               (f"sum(rate(netstat_udp_rcvbuf_errors_total{{{SEL}}}[{RI}]))", "receive buffer errors/s", False, "B")],
              "short"),
        panel("timeseries", "Interface traffic",
              [(f"sum by (device) (rate(netstat_interface_receive_bytes_total{{{SEL}}}[{RI}]))", "{{device}} in", False, "A"),
               (f"sum by (device) (rate(netstat_interface_transmit_bytes_total{{{SEL}}}[{RI}]))", "{{device}} out", False, "B")],
              "Bps"),
        row("Exporter"),
        panel("table", "Collectors", [(f"min by (collector) (netstat_exporter_collector_success{{{SEL}}})", "", True)],
              "short", w=8),
        panel("timeseries", "Collector duration",
              [(f"max by (collector) (netstat_exporter_collector_duration_seconds{{{SEL}}})", "{{collector}}")], "s", w=8),
        panel("timeseries", "Sample age and sockets scanned",
              [(f"max(netstat_exporter_sample_age_seconds{{{SEL}}})", "sample age (s)", False, "A"),
               (f"sum(netstat_exporter_sockets_scanned{{{SEL}}})", "sockets scanned", False, "B")], "short", w=8),
    ]


def layout(panels):
    """Place panels left to right, wrapping at 24 columns; ids in order."""
    x = y = line = 0
    for pid, p in enumerate(panels, start=1):
        w, h = p.pop("_size")
        if x + w > 24:
            x, y = 0, y + line
            line = 0
        p["id"] = pid
        p["gridPos"] = {"x": x, "y": y, "w": w, "h": h}
        x += w
        line = max(line, h)
        if p["type"] == "row":
            x, y, line = 0, y + h, 0
    return panels


def variable(name, query, label, include_all=True, regex_all=".*"):
    return {"name": name, "label": label, "type": "query", "datasource": DS,
            "query": {"query": query, "refId": name}, "definition": query,
            "refresh": 2, "includeAll": include_all, "multi": True, "allValue": regex_all,
            "current": {}, "sort": 1}


def dashboard():
    return {
        "uid": "netstat-overview",
        "title": "netstat-exporter: TCP states, queues and peers",
        "description": "What netstat and ss show, per host: states, per-remote and per-port counts, listen queues, netstat -s rates, conntrack, interfaces.",
        "tags": ["netstat", "tcp", "netstat-exporter"],
        "timezone": "browser", "editable": True, "graphTooltip": 1,
        "schemaVersion": 41, "version": 1, "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource",
             "query": "prometheus", "current": {}, "hide": 0, "refresh": 1},
            variable("job", "label_values(netstat_exporter_build_info, job)", "Job"),
            variable("instance", 'label_values(netstat_exporter_build_info{job=~"$job"}, instance)', "Host"),
            {**variable("state", 'label_values(netstat_tcp_remote_connections{job=~"$job"}, state)',
                        "State (remotes panel)", include_all=False),
             "current": {"text": "SYN_RECV", "value": "SYN_RECV"}, "multi": False},
        ]},
        "annotations": {"list": []},
        "links": [],
        "panels": layout(overview_panels()),
    }


def main() -> None:
    OUT.mkdir(exist_ok=True)
    (OUT / "netstat-overview.json").write_text(json.dumps(dashboard(), indent=2) + "\n")


if __name__ == "__main__":
    main()
