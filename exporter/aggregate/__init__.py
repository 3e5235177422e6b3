"""Pure aggregation over SocketTable batches: no clock, no I/O, no logging.

One module per concern (states, remotes, programs, namespaces, the series limit, and tcp
that runs a dump through them); callers keep using `aggregate.NAME` through these re-exports.
"""
from .conntrack import FlowAccumulator, FlowSummary
from .namespaces import NetnsSummary, summarize_namespaces
from .programs import NO_PROGRAM, UNKNOWN_PROGRAM, ProgramAccumulator, ProgramSummary
from .ranking import HYSTERESIS_MIN, HYSTERESIS_RATIO, OTHER, top_n
from .remotes import (EXCLUDED, RemoteAccumulator, RemoteCounts, RemoteKey, RemoteOptions,
                      RemoteSummary)
from .series import MIN_SERIES_LIMIT, SERIES_LIMITED
from .states import (FAMILIES, PORT_STATES, QUEUES, REMOTE_STATES, UDP_STATES, Listener,
                     UdpAccumulator, UdpSummary)
from .tcp import TcpAccumulator, TcpSummary, summarize_tcp

__all__ = [
    "EXCLUDED", "FAMILIES", "FlowAccumulator", "FlowSummary", "HYSTERESIS_MIN", "HYSTERESIS_RATIO", "Listener", "MIN_SERIES_LIMIT",
    "NO_PROGRAM", "NetnsSummary", "OTHER", "PORT_STATES", "ProgramAccumulator", "ProgramSummary",
    "QUEUES", "REMOTE_STATES", "RemoteAccumulator", "RemoteCounts", "RemoteKey", "RemoteOptions",
    "RemoteSummary", "SERIES_LIMITED", "TcpAccumulator", "TcpSummary", "UDP_STATES",
    "UNKNOWN_PROGRAM", "UdpAccumulator", "UdpSummary", "summarize_namespaces", "summarize_tcp",
    "top_n",
]
