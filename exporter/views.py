"""Every netstat view the exporter knows, each registered once (in the way of node_exporter's
registerCollector): its name, whether it is on by default, the privileges it needs, how it is
read, its collector, its CLI tables and its own flags. The sampler, the server and the CLI
iterate VIEWS and name none of them; adding a view is a source module, an entry here, and its
tests.

Readers run in the sampler thread and get the sampler as their context: its socket reader,
options, the previous sample (top-N hysteresis) and the results read so far in this sample
(views are read in the order listed, so `processes` is ready before `tcp` needs it).
"""
from __future__ import annotations

import dataclasses
import errno
import socket
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from prometheus_client import CollectorRegistry

from . import aggregate, tables
from .collectors import ScrapeCollector, network, snmp as snmp_collectors, tcp as tcp_collectors
from .collectors import udp as udp_collectors
from .sources import (conntrack, ctnetlink, interfaces, multicast, netns, processes, routes,
                      snmp, sockdiag, sockstat)
from .sources.sockets import REFUSED, SocketReader, note_missing
from .sources.table import NETSTAT_STATES, TcpState


@dataclass(frozen=True)
class Table:
    """A `netstat-exporter snapshot` view: its flag, and what it prints from a snapshot."""
    flag: str | None  # "-s"; None for the default table
    long: str | None  # "--statistics"
    help: str
    render: Callable[..., str]  # (snapshot, args, previous_snapshot) -> text
    needs: tuple[str, ...]  # the views it prints from
    json_needs: tuple[str, ...] = ()  # read as well for --json
    options: tuple[tuple[str, Any], ...] = ()  # Config fields this table overrides


@dataclass(frozen=True)
class View:
    name: str
    help: str
    default: bool  # on unless --no-collector.NAME (off ones need --collector.NAME)
    privileges: str
    read: Callable[[Any], Any]  # (sampler) -> data
    collector: Callable[[Any], Any] | None = None  # (options) -> object with collect(snap, data)
    tables: tuple[Table, ...] = ()
    flags: tuple[str, ...] = ()  # flags of this view alone, for --help and the README
    peaks: Callable[[Any], dict] | None = None  # data -> counts kept over the peak window
    fast: Callable[[Any], dict | None] | None = None  # (sampler) -> counts, every fast interval


# -- readers ---------------------------------------------------------------------------------

def read_tcp(reader: SocketReader, listen_limit: int,
             remote: aggregate.RemoteOptions | None = None,
             previous: aggregate.TcpSummary | None = None, owners=None,
             program_top: int = 20) -> aggregate.TcpSummary:
    return _read_sockets(reader, "tcp", lambda: aggregate.TcpAccumulator(
        listen_limit=listen_limit, backlog_known=reader.sources["tcp"] == "netlink",
        remote=remote, previous=previous, owners=owners, program_top=program_top))


def read_udp(reader: SocketReader) -> aggregate.UdpSummary:
    return _read_sockets(reader, "udp", aggregate.UdpAccumulator)


def _read_sockets(reader: SocketReader, protocol: str, new_accumulator):
    # A dump is aggregated batch by batch; if it has to start over (interrupted, or netlink
    # refused and we fall back to /proc), the partial sums are thrown away with it.
    reader.retry_netlink(protocol)
    buffer = reader.buffer  # ours for the whole read, retries included (see the watchdog)
    for _attempt in range(3):
        acc = new_accumulator()
        try:
            for table in reader.tables(protocol, buffer):
                acc.add(table)
            reader.netlink_works(protocol)
            return acc.result()
        except sockdiag.DumpInterrupted:
            continue
        except OSError as exc:
            if not reader.fall_back(protocol, exc):
                raise
    raise sockdiag.DumpInterrupted(errno.EINTR, f"{protocol} dump interrupted three times")


