"""prometheus_client collectors, one per metric group. They read the latest snapshot through
a get_snapshot() callable and only translate it; none of them touches the kernel."""
from __future__ import annotations

from prometheus_client import CollectorRegistry

from .exporter import ExporterCollector
from .network import (ConntrackCollector, InterfacesCollector, MulticastCollector,
                      NetnsCollector, RoutesCollector)
from .snmp import SnmpCollector, SockstatCollector
from .tcp import TcpCollector
from .udp import UdpCollector


def build_registry(get_snapshot, version: str, snmp_fields=None) -> CollectorRegistry:
    """snmp_fields: a compiled regex limiting the netstat -s fields ("TcpExt_ListenOverflows")."""
    registry = CollectorRegistry(auto_describe=True)
    for collector in (TcpCollector(get_snapshot), UdpCollector(get_snapshot),
                      SnmpCollector(get_snapshot, snmp_fields), SockstatCollector(get_snapshot),
                      InterfacesCollector(get_snapshot), ConntrackCollector(get_snapshot),
                      RoutesCollector(get_snapshot), MulticastCollector(get_snapshot),
                      NetnsCollector(get_snapshot),
                      ExporterCollector(get_snapshot, version)):
        registry.register(collector)
    return registry
