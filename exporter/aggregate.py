"""Pure aggregation over SocketTable batches: no clock, no I/O, no logging.

An accumulator takes batches one by one (a 1M-socket dump never exists as one table) and
`result()` returns an immutable summary that the collectors and the CLI read.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from types import MappingProxyType
from typing import Iterable, Mapping

import numpy as np

from .sources.table import FAMILY_NAMES, NETSTAT_STATES, SocketTable, TcpState, format_address

FAMILIES = (socket.AF_INET, socket.AF_INET6)
QUEUES = ("receive", "send")
UDP_STATES = {TcpState.ESTABLISHED: "connected", TcpState.CLOSE: "unconnected"}
_STATE_SLOTS = 16  # kernel states fit in 4 bits


def _family_index(family: np.ndarray) -> np.ndarray:
    return (family == socket.AF_INET6).astype(np.intp)


def _sum_by(keys: np.ndarray, values: np.ndarray, slots: int) -> np.ndarray:
    """Exact per-key sums of uint32 values. bincount sums in float64, which is exact only
    while a sum stays below 2**53, so no more than 2**21 values go into one call."""
    out = np.zeros(slots, dtype=np.int64)
    step = 1 << 21
    for i in range(0, len(keys), step):
        out += np.bincount(keys[i:i + step], weights=values[i:i + step],
                           minlength=slots).astype(np.int64)
    return out


@dataclass(frozen=True)
class Listener:
    family: str
    address: str
    port: int
    queue_length: int  # connections waiting for accept()
    backlog: int | None  # the accept queue's limit; None when the source cannot tell
    sockets: int  # SO_REUSEPORT groups share an address:port; their queues are summed


@dataclass(frozen=True)
class TcpSummary:
    connections: Mapping[tuple[str, str], int]  # (state, family) -> count, every pair present
    queue_bytes: Mapping[tuple[str, str], int]  # (state, queue) -> bytes, LISTEN excluded
    listeners: tuple[Listener, ...]  # at most the listener limit, fullest queues first
    listeners_total: int  # distinct address:port pairs before the cap
    scanned: int  # sockets decoded

    def state_totals(self) -> dict[str, int]:
        totals = dict.fromkeys(NETSTAT_STATES.values(), 0)
        for (state, _family), count in self.connections.items():
            totals[state] += count
        return totals


@dataclass(frozen=True)
class UdpSummary:
    sockets: Mapping[tuple[str, str], int]  # (family, connected|unconnected) -> count
    queue_bytes: Mapping[tuple[str, str], int]  # (family, queue) -> bytes
    scanned: int  # sockets decoded


class TcpAccumulator:
    """Per state and family counts, queue sums and listeners over any number of batches."""

    def __init__(self, listen_limit: int = 100, backlog_known: bool = True):
        self.listen_limit = listen_limit
        self.backlog_known = backlog_known
        self._counts = np.zeros((_STATE_SLOTS, 2), dtype=np.int64)
        self._queues = np.zeros((_STATE_SLOTS, 2), dtype=np.int64)
        self._listeners: dict[tuple[int, bytes, int], list[int]] = {}
        self._sockets = 0

    def add(self, table: SocketTable) -> None:
        if not len(table):
            return
        self._sockets += len(table)
        state = table.state.astype(np.intp)
        if int(state.max()) >= _STATE_SLOTS:
            raise ValueError(f"TCP state {int(state.max())} out of range")
        slot = state * 2 + _family_index(table.family)
        self._counts += np.bincount(slot, minlength=_STATE_SLOTS * 2).reshape(_STATE_SLOTS, 2)
        for col, queue in enumerate((table.recv_q, table.send_q)):
            self._queues[:, col] += _sum_by(state, queue, _STATE_SLOTS)
        self._add_listeners(table, np.flatnonzero(table.state == TcpState.LISTEN))

    def _add_listeners(self, table: SocketTable, rows: np.ndarray) -> None:
        # Listeners are few: a Python loop over them is cheap and keeps exact integers.
        for i in rows:
            key = (int(table.family[i]), table.local_addr[i].tobytes(), int(table.local_port[i]))
            entry = self._listeners.setdefault(key, [0, 0, 0])
            entry[0] += int(table.recv_q[i])
            entry[1] += int(table.send_q[i])
            entry[2] += 1

    def result(self) -> TcpSummary:
        connections = {}
        queue_bytes = {}
        for state, name in NETSTAT_STATES.items():
            for fam_index, family in enumerate(FAMILIES):
                connections[(name, FAMILY_NAMES[family])] = int(self._counts[state, fam_index])
            if state != TcpState.LISTEN:
                for col, queue in enumerate(QUEUES):
                    queue_bytes[(name, queue)] = int(self._queues[state, col])
        # The fullest queues matter most; ties (mostly empty queues) fall back to port and
        # address so that membership is stable from one sample to the next.
        ordered = sorted(self._listeners.items(),
                         key=lambda kv: (-kv[1][0], kv[0][2], kv[0][0], kv[0][1]))
        listeners = tuple(
            Listener(family=FAMILY_NAMES[fam],
                     address=format_address(fam, np.frombuffer(raw, dtype=np.uint32)),
                     port=port, queue_length=queued,
                     backlog=backlog if self.backlog_known else None, sockets=count)
            for (fam, raw, port), (queued, backlog, count) in ordered[:self.listen_limit])
        return TcpSummary(connections=MappingProxyType(connections),
                          queue_bytes=MappingProxyType(queue_bytes), listeners=listeners,
                          listeners_total=len(self._listeners), scanned=self._sockets)


class UdpAccumulator:
    def __init__(self):
        self._counts = np.zeros((_STATE_SLOTS, 2), dtype=np.int64)
        self._queues = np.zeros((2, 2), dtype=np.int64)
        self._total = 0

    def add(self, table: SocketTable) -> None:
        if not len(table):
            return
        self._total += len(table)
        state = table.state.astype(np.intp)
        if int(state.max()) >= _STATE_SLOTS:
            raise ValueError(f"UDP state {int(state.max())} out of range")
        fam = _family_index(table.family)
        self._counts += np.bincount(state * 2 + fam,
                                    minlength=_STATE_SLOTS * 2).reshape(_STATE_SLOTS, 2)
        for col, queue in enumerate((table.recv_q, table.send_q)):
            self._queues[:, col] += _sum_by(fam, queue, 2)

    def result(self) -> UdpSummary:
        sockets = {}
        queue_bytes = {}
        for fam_index, family in enumerate(FAMILIES):
            fname = FAMILY_NAMES[family]
            for state, label in UDP_STATES.items():
                sockets[(fname, label)] = int(self._counts[state, fam_index])
            for col, queue in enumerate(QUEUES):
                queue_bytes[(fname, queue)] = int(self._queues[fam_index, col])
        # A UDP socket is either connected or not; anything else would be a kernel surprise
        # we must not hide, so it still counts in the total.
        return UdpSummary(sockets=MappingProxyType(sockets),
                          queue_bytes=MappingProxyType(queue_bytes), scanned=self._total)


def summarize_tcp(tables: Iterable[SocketTable], **options) -> TcpSummary:
    acc = TcpAccumulator(**options)
    for table in tables:
        acc.add(table)
    return acc.result()


def summarize_udp(tables: Iterable[SocketTable]) -> UdpSummary:
    acc = UdpAccumulator()
    for table in tables:
        acc.add(table)
    return acc.result()