def _tcp(ctx) -> aggregate.TcpSummary:
    # netstat -p: who owns each socket, read just before the dump so both agree closely
    owners = ctx.current.get("processes")
    summary = read_tcp(ctx.reader, ctx.listen_limit, ctx.remote, ctx.previous("tcp"), owners,
                       ctx.programs or 0)
    if any(listener.ifindex for listener in summary.listeners):
        summary = dataclasses.replace(summary, listeners=tuple(
            _zoned(listener) for listener in summary.listeners))
    if summary.remote is not None:
        for metric, cut in summary.remote.truncated.items():
            ctx.count_truncated(metric, cut)
    return summary


# The states the alerts watch, for the fast lane: a dump the kernel filters by state
# (idiag_states) costs in proportion to the sockets that match, and these are few on a healthy
# host; ESTABLISHED, TIME_WAIT and LISTEN (the many) stay with the full samples.
FAST_STATES = (TcpState.SYN_SENT, TcpState.SYN_RECV, TcpState.FIN_WAIT1, TcpState.FIN_WAIT2,
               TcpState.CLOSE_WAIT, TcpState.LAST_ACK, TcpState.CLOSING)


def _tcp_fast(ctx) -> dict[str, int] | None:
    if ctx.reader.sources["tcp"] != "netlink":  # /proc cannot be filtered: no cheap lane
        return None
    counts = np.zeros(256, dtype=np.int64)
    try:
        for table in sockdiag.dump(socket.IPPROTO_TCP, socket.AF_UNSPEC,
                                   states=sum(1 << s for s in FAST_STATES),
                                   buffer=ctx.fast_buffer):
            counts += np.bincount(table.state, minlength=256)
    except sockdiag.DumpInterrupted:
        return None  # the next tick tries again
    return {NETSTAT_STATES[state]: int(counts[state]) for state in FAST_STATES}


def _zoned(listener):
    """fe80::1 bound to interface 3 -> address "fe80::1%eth0", as ss prints it."""
    if not listener.ifindex:
        return listener
    try:
        zone = socket.if_indextoname(listener.ifindex)
    except OSError:  # the interface went away meanwhile
        zone = str(listener.ifindex)
    return dataclasses.replace(listener, address=f"{listener.address}%{zone}")


# Series each shown device makes: the 16 /proc/net/dev counters, MTU, up, running.
SERIES_PER_DEVICE = 19


