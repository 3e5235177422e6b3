"""Interfaces (/proc/net/dev), the conntrack table, routes and multicast memberships: small
groups, one collector each."""
from __future__ import annotations

import collections

from ..aggregate import OTHER
from ..sources.table import FAMILY_NAMES
from .base import counter, gauge

# Most devices with their own series when the reader did not choose (tests, fixtures).
INTERFACE_LIMIT = 256


class InterfacesCollector:
    def __init__(self, limit: int = INTERFACE_LIMIT):
        self.limit = limit

    def collect(self, _snapshot, data):
        devices, links = data.counters, data.links
        total = gauge("interface_devices", "Network devices in /proc/net/dev (after "
                      "--collector.interfaces.device-include/-exclude); the busiest get "
                      "per-device series, as many as --series.limit leaves room for.")
        total.add((), len(devices))
        yield total.metric
        shown = list(data.shown) if data.shown is not None else sorted(devices)[: self.limit]
        columns = next(iter(devices.values()), {})
        for column in columns:
            family = counter(f"interface_{column}", f"/proc/net/dev {column.replace('_', ' ')} "
                             "per device.", ("device",))
            for device in shown:
                family.add((device,), devices[device][column])
            yield family.metric
        shown_links = [device for device in shown if device in links]
        mtu = gauge("interface_mtu_bytes", "Largest packet the device sends (netstat -i MTU).",
                    ("device",))
        up = gauge("interface_up", "1 when the device is administratively up (flag U).",
                   ("device",))
        running = gauge("interface_running", "1 when the device is up and its link works "
                        "(flag R: operational state up or unknown).", ("device",))
        for device in shown_links:
            link = links[device]
            mtu.add((device,), link.mtu)
            up.add((device,), int("up" in link.flags))
            running.add((device,), int("running" in link.flags))
        yield from (mtu.metric, up.metric, running.metric)


class ConntrackCollector:
    def collect(self, _snapshot, data):
        if data is None:  # nf_conntrack not loaded: nothing to report, nothing failed
            return
        yield gauge("conntrack_entries", "Connections in the netfilter conntrack table "
                    "(nf_conntrack_count).").add((), data.table.entries).metric
        yield gauge("conntrack_entries_limit", "Size limit of the conntrack table "
                    "(nf_conntrack_max); new connections are dropped when it is full.").add(
                        (), data.table.limit).metric
        yield gauge("conntrack_flows_source", "1 for where the entries by state come from: "
                    "netlink (ctnetlink), proc (/proc/net/nf_conntrack) or none (count and "
                    "limit only: no CAP_NET_ADMIN).", ("source",)).add(
                        (data.flows_source,), 1).metric
        if data.flows is not None:
            yield from self._flows(data.flows)
        if data.stats is not None:
            for field, value in data.stats.items():
                yield counter(f"conntrack_stat_{field}", f"/proc/net/stat/nf_conntrack "
                              f"{field}, summed over CPUs.").add((), value).metric

    @staticmethod
    def _flows(flows):
        entries = gauge("conntrack_flows", "Conntrack entries read from the table per protocol "
                        "and TCP conntrack state (conntrack -L; state empty for protocols "
                        "without one).", ("protocol", "state"))
        for labels, count in sorted(flows.flows.items()):
            entries.add(labels, count)
        yield entries.metric
        nat = gauge("conntrack_nat_flows", "Conntrack entries with source NAT (masquerade "
                    "included) or destination NAT, per protocol.", ("protocol", "nat"))
        for labels, count in sorted(flows.nat.items()):
            nat.add(labels, count)
        yield nat.metric
        for name, doc, counts in (
                ("conntrack_assured_flows", "Conntrack entries marked ASSURED (seen both "
                 "ways long enough: never early-dropped).", flows.assured),
                ("conntrack_unreplied_flows", "Conntrack entries that have seen no reply "
                 "([UNREPLIED]).", flows.unreplied)):
            family = gauge(name, doc + " Per protocol.", ("protocol",))
            for protocol, count in sorted(counts.items()):
                family.add((protocol,), count)
            yield family.metric
        sources = gauge("conntrack_nat_source_flows", "NAT'd conntrack entries per original "
                        "source address (netstat -M): the top --remote.top, the rest in "
                        "source=\"other\".", ("source",))
        for source, count in flows.nat_sources:
            sources.add((source,), count)
        yield sources.metric


class RoutesCollector:
    """netstat -r: routes per device, and the default routes."""

    def collect(self, _snapshot, routes):
        counts = gauge("routes", "Routes in the kernel's tables (IPv4 main table, all IPv6 "
                       "tables) per device: the 256 devices with most, the rest in "
                       "device=\"other\".", ("family", "device"))
        defaults = gauge("route_default_info", "1 for each usable default route, labelled "
                         "with its gateway.", ("family", "device", "gateway"))
        for key, count in _per_device(routes):
            counts.add(key, count)
        for labels in sorted({(FAMILY_NAMES[r.family], r.device, r.gateway)
                              for r in routes if r.is_default}):
            defaults.add(labels, 1)
        yield counts.metric
        yield defaults.metric


class MulticastCollector:
    """netstat -g: multicast groups joined per device."""

    def collect(self, _snapshot, memberships):
        family = gauge("multicast_memberships", "Multicast groups joined, per device "
                       "(/proc/net/igmp, igmp6): the 256 devices with most, the rest in "
                       "device=\"other\".", ("family", "device"))
        for key, count in _per_device(memberships):
            family.add(key, count)
        yield family.metric


# A device named like the bucket gets this label: a device name holds no space, so no real
# device is ever called this, and every label names one thing.
RENAMED_DEVICE = "other (a device)"


def _per_device(items) -> list[tuple[tuple[str, str], int]]:
    """Routes or memberships per (family, device): the INTERFACE_LIMIT pairs with most (ties:
    by name), the rest per family in device="other", so the sum is every route. Cut at 256 by
    name instead, a Calico node's cali* devices hid eth0 and the sum fell short (found in
    review)."""
    counts = collections.Counter(
        (FAMILY_NAMES[item.family], RENAMED_DEVICE if item.device == OTHER else item.device)
        for item in items)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    rest: collections.Counter = collections.Counter()
    for (family, _device), count in ranked[INTERFACE_LIMIT:]:
        rest[family] += count
    return sorted(ranked[:INTERFACE_LIMIT]) + [((family, OTHER), count)
                                              for family, count in sorted(rest.items())]


class NetnsCollector:
    """TCP states per network namespace (with --collector.netns)."""

    def collect(self, _snapshot, summary):
        connections = gauge("netns_tcp_connections", "TCP sockets per network namespace "
                            "(other than the exporter's own) and state: the top "
                            "--collector.netns.top namespaces, the rest in netns=\"other\".",
                            ("netns", "state"))
        for labels, count in summary.connections.items():
            connections.add(labels, count)
        yield connections.metric
        yield gauge("netns_namespaces", "Network namespaces read, besides the exporter's own."
                    ).add((), summary.namespaces).metric
        yield gauge("netns_unreadable", "Namespaces or processes the exporter may not look "
                    "into (needs CAP_SYS_ADMIN and CAP_SYS_PTRACE).").add((), summary.unreadable).metric
        yield gauge("netns_failed", "Namespaces whose sockets could not be read this sample "
                    "(the others are still reported; the log says why).").add(
                        (), summary.failed).metric
