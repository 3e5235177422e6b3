"""Interfaces (/proc/net/dev) and the conntrack table: small groups, one collector each."""
from __future__ import annotations

from .base import SnapshotCollector, counter, gauge, result_of

# Most devices with their own series: a host with thousands of veths still scrapes small.
INTERFACE_LIMIT = 256


class InterfacesCollector(SnapshotCollector):
    def __init__(self, get_snapshot, limit: int = INTERFACE_LIMIT):
        super().__init__(get_snapshot)
        self.limit = limit

    def collect(self):
        _snapshot, devices = result_of(self.get_snapshot, "interfaces")
        if devices is None:
            return
        total = gauge("interface_devices", "Network devices in /proc/net/dev; at most "
                      f"{self.limit} (by name) get per-device series.")
        total.add((), len(devices))
        yield total.metric
        shown = sorted(devices)[: self.limit]
        columns = next(iter(devices.values()), {})
        for column in columns:
            family = counter(f"interface_{column}", f"/proc/net/dev {column.replace('_', ' ')} "
                             "per device.", ("device",))
            for device in shown:
                family.add((device,), devices[device][column])
            yield family.metric


class ConntrackCollector(SnapshotCollector):
    def collect(self):
        _snapshot, table = result_of(self.get_snapshot, "conntrack")
        if table is None:  # nf_conntrack not loaded: nothing to report, nothing failed
            return
        yield gauge("conntrack_entries", "Connections in the netfilter conntrack table "
                    "(nf_conntrack_count).").add((), table.entries).metric
        yield gauge("conntrack_entries_limit", "Size limit of the conntrack table "
                    "(nf_conntrack_max); new connections are dropped when it is full.").add(
                        (), table.limit).metric
