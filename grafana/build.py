"""Build grafana/dashboards/*.json from the panel lists below.

    python grafana/build.py            # write the dashboards
    python grafana/build.py --check    # compare with a fresh build, write nothing (tests use it)

Panels are data here so that every one gets the same datasource, the same cluster/job/instance
matchers, a unit and a description; tests/test_dashboards.py lints the JSON this writes. The
cluster label's name and the runbook's URL come from the rules' config
(deploy/prometheus/render.py CONFIG), so alerts and dashboard move together.

Why a hand-written builder and not Grafana's typed `grafana-foundation-sdk` (PyPI): the SDK
is marked experimental ("not meant to be used in production environments"), is published as
one build per Grafana minor version under epoch-prefixed versions (`1759918042!11.4.0`) whose
API changes between releases, and would add a dependency to build one dashboard of about 30
panels. Its value, output that Grafana's schema accepts, is covered here by a dozen small
helpers and by tests that lint the JSON and run every query against a live Prometheus.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "dashboards"
UID = "netstat-overview"


def _rules_config() -> dict:
    spec = importlib.util.spec_from_file_location(
        "netstat_rules_render", HERE.parent / "deploy" / "prometheus" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CONFIG


CONFIG = _rules_config()
CLUSTER = CONFIG["clusterLabel"]
RUNBOOK = CONFIG["runbookURL"]
SEL = f'{CLUSTER}=~"$cluster",job=~"$job",instance=~"$instance"'
DS = {"type": "prometheus", "uid": "${datasource}"}
RI = "$__rate_interval"
# Links keep the time range and every variable (the selected hosts) when they jump.
KEEP = "${__url_time_range}&${__all_variables}"


def target(expr, legend="", instant=False, ref="A"):
    t = {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref}
    if instant:
        t.update({"instant": True, "range": False, "format": "table"})
    return t


def panel(kind, title, targets, unit, description, w=12, h=8, runbook=None, drill=None, **extra):
    """One panel. runbook: alert names whose runbook sections it links to; drill: titles of
    panels that show the detail behind it (linked by id once the layout is known)."""
    assert description, title
    p = {"type": kind, "title": title, "description": description, "datasource": DS,
         "targets": [target(*t) if isinstance(t, tuple) else t for t in targets],
         "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
         "options": {}, "links": [], "_size": (w, h), "_drill": drill or []}
    for alert in runbook or []:
        p["links"].append({"title": f"Runbook: {alert}", "url": f"{RUNBOOK}#{alert.lower()}",
                           "targetBlank": True})
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
    if p["type"] == "stat":
        p["options"] = {"colorMode": "background", "graphMode": "none", "textMode": "value",
                        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
    return p


def bars(p):
    p["options"] = {"orientation": "horizontal", "displayMode": "gradient"}
    return p


def stat(title, expr, unit, description, steps, **kw):
    """A stat that means the same with one host or fifty selected: a count of hosts, or the
    worst single host, never a sum coloured with per-host thresholds."""
    return thresholds(panel("stat", title, [(expr, "")], unit, description, w=3, h=4, **kw), *steps)


def conn(state):
    return f'netstat_tcp_connections{{state="{state}",{SEL}}}'


def overview_panels():
    syn_fill = (f'sum without (state) (netstat_tcp_local_port_connections{{state="SYN_RECV",{SEL}}}) '
                f"/ sum without (address) (netstat_tcp_listen_backlog{{{SEL}}})")
    states = stacked(panel(
        "timeseries", "TCP connections by state, all selected hosts",
        [(f"sum by (state) (netstat_tcp_connections{{{SEL}}})", "{{state}}")], "short",
        "Every TCP socket of the selected hosts counted by state, as `netstat -ant` shows them. "
        "A band that keeps growing (CLOSE_WAIT, FIN_WAIT2) is a leak; a sudden SYN_RECV band is "
        "a flood.", w=16, h=9, drill=["CLOSE_WAIT and FIN_WAIT2 per host"]))
    colour(colour(states, "CLOSE_WAIT", "red"), "SYN_RECV", "orange")
    return [
        row("Overview: the worst host, and how many are in trouble"),
        stat("Targets down", f"count(up{{{SEL}}} == 0) or vector(0)", "short",
             "How many of the selected exporters Prometheus failed to scrape last time. While "
             "one is down, no new alert can start for its host.",
             [(None, "green"), (1, "red")], runbook=["NetstatExporterDown"], drill=["Scrape health per host"]),
        stat("Firing netstat alerts",
             f'count(ALERTS{{alertstate="firing",alertname=~"Netstat.*",{SEL}}}) or vector(0)', "short",
             "netstat-exporter alerts firing now on the selected hosts (the red marks on every "
             "graph show when each started).",
             [(None, "green"), (1, "orange")], drill=["Firing alerts"]),
        stat("Most CLOSE_WAIT on one host",
             f"max(sum by (instance) ({conn('CLOSE_WAIT')})) or vector(0)", "short",
             "The highest CLOSE_WAIT count of any selected host. CLOSE_WAIT means the peer closed "
             "and the program did not: a count that keeps rising is a leak.",
             [(None, "green"), (50, "orange"), (CONFIG["closeWaitHigh"], "red")],
             runbook=["NetstatCloseWaitGrowing", "NetstatCloseWaitHigh"],
             drill=["CLOSE_WAIT and FIN_WAIT2 per host"]),
        stat("Fullest SYN queue", f"max({syn_fill}) or vector(0)", "percentunit",
             "Half-open connections on a listening port over its backlog, for the worst port on "
             "any selected host. Near 100% the port is being SYN-flooded (or its clients' "
             "handshakes never finish).",
             [(None, "green"), (0.5, "orange"), (CONFIG["synQueueFullRatio"], "red")],
             runbook=["NetstatListenerSynQueueFull"], drill=["SYN queue fill per listening port"]),
        stat("Fullest accept queue",
             f"max(netstat_tcp_listen_queue_length{{{SEL}}} / netstat_tcp_listen_backlog{{{SEL}}}) or vector(0)",
             "percentunit",
             "Connections waiting for the program to accept() them, over the listener's backlog, "
             "for the worst listener. Full means new connections are dropped.",
             [(None, "green"), (0.5, "orange"), (CONFIG["listenBacklogFullRatio"], "red")],
             runbook=["NetstatListenBacklogFull"], drill=["Accept queue fill"]),
        stat("Hosts dropping connections",
             f"count(sum by (instance) (rate(netstat_tcpext_listen_drops_total{{{SEL}}}[{RI}])) > 0) or vector(0)",
             "short",
             "How many selected hosts dropped incoming connections recently (full accept or SYN "
             "queues, memory). Which ones: the drops panel below.",
             [(None, "green"), (1, "red")], runbook=["NetstatListenDrops", "NetstatListenOverflows"],
             drill=["Dropped incoming connections per host"]),
        stat("Worst TIME_WAIT / ephemeral ports",
             f"max(sum by (instance) ({conn('TIME_WAIT')}) / on (instance) "
             f"max by (instance) (netstat_sockstat_ephemeral_ports{{{SEL}}})) or vector(0)", "percentunit",
             "TIME_WAIT sockets over the local port range, for the worst host. Over 100% is normal "
             "on a server that closes first; it matters only where outgoing connections fail.",
             [(None, "green"), (CONFIG["timeWaitRatio"], "orange")],
             runbook=["NetstatTimeWaitNearExhaustion"], drill=["Connection opens per host"]),
        stat("Hosts with a failing collector",
             f"count(count by (instance) (netstat_exporter_collector_success{{{SEL}}} == 0)) or vector(0)",
             "short",
             "How many selected hosts have a part of the exporter failing (its metrics are then "
             "missing; the exporter's log says why).",
             [(None, "green"), (1, "red")], runbook=["NetstatCollectorFailing"], drill=["Collectors"]),
        row("TCP states"),
        states,
        bars(panel("bargauge", "Peak per state (peak window)",
                   [(f"max by (state) (netstat_tcp_connections_peak{{{SEL}}})", "{{state}}", True)], "short",
                   "The highest count per state any selected host reached within the exporter's peak "
                   "window (60 s by default): catches bursts that come and go between scrapes.",
                   w=8, h=9)),
        panel("timeseries", "CLOSE_WAIT and FIN_WAIT2 per host",
              [(f'sum by (instance, state) (netstat_tcp_connections{{state=~"CLOSE_WAIT|FIN_WAIT2",{SEL}}})',
                "{{instance}} {{state}}")], "short",
              "Sockets waiting for the local program to close (CLOSE_WAIT) or for the peer to "
              "close (FIN_WAIT2), per host. A line whose low points keep rising is a leak: the "
              "alert fires when that floor rose and its trend reaches the ceiling within a day.",
              runbook=["NetstatCloseWaitGrowing", "NetstatFinWait2Growing"]),
        panel("timeseries", "Sockets per program (netstat -p)",
              [(f'topk(10, sum by (instance, program) (netstat_process_connections{{state="CLOSE_WAIT",program!~"other|none",{SEL}}}))',
                "{{instance}} {{program}} CLOSE_WAIT")], "short",
              "CLOSE_WAIT sockets of the programs holding the most, per host: the leaking program "
              "by name. Needs --collector.processes; \"unknown\" is a process the exporter may not "
              "look into.", runbook=["NetstatCloseWaitGrowingInProgram"]),
        panel("timeseries", "Queued bytes by state",
              [(f"sum by (state, queue) (netstat_tcp_queue_bytes{{{SEL}}}) > 0", "{{state}} {{queue}}")],
              "bytes",
              "Bytes received but not yet read by programs (receive) and sent but not yet "
              "acknowledged by peers (send), like the Recv-Q and Send-Q columns of netstat."),
        panel("timeseries", "Half-open connections (SYN_RECV) per host",
              [(f"sum by (instance) ({conn('SYN_RECV')})", "{{instance}}")], "short",
              "Connections whose handshake has not completed, per host. With syncookies on, each "
              "listener holds at most its backlog; beyond that the kernel answers with cookies.",
              runbook=["NetstatSynRecvHigh"], drill=["SYN queue fill per listening port"]),
        row("Who: remote addresses, ports and listeners"),
        panel("timeseries", "Client-side TIME_WAIT per destination vs ephemeral ports",
              [(f'topk(5, max by (instance, destination) (netstat_tcp_client_time_wait{{{SEL}}})'
                f' / ignoring (destination) group_left max by (instance) '
                f'(netstat_sockstat_ephemeral_ports{{{SEL}}}))',
                "{{instance}} to {{destination}}")], "percentunit",
              "TIME_WAIT sockets this host left behind connecting out to one destination, over "
              "its ephemeral port range: at 100% new connections to that destination fail "
              "(EADDRNOTAVAIL). Server-side TIME_WAIT holds no port and is not counted here.",
              runbook=["NetstatClientTimeWaitExhaustion"], w=24, h=7),
        panel("table", "Top remote addresses (all states)",
              [(f'topk(20, sum by (remote, state) (netstat_tcp_remote_connections{{remote!~"other|excluded",{SEL}}}))',
                "", True)], "short",
              "The remote addresses holding the most connections, per state, over the selected "
              "hosts: `netstat -an | awk '{print $5}' | sort | uniq -c | sort -nr | head -20`. "
              "Addresses outside the top N are counted in \"other\".", w=8, h=10),
        bars(panel("bargauge", "Top remotes in $state",
                   [(f'topk(10, sum by (remote) (netstat_tcp_remote_connections{{state=~"$state",{SEL}}}))',
                     "{{remote}}", True)], "short",
                   "Who holds the state picked at the top of the page: TIME_WAIT shows the peers "
                   "this host connects to most, SYN_RECV who sends handshakes that never finish.",
                   w=8, h=10, runbook=["NetstatSynRecvConcentrated"])),
        bars(panel("bargauge", "Connections per server port",
                   [(f'topk(15, sum by (port) (netstat_tcp_local_port_connections{{port!="other",{SEL}}}))',
                     ":{{port}}", True)], "short",
                   "Connections to each listening port of the selected hosts, all states together: "
                   "which service is busy.", w=8, h=10)),
        thresholds(bars(panel(
            "bargauge", "SYN queue fill per listening port",
            [(f"topk(15, {syn_fill})", "{{instance}} :{{port}}", True)], "percentunit",
            "Half-open connections on each listening port over that port's backlog. A flooded "
            "port sits near 100% while the kernel answers the rest with syncookies.",
            runbook=["NetstatListenerSynQueueFull"])), (None, "green"), (0.5, "orange"),
            (CONFIG["synQueueFullRatio"], "red")),
        thresholds(bars(panel(
            "bargauge", "Accept queue fill",
            [(f"topk(15, netstat_tcp_listen_queue_length{{{SEL}}} / netstat_tcp_listen_backlog{{{SEL}}})",
              "{{instance}} {{address}}:{{port}}", True)], "percentunit",
            "Connections waiting in each listener's accept queue over its backlog (netstat -lnt's "
            "Recv-Q over Send-Q). A full queue drops new connections.",
            runbook=["NetstatListenBacklogFull", "NetstatListenOverflows"])),
            (None, "green"), (0.5, "orange"), (CONFIG["listenBacklogFullRatio"], "red")),
        row("Per host: drops, retransmits, opens (netstat -s)"),
        panel("timeseries", "Dropped incoming connections per host",
              [(f"sum by (instance) (rate(netstat_tcpext_listen_overflows_total{{{SEL}}}[{RI}]))",
                "{{instance}} accept queue full", False, "A"),
               (f"sum by (instance) (rate(netstat_tcpext_listen_drops_total{{{SEL}}}[{RI}])) - "
                f"sum by (instance) (rate(netstat_tcpext_listen_overflows_total{{{SEL}}}[{RI}]))",
                "{{instance}} other drops", False, "B")], "ops",
              "Incoming connections each host dropped per second: because a program's accept "
              "queue was full, or for other reasons (a full SYN queue without syncookies, memory).",
              runbook=["NetstatListenOverflows", "NetstatListenDrops"]),
        panel("timeseries", "SYN flood defence per host",
              [(f"sum by (instance) (rate(netstat_tcpext_syncookies_sent_total{{{SEL}}}[{RI}]))",
                "{{instance}} syncookies sent", False, "A"),
               (f"sum by (instance) (rate(netstat_tcpext_tcp_req_q_full_drop_total{{{SEL}}}[{RI}]))",
                "{{instance}} SYNs dropped", False, "B")], "ops",
              "SYNs answered with syncookies (a SYN queue was full) and SYNs dropped (full, with "
              "syncookies off), per host per second.",
              runbook=["NetstatSyncookiesSent", "NetstatSynQueueDrops"]),
        panel("timeseries", "Retransmitted segments per host",
              [(f"(sum by (instance) (rate(netstat_tcp_retrans_segs_total{{{SEL}}}[{RI}])) - "
                f"sum by (instance) (rate(netstat_tcpext_tcp_syn_retrans_total{{{SEL}}}[{RI}]))) / "
                f"sum by (instance) (rate(netstat_tcp_out_segs_total{{{SEL}}}[{RI}]))",
                "{{instance}} data", False, "A"),
               (f"sum by (instance) (rate(netstat_tcpext_tcp_syn_retrans_total{{{SEL}}}[{RI}])) / "
                f"sum by (instance) (rate(netstat_tcp_out_segs_total{{{SEL}}}[{RI}]))",
                "{{instance}} SYN/SYN-ACK", False, "B")],
              "percentunit",
              "Share of sent segments that were retransmits, per host, split into handshake "
              "retransmits (unanswered SYN-ACKs pile up in a SYN flood) and the rest (packet loss "
              "on real connections).", runbook=["NetstatRetransmitRatioHigh"]),
        panel("timeseries", "Connection opens per host",
              [(f"sum by (instance) (rate(netstat_tcp_active_opens_total{{{SEL}}}[{RI}]))",
                "{{instance}} outgoing (connect)", False, "A"),
               (f"sum by (instance) (rate(netstat_tcp_passive_opens_total{{{SEL}}}[{RI}]))",
                "{{instance}} incoming (accept)", False, "B"),
               (f"sum by (instance) (rate(netstat_tcp_attempt_fails_total{{{SEL}}}[{RI}]))",
                "{{instance}} failed attempts", False, "C")], "ops",
              "New connections per second each host opened (outgoing), accepted (incoming) and "
              "saw fail during the handshake. Failures next to a lot of TIME_WAIT point at "
              "exhausted local ports.", runbook=["NetstatTimeWaitNearExhaustion"]),
        panel("timeseries", "Resets per host",
              [(f"sum by (instance) (rate(netstat_tcp_out_rsts_total{{{SEL}}}[{RI}]))",
                "{{instance}} resets sent", False, "A"),
               (f"sum by (instance) (rate(netstat_tcp_estab_resets_total{{{SEL}}}[{RI}]))",
                "{{instance}} established connections reset", False, "B")], "ops",
              "Resets each host sent, and established connections ended by a reset, per second."),
        panel("timeseries", "Orphans and TIME_WAIT vs limits",
              [(f'max by (instance) (netstat_sockstat_orphan_sockets{{protocol="tcp",{SEL}}}) / '
                f"max by (instance) (netstat_sockstat_tcp_max_orphans{{{SEL}}})",
                "{{instance}} orphans / tcp_max_orphans", False, "A"),
               (f'max by (instance) (netstat_sockstat_time_wait_sockets{{protocol="tcp",{SEL}}}) / '
                f"max by (instance) (netstat_sockstat_ephemeral_ports{{{SEL}}})",
                "{{instance}} TIME_WAIT / ephemeral ports", False, "B")], "percentunit",
              "Per host: sockets closed by their program but still finishing (orphans) over the "
              "kernel's limit, and TIME_WAIT over the local port range.",
              runbook=["NetstatOrphansNearLimit", "NetstatTimeWaitNearExhaustion"]),
        panel("timeseries", "TCP memory vs tcp_mem",
              [(f'sum by (instance) (netstat_sockstat_memory_bytes{{protocol="tcp",{SEL}}})',
                "{{instance}} TCP memory", False, "A"),
               (f'max by (instance) (netstat_sockstat_tcp_mem_limit_bytes{{level="pressure",{SEL}}})',
                "{{instance}} pressure threshold", False, "B")], "bytes",
              "Memory the kernel holds for TCP buffers per host, against the threshold where it "
              "starts squeezing them (tcp_mem)."),
        panel("timeseries", "conntrack table fill per host",
              [(f"max by (instance) (netstat_conntrack_entries{{{SEL}}} / netstat_conntrack_entries_limit{{{SEL}}})",
                "{{instance}}")], "percentunit",
              "Entries in the firewall's connection tracking table over its size, per host. A "
              "full table drops new connections.",
              runbook=["NetstatConntrackTableFilling", "NetstatConntrackTableFull",
                       "NetstatConntrackTableFillingUp"],
              drill=["conntrack entries by protocol and state"]),
        row("conntrack (netstat -M)"),
        panel("timeseries", "conntrack entries by protocol and state",
              [(f'sum by (protocol, state) (netstat_conntrack_flows{{{SEL}}})',
                "{{protocol}} {{state}}")], "short",
              "What fills the connection tracking table: entries per protocol and, for TCP, "
              "per tracking state (needs CAP_NET_ADMIN; netstat_conntrack_flows_source says "
              "where they were read).",
              runbook=["NetstatConntrackTableFillingUp"]),
        panel("timeseries", "conntrack NAT'd entries and top sources",
              [(f"sum by (nat) (netstat_conntrack_nat_flows{{{SEL}}})", "{{nat}} NAT", False, "A"),
               (f'topk(10, sum by (source) (netstat_conntrack_nat_source_flows{{{SEL}}}))',
                "from {{source}}", False, "B")], "short",
              "Masqueraded (source NAT) and port-forwarded (destination NAT) entries, and the "
              "original sources with the most NAT'd entries (netstat -M); \"other\" sums the "
              "sources past the top --remote.top."),
        panel("timeseries", "conntrack drops, insert failures, early drops per host",
              [(f"sum by (instance) (rate(netstat_conntrack_stat_drop_total{{{SEL}}}[{RI}]))",
                "{{instance}} dropped/s", False, "A"),
               (f"sum by (instance) (rate(netstat_conntrack_stat_insert_failed_total{{{SEL}}}[{RI}]))",
                "{{instance}} insert failed/s", False, "B"),
               (f"sum by (instance) (rate(netstat_conntrack_stat_early_drop_total{{{SEL}}}[{RI}]))",
                "{{instance}} early-dropped/s", False, "C")], "short",
              "Packets dropped for want of a conntrack entry, lost insert races (parallel DNS "
              "queries), and entries evicted from a full table, per host.",
              runbook=["NetstatConntrackDropping", "NetstatConntrackEarlyDropping"]),
        row("UDP and interfaces"),
        panel("timeseries", "UDP sockets and buffer errors",
              [(f"sum by (state) (netstat_udp_sockets{{{SEL}}})", "{{state}} sockets", False, "A"),
               (f"sum by (instance) (rate(netstat_udp_rcvbuf_errors_total{{{SEL}}}[{RI}]))",
                "{{instance}} receive buffer errors/s", False, "B")], "short",
              "UDP sockets (connected or not) and, per host, datagrams lost because a socket's "
              "receive buffer was full."),
        panel("timeseries", "Interface traffic",
              [(f"sum by (instance, device) (rate(netstat_interface_receive_bytes_total{{{SEL}}}[{RI}]))",
                "{{instance}} {{device}} in", False, "A"),
               (f"sum by (instance, device) (rate(netstat_interface_transmit_bytes_total{{{SEL}}}[{RI}]))",
                "{{instance}} {{device}} out", False, "B")], "Bps",
              "Bytes per second in and out of each network interface (netstat -i)."),
        row("Exporter and scraping"),
        panel("state-timeline", "Scrape health per host", [(f"up{{{SEL}}}", "{{instance}}")], "short",
              "Whether Prometheus reached each exporter (1 up, 0 down). While a host is down its "
              "alerts cannot start; firing ones stay up for a while (keep_firing_for).",
              w=8, runbook=["NetstatExporterDown", "NetstatTargetVanished"],
              fieldConfig={"defaults": {"unit": "short", "mappings": [
                  {"type": "value", "options": {"0": {"text": "down", "color": "red"},
                                                "1": {"text": "up", "color": "green"}}}]},
                  "overrides": []}),
        panel("table", "Firing alerts",
              [(f'ALERTS{{alertstate="firing",alertname=~"Netstat.*",{SEL}}}', "", True)], "short",
              "Each netstat-exporter alert firing now, with its labels; the runbook says what to "
              "do about it.", w=8),
        panel("table", "Collectors", [(f"min by (instance, collector) (netstat_exporter_collector_success{{{SEL}}})", "", True)],
              "short", "Each part of the exporter on each host: 1 if its last sample worked, 0 if "
              "it failed (its metrics are then missing).", w=8, runbook=["NetstatCollectorFailing"]),
        panel("timeseries", "Collector duration",
              [(f"max by (collector) (netstat_exporter_collector_duration_seconds{{{SEL}}})", "{{collector}}")], "s",
              "How long each part of the sample took on the slowest selected host.", w=8),
        panel("timeseries", "Sample age per host",
              [(f"max by (instance) (time() - netstat_exporter_sample_timestamp_seconds{{{SEL}}})",
                "{{instance}}")], "s",
              "Seconds since each exporter last read the kernel: stays near the sampling interval; "
              "a climbing line is a stuck exporter (or a host clock that is off).", w=8,
              runbook=["NetstatSampleStale"]),
        panel("timeseries", "Sockets scanned per host",
              [(f"sum by (instance) (netstat_exporter_sockets_scanned{{{SEL}}})", "{{instance}}")], "short",
              "Sockets each exporter read in its last sample: its cost grows with this.", w=8),
    ]


def layout(panels):
    """Place panels left to right, wrapping at 24 columns; ids in order; then turn each
    panel's drill-down titles into links to those panels (viewPanel=id)."""
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
    ids = {p["title"]: p["id"] for p in panels}
    for p in panels:
        for title in p.pop("_drill", []):
            p["links"].append({"title": f"Details: {title}",
                               "url": f"/d/{UID}/netstat-exporter?{KEEP}&viewPanel={ids[title]}"})
    return panels