def _interfaces(ctx) -> interfaces.InterfaceTable:
    """Devices filtered by --collector.interfaces.device-include/-exclude, then the busiest
    (bytes both ways since the last sample) get their own series, with the top-N's
    hysteresis, as many as fit in what --series.limit leaves after the TCP view's series (at
    most network.INTERFACE_LIMIT): a host with 300 cali* devices keeps eth0, and device
    series count in the budget."""
    table = _read_noted(ctx, interfaces.read_table)
    include, exclude = ctx.device_include, ctx.device_exclude
    wanted = {device: counters for device, counters in table.counters.items()
              if (include is None or include.fullmatch(device))
              and not (exclude is not None and exclude.fullmatch(device))}
    room = network.INTERFACE_LIMIT
    if ctx.remote is not None:
        room = min(room, max(0, ctx.remote.series_limit - _tcp_series(ctx.current.get("tcp")))
                   // SERIES_PER_DEVICE)
    previous = ctx.previous("interfaces")
    incumbents = frozenset(previous.shown or ()) if previous is not None else frozenset()
    # bytes since the last sample (since boot for the first, and for a new device), so a
    # device busy now displaces one that was busy long ago; +1: idle devices rank too
    before = previous.counters if previous is not None else {}
    traffic = {}
    for device, c in wanted.items():
        moved = c["receive_bytes"] + c["transmit_bytes"]
        if device in before:
            moved -= before[device]["receive_bytes"] + before[device]["transmit_bytes"]
        traffic[device] = max(0, moved) + 1
    shown = tuple(sorted(device for device, _count in aggregate.top_n(traffic, room, incumbents)))
    cut = len(wanted) - len(shown)
    if ctx.remote is not None or cut:  # the counter exists wherever the budget applies
        ctx.count_truncated("devices", cut)
    return dataclasses.replace(table, counters=wanted, shown=shown)


def _tcp_series(summary) -> int:
    """What the TCP view took of --series.limit, counted as its policy counts it: the OTHER
    and EXCLUDED rows it always keeps (MIN_SERIES_LIMIT), then each remote, port and
    listener series it shows."""
    if summary is None:
        return 0
    per_listener = 2 if any(l.backlog is not None for l in summary.listeners) else 1
    used = per_listener * len(summary.listeners)
    if summary.remote is not None:
        buckets = (aggregate.OTHER, aggregate.EXCLUDED)
        used += aggregate.MIN_SERIES_LIMIT + sum(
            1 for table in (summary.remote.remote, summary.remote.local_port)
            for (_state, label) in table if label not in buckets)
    return used


def _read_noted(ctx, read):
    """read(procfs, missing), the optional files it found absent (IPv6 off, module not
    loaded) noted once."""
    missing: list[str] = []
    data = read(ctx.reader.procfs, missing)
    note_missing(ctx.reader.missing, missing)
    return data


def _file_source(read) -> Callable[[Any], Any]:
    """A view reader that is one /proc source's read()."""
    return lambda ctx: _read_noted(ctx, read)


@dataclass(frozen=True)
class ConntrackData:
    table: Any  # count and limit (sources.conntrack.Conntrack)
    flows: Any  # aggregate.FlowSummary, or None where no entry could be read
    flows_source: str  # "netlink", "proc" or "none"
    stats: Any  # per-CPU statistics summed, or None


def _conntrack(ctx) -> ConntrackData | None:
    # taken first: a read that blocks on a /proc file below and comes back after the
    # watchdog gave the next sample a fresh buffer must not then dump into that one (found
    # in review)
    buffer = ctx.reader.buffer
    table = _read_noted(ctx, conntrack.read)
    if table is None:  # nf_conntrack not loaded: nothing to report, nothing failed
        return None
    stats = _read_noted(ctx, conntrack.read_stats)
    previous = ctx.previous("conntrack")
    previous_flows = previous.flows if previous is not None else None
    flows, source = _flows(ctx, previous_flows, buffer)
    if flows is not None and ctx.remote is not None:
        # NAT sources share --series.limit with the TCP and device series read before them
        interfaces_data = ctx.current.get("interfaces")
        used = _tcp_series(ctx.current.get("tcp")) + SERIES_PER_DEVICE * len(
            (interfaces_data.shown or ()) if interfaces_data is not None else ())
        room = max(0, ctx.remote.series_limit - used)
        shown = [item for item in flows.nat_sources if item[0] != aggregate.OTHER]
        if len(shown) > room:
            kept, cut = shown[:room], shown[room:]
            other = sum(count for label, count in flows.nat_sources
                        if label == aggregate.OTHER) + sum(count for _label, count in cut)
            flows = dataclasses.replace(flows, nat_sources=tuple(kept) + ((aggregate.OTHER,
                                                                           other),))
            ctx.count_truncated("nat_sources", len(cut))
    return ConntrackData(table, flows, source, stats)


def _flows(ctx, previous, buffer: bytearray):
    """Entries over ctnetlink (CAP_NET_ADMIN) into `buffer` (the read's own, retries
    included); where that is refused, /proc/net/nf_conntrack (root only); else count and
    limit alone. Each fallback is said once."""
    options = ctx.remote or aggregate.RemoteOptions()
    refusal = OSError(errno.EPERM, "--collector.sockets.source=proc")
    try:
        if ctx.reader.mode != "proc":  # proc: no netlink at all, as for the socket tables
            return (_count_flows(lambda: ctnetlink.dump(buffer), options, previous),
                    "netlink")
    except OSError as exc:
        if isinstance(exc, sockdiag.DumpError) or exc.errno not in REFUSED:
            raise
        refusal = exc
    path = f"{ctx.reader.procfs}/net/nf_conntrack"
    try:
        summary = _count_flows(lambda: iter([ctnetlink.read_proc(ctx.reader.procfs)]), options,
                               previous)
    except (FileNotFoundError, PermissionError) as exc:
        ctx.once("conntrack-none", f"ctnetlink not used ({refusal.strerror}) and {path} "
                 f"unreadable ({exc.strerror}): conntrack count and limit only (entries by "
                 "state need CAP_NET_ADMIN)")
        return None, "none"
    ctx.once("conntrack-proc", f"ctnetlink not used ({refusal.strerror}): reading {path} "
             "for conntrack entries")
    return summary, "proc"


def _count_flows(batches, options, previous):
    for _attempt in range(3):  # an interrupted dump is read again from the start
        acc = aggregate.FlowAccumulator(options)
        try:
            for table in batches():
                acc.add(table)
            return acc.result(previous)
        except sockdiag.DumpInterrupted:
            continue
    raise sockdiag.DumpInterrupted(errno.EINTR, "conntrack dump interrupted three times")


def _namespaces(ctx) -> aggregate.NetnsSummary:
    buffer = ctx.reader.buffer  # ours for the whole walk, however long it takes

    def states_here() -> dict[str, int]:
        for _attempt in range(3):  # an interrupted dump is read again, as the host's is
            try:
                return aggregate.summarize_tcp(
                    sockdiag.dump(socket.IPPROTO_TCP, buffer=buffer)).state_totals()
            except sockdiag.DumpInterrupted:
                continue
        raise sockdiag.DumpInterrupted(errno.EINTR, "TCP dump interrupted three times")

    found, unreadable, errors = netns.walk(ctx.reader.procfs, states_here)
    per_namespace: dict[str, dict[str, int]] = {}
    for label, states in found:  # two namespaces under one label (one program's) add up
        into = per_namespace.setdefault(label, dict.fromkeys(states, 0))
        for state, count in states.items():
            into[state] += count
    for error in errors:
        ctx.once(f"netns:{error}", f"netns: a namespace could not be read (the others are "
                 f"reported): {error}")
    return aggregate.summarize_namespaces(per_namespace, ctx.namespaces, unreadable,
                                          ctx.previous("netns"), failed=len(errors))


# -- the registry ----------------------------------------------------------------------------

VIEWS: tuple[View, ...] = (
    View("processes", "attribute TCP sockets to programs like netstat -p (walks /proc/PID/fd)",
         default=False, privileges="CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH to see other "
         "users' processes", read=lambda ctx: processes.read(ctx.reader.procfs),
         collector=lambda options: tcp_collectors.ProcessesCollector(),
         tables=(Table("-p", "--programs", "print TCP sockets per owning program and state, "
                       "like netstat -p (root, or CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH, sees "
                       "every process)", tables.programs, ("processes", "tcp"),
                       options=(("processes_top", 1 << 30),)),),  # every program, no top-N
         flags=("--collector.processes.top",)),
    View("tcp", "TCP sockets per state, queues, listeners, per-remote and per-port counts",
         default=True, privileges="none", read=_tcp,
         collector=lambda options: tcp_collectors.TcpCollector(),
         tables=(Table(None, None, "TCP connection counts per state", tables.states, ("tcp",),
                       json_needs=("udp",)),
                 Table("-l", "--listening", "print listening TCP sockets with their accept "
                       "queues, like netstat -tln (Recv-Q: waiting connections, Send-Q: "
                       "backlog)", tables.listeners, ("tcp",))),
         flags=("--collector.sockets.source", "--listen.limit", "--remote.top",
                "--remote.prefix-v4", "--remote.prefix-v6", "--remote.include",
                "--remote.exclude", "--remote.mask", "--remote.mask-key", "--local-port.top",
                "--series.limit"),
         peaks=lambda summary: summary.state_totals(), fast=_tcp_fast),
    View("udp", "UDP sockets, connected or not, and their queues", default=True,
         privileges="none", read=lambda ctx: read_udp(ctx.reader),
         collector=lambda options: udp_collectors.UdpCollector(),
         tables=(Table("-u", "--udp", "print UDP socket counts and queued bytes per family",
                       tables.udp, ("udp",)),)),
    View("snmp", "every netstat -s field of /proc/net/snmp, snmp6 and netstat", default=True,
         privileges="none", read=_file_source(snmp.read),
         collector=lambda options: snmp_collectors.SnmpCollector(options.snmp_fields),
         tables=(Table("-s", "--statistics", "print the protocol statistics grouped like "
                       "netstat -s (with --watch, counters show their rate)", tables.statistics,
                       ("snmp",)),),
         flags=("--collector.snmp.fields",)),
    View("sockstat", "/proc/net/sockstat with the tcp_mem, udp_mem and orphan limits",
         default=True, privileges="none", read=_file_source(sockstat.read),
         collector=lambda options: snmp_collectors.SockstatCollector()),
    View("interfaces", "interface counters, MTU and flags like netstat -i", default=True,
         privileges="none", read=_interfaces,
         collector=lambda options: network.InterfacesCollector(),
         tables=(Table("-i", "--interfaces", "print interface counters, like netstat -i",
                       tables.interfaces, ("interfaces",)),),
         flags=("--collector.interfaces.device-include", "--collector.interfaces.device-exclude")),
    View("conntrack", "the conntrack table: use and limit, entries by protocol, TCP state and "
         "NAT, top NAT sources, per-CPU statistics (netstat -M)", default=True,
         privileges="none for use, limit and statistics; CAP_NET_ADMIN for entries (else "
         "/proc/net/nf_conntrack, readable by root)", read=_conntrack,
         collector=lambda options: network.ConntrackCollector(),
         tables=(Table("-M", "--masquerade", "print conntrack entries by protocol and state "
                       "and NAT'd entries by original source, like netstat -M",
                       tables.conntrack, ("conntrack",)),)),
    View("routes", "routes per device and the default routes, like netstat -r", default=True,
         privileges="none", read=_file_source(routes.read),
         collector=lambda options: network.RoutesCollector(),
         tables=(Table("-r", "--route", "print the routing tables, like netstat -rn",
                       tables.routes, ("routes",)),)),
    View("multicast", "multicast group memberships per device, like netstat -g", default=True,
         privileges="none", read=_file_source(multicast.read),
         collector=lambda options: network.MulticastCollector(),
         tables=(Table("-g", "--groups", "print multicast group memberships, like netstat -gn",
                       tables.groups, ("multicast",)),)),
    View("netns", "TCP states in every other network namespace (containers, ip netns)",
         default=False, privileges="CAP_SYS_ADMIN (setns) and CAP_SYS_PTRACE",
         read=_namespaces, collector=lambda options: network.NetnsCollector(),
         flags=("--collector.netns.top",)),
)
BY_NAME = {view.name: view for view in VIEWS}
DEFAULTS = {view.name: view.default for view in VIEWS}  # what config.build is given


def build_registry(get_snapshot, version: str, snmp_fields=None,
                   views: tuple[View, ...] = VIEWS) -> CollectorRegistry:
    """Our own registry (never the global one) with one collector over the given views.
    snmp_fields: a compiled regex limiting the netstat -s fields ("TcpExt_ListenOverflows")."""
    options = CollectorOptions(snmp_fields=snmp_fields)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ScrapeCollector(
        get_snapshot, [(view.name, view.collector(options)) for view in views if view.collector],
        version))
    return registry


@dataclass(frozen=True)
class CollectorOptions:
    snmp_fields: Any = None
