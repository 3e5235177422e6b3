"""netstat -s as metrics: every field of snmp, netstat and snmp6, typed, plus sockstat.

Naming: netstat_<group>_<field> in snake case, `_total` on counters:
TcpExt ListenOverflows -> netstat_tcpext_listen_overflows_total, Ip6 InReceives ->
netstat_ip6_in_receives_total. The few fields that go up and down are gauges without
`_total`; fields the kernel gives in milliseconds are exported in seconds. A field we have
never heard of is still exported, as a counter named by the same rule.
"""
from __future__ import annotations

import re

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .base import PREFIX, gauge

_ACRONYM = re.compile(r"([A-Z]+)([A-Z][a-z])")
_CAMEL = re.compile(r"([a-z0-9])([A-Z])")

# (group, field) -> (unit suffix, scale): fields that are not monotonic counters.
GAUGES = {
    ("Ip", "Forwarding"): ("", 1),  # 1 forwarding, 2 not
    ("Ip", "DefaultTTL"): ("", 1),
    ("Tcp", "RtoAlgorithm"): ("", 1),
    ("Tcp", "RtoMin"): ("_seconds", 0.001),
    ("Tcp", "RtoMax"): ("_seconds", 0.001),
    ("Tcp", "MaxConn"): ("", 1),  # -1: no limit
    ("Tcp", "CurrEstab"): ("", 1),
    ("MPTcpExt", "MPCurrEstab"): ("", 1),
}
# Counters the kernel keeps in milliseconds.
MILLISECOND_COUNTERS = {("TcpExt", "TCPMemoryPressuresChrono")}

HELP = {
    ("Tcp", "ActiveOpens"): "TCP connections opened by connect() (SYN sent), refused ones included.",
    ("Tcp", "PassiveOpens"): "TCP connections accepted from a listener's SYN queue.",
    ("Tcp", "AttemptFails"): "Connection attempts that failed (SYN_SENT or SYN_RECV back to CLOSED or LISTEN).",
    ("Tcp", "EstabResets"): "Resets received on ESTABLISHED or CLOSE_WAIT connections.",
    ("Tcp", "CurrEstab"): "TCP connections now in ESTABLISHED or CLOSE_WAIT.",
    ("Tcp", "MaxConn"): "Limit on TCP connections; -1 means none.",
    ("Tcp", "RetransSegs"): "TCP segments retransmitted.",
    ("Tcp", "InSegs"): "TCP segments received, errors included.",
    ("Tcp", "OutSegs"): "TCP segments sent, retransmissions excluded.",
    ("Tcp", "InErrs"): "TCP segments received with errors (bad checksum, header).",
    ("Tcp", "OutRsts"): "TCP resets sent.",
    ("Tcp", "InCsumErrors"): "TCP segments received with a bad checksum.",
    ("Tcp", "RtoMin"): "Minimum TCP retransmission timeout.",
    ("Tcp", "RtoMax"): "Maximum TCP retransmission timeout.",
    ("Ip", "Forwarding"): "1 when IPv4 forwarding is on, 2 when off.",
    ("Ip", "DefaultTTL"): "Default IPv4 time-to-live.",
    ("TcpExt", "ListenOverflows"): "SYNs or final ACKs dropped because a listener's accept queue was full.",
    ("TcpExt", "ListenDrops"): "Incoming connections dropped at a listener for any reason (overflows included).",
    ("TcpExt", "TCPSynRetrans"): "SYN and SYN-ACK retransmissions.",
    ("TcpExt", "TCPReqQFullDrop"): "SYNs dropped because the SYN queue was full and syncookies were off.",
    ("TcpExt", "TCPReqQFullDoCookies"): "SYN queue full: answered with a syncookie instead.",
    ("TcpExt", "SyncookiesSent"): "Syncookies sent (SYN flood defence engaged).",
    ("TcpExt", "SyncookiesRecv"): "Valid syncookies received back.",
    ("TcpExt", "SyncookiesFailed"): "Invalid syncookies received.",
    ("TcpExt", "TCPTimeWaitOverflow"): "TIME_WAIT sockets not created because tcp_max_tw_buckets was reached.",
    ("TcpExt", "TCPAbortOnData"): "Connections reset because the application closed with unread data.",
    ("TcpExt", "TCPAbortOnClose"): "Connections reset on close() with data still to read.",
    ("TcpExt", "TCPAbortOnMemory"): "Connections reset for lack of memory (tcp_mem or orphans).",
    ("TcpExt", "TCPAbortOnTimeout"): "Connections reset after too many retransmission timeouts.",
    ("TcpExt", "TCPAbortOnLinger"): "Connections reset when the FIN_WAIT2 linger time ran out.",
    ("TcpExt", "TCPOrphanQueue"): "Orphan sockets queued.",
    ("TcpExt", "TW"): "TCP sockets that finished TIME_WAIT through the slow timer.",
    ("TcpExt", "TCPMemoryPressures"): "Times TCP entered memory pressure.",
    ("TcpExt", "TCPMemoryPressuresChrono"): "Time spent under TCP memory pressure.",
    ("TcpExt", "TCPBacklogDrop"): "Segments dropped because a socket's backlog was full.",
    ("TcpExt", "TCPOFODrop"): "Out-of-order segments dropped for lack of receive memory.",
    ("TcpExt", "TCPRcvQDrop"): "Segments dropped because the receive queue was full.",
    ("TcpExt", "PruneCalled"): "Times the receive queue had to be pruned for memory.",
    ("TcpExt", "TCPTimeouts"): "Retransmission timeouts.",
    ("Udp", "RcvbufErrors"): "UDP datagrams dropped because the socket receive buffer was full.",
    ("Udp", "SndbufErrors"): "UDP datagrams not sent because the send buffer was full.",
    ("Udp", "NoPorts"): "UDP datagrams to a port nobody listens on.",
    ("Udp", "InErrors"): "UDP datagrams received with errors (buffer full included).",
    ("Udp", "InDatagrams"): "UDP datagrams delivered to sockets.",
    ("Udp", "OutDatagrams"): "UDP datagrams sent.",
    ("Udp", "InCsumErrors"): "UDP datagrams received with a bad checksum.",
    ("Ip", "InReceives"): "IPv4 packets received, errors included.",
    ("Ip", "InDiscards"): "IPv4 packets discarded on input for lack of resources.",
    ("Ip", "OutNoRoutes"): "IPv4 packets dropped for lack of a route.",
    ("Ip6", "InReceives"): "IPv6 packets received, errors included.",
}