def variable(name, query, label, include_all=True, regex_all=".*"):
    return {"name": name, "label": label, "type": "query", "datasource": DS,
            "query": {"query": query, "refId": name}, "definition": query,
            "refresh": 2, "includeAll": include_all, "multi": True, "allValue": regex_all,
            "current": {"text": "All", "value": "$__all"} if include_all else {}, "sort": 1}


def dashboard():
    return {
        "uid": UID,
        "title": "netstat-exporter: TCP states, queues and peers",
        "description": "What netstat and ss show, per host: states, per-remote and per-port counts, "
                       "listen queues, netstat -s rates, conntrack, interfaces; with the alerts on top.",
        "tags": ["netstat", "tcp", "netstat-exporter"],
        "timezone": "browser", "editable": True, "graphTooltip": 1,
        "schemaVersion": 41, "version": 1, "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource",
             "query": "prometheus", "current": {}, "hide": 0, "refresh": 1},
            variable("cluster", f"label_values(netstat_exporter_build_info, {CLUSTER})", "Cluster"),
            variable("job", f'label_values(netstat_exporter_build_info{{{CLUSTER}=~"$cluster"}}, job)', "Job"),
            variable("instance", f'label_values(netstat_exporter_build_info{{{CLUSTER}=~"$cluster",job=~"$job"}}, instance)',
                     "Host"),
            {**variable("state", 'label_values(netstat_tcp_remote_connections{job=~"$job"}, state)',
                        "State (remotes panel)", include_all=False),
             "current": {"text": "SYN_RECV", "value": "SYN_RECV"}, "multi": False},
        ]},
        "annotations": {"list": [
            {"builtIn": 1, "name": "Annotations & Alerts", "type": "dashboard", "enable": True,
             "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
             "datasource": {"type": "grafana", "uid": "-- Grafana --"}},
            {"name": "netstat alerts", "datasource": DS, "enable": True, "hide": False,
             "iconColor": "red", "step": "30s",
             "expr": f'ALERTS{{alertstate="firing",alertname=~"Netstat.*",{SEL}}}',
             "target": {"expr": f'ALERTS{{alertstate="firing",alertname=~"Netstat.*",{SEL}}}',
                        "refId": "alerts"},
             "titleFormat": "{{alertname}}", "textFormat": "{{instance}} ({{severity}})",
             "tagKeys": "alertname,severity,instance", "useValueForTime": False},
        ]},
        "links": [
            {"title": "Alert runbook", "type": "link", "url": RUNBOOK, "targetBlank": True,
             "icon": "doc", "tooltip": "What each netstat alert means and what to do"},
        ],
        "panels": layout(overview_panels()),
    }


def rendered() -> dict[Path, str]:
    return {OUT / "netstat-overview.json": json.dumps(dashboard(), indent=2) + "\n"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare grafana/dashboards with a fresh build; write nothing")
    args = parser.parse_args(argv)
    files = rendered()
    if args.check:
        stale = [path for path, text in files.items() if not path.exists() or path.read_text() != text]
        for path in stale:
            print(f"{path} is not what build.py writes: run python grafana/build.py", file=sys.stderr)
        return 1 if stale else 0
    OUT.mkdir(exist_ok=True)
    for path, text in files.items():
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