# One-letter words that promtool reads as abbreviated units (h, m, s, d, b): glue them to
# the next word, "MPJoinAckHMacFailure" -> "mp_join_ack_hmac_failure" (or, last, to the
# previous one).
_UNIT_LETTERS = re.compile(r"(?:(?<=_)|^)([bdhms])_|_([bdhms])$")


def snake(name: str) -> str:
    """"ListenOverflows" -> "listen_overflows", "TCPReqQFullDrop" -> "tcp_req_q_full_drop"."""
    words = _CAMEL.sub(r"\1_\2", _ACRONYM.sub(r"\1_\2", name)).lower()
    return _UNIT_LETTERS.sub(r"\1\2", words)


def metric_for(group: str, field: str) -> tuple[str, str, float]:
    """(kind, name without the prefix, scale): ("Tcp", "RtoMin") -> ("gauge", "tcp_rto_min_seconds", 0.001)."""
    base = f"{group.lower()}_{snake(field)}"
    if (group, field) in GAUGES:
        unit, scale = GAUGES[(group, field)]
        return "gauge", base + unit, scale
    if (group, field) in MILLISECOND_COUNTERS:
        return "counter", base + "_seconds", 0.001
    return "counter", base, 1


class SnmpCollector:
    def __init__(self, fields: re.Pattern | None = None):
        self.fields = fields  # fullmatch against "Group_Field" (TcpExt_ListenOverflows)

    def collect(self, _snapshot, stats):
        seen = set()
        for group, fields in stats.items():
            for field, value in fields.items():
                if self.fields is not None and not self.fields.fullmatch(f"{group}_{field}"):
                    continue
                kind, name, scale = metric_for(group, field)
                if name in seen:  # two kernel spellings mapping to one name: keep both
                    name = f"{group}_{field}".lower()
                seen.add(name)
                doc = HELP.get((group, field), f"{group} {field} from /proc/net/{_file(group)}.")
                family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(
                    PREFIX + name, doc, value=value * scale)
                yield family


def _file(group: str) -> str:
    if group.endswith("6"):
        return "snmp6"
    return "netstat" if group.endswith("Ext") else "snmp"


# sockstat key -> metric (without prefix); "mem" is in pages and also exported in bytes.
SOCKSTAT_KEYS = {
    "inuse": ("sockstat_sockets_in_use", "Sockets in use, per protocol (/proc/net/sockstat)."),
    "orphan": ("sockstat_orphan_sockets", "TCP sockets no process holds any more (compare with "
               "netstat_sockstat_tcp_max_orphans)."),
    "tw": ("sockstat_time_wait_sockets", "TCP sockets in TIME_WAIT."),
    "alloc": ("sockstat_allocated_sockets", "Sockets allocated, per protocol."),
    "mem": ("sockstat_memory_pages", "Memory the protocol's sockets use, in pages (compare "
            "with netstat_sockstat_tcp_mem_limit_pages)."),
}


class SockstatCollector:
    def collect(self, _snapshot, data):
        families = {}

        def family(name, doc, labels=("protocol",)):
            if name not in families:
                families[name] = gauge(name, doc, labels)
            return families[name]

        for (protocol, key), value in data.values.items():
            if protocol == "sockets" and key == "used":
                family("sockstat_sockets_used", "Sockets of every kind in use.", ()).add((), value)
                continue
            label = (protocol.lower(),)
            if key == "memory":  # FRAG gives bytes already
                family("sockstat_memory_bytes", "Memory the protocol's sockets use, in bytes.").add(label, value)
                continue
            name, doc = SOCKSTAT_KEYS.get(key, (f"sockstat_{snake(key)}", f"sockstat {key}."))
            family(name, doc).add(label, value)
            if key == "mem":
                family("sockstat_memory_bytes", "Memory the protocol's sockets use, in "
                       "bytes.").add(label, value * data.page_size)
        if data.tcp_max_orphans is not None:
            family("sockstat_tcp_max_orphans", "net.ipv4.tcp_max_orphans: orphan sockets "
                   "allowed before they are reset.", ()).add((), data.tcp_max_orphans)
        if data.local_port_range is not None:
            first, last = data.local_port_range
            family("sockstat_ephemeral_ports", "Ports in net.ipv4.ip_local_port_range: how "
                   "many connections to one destination address and port can exist at once "
                   "(TIME_WAIT included).", ()).add((), max(0, last - first + 1))
        for proto, limits in (("tcp", data.tcp_mem), ("udp", data.udp_mem)):
            if limits is None:
                continue
            pages = family(f"sockstat_{proto}_mem_limit_pages", f"net.ipv4.{proto}_mem: "
                           "thresholds in pages.", ("level",))
            size = family(f"sockstat_{proto}_mem_limit_bytes", f"net.ipv4.{proto}_mem: "
                          "thresholds in bytes.", ("level",))
            for level, value in zip(("min", "pressure", "max"), limits):
                pages.add((level,), value)
                size.add((level,), value * data.page_size)
        for fam in families.values():
            yield fam.metric
