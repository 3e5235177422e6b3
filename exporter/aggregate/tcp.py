"""One TCP dump through every per-socket view: states and queues, listeners, and when asked
remotes and programs. An accumulator takes batches one by one (a 1M-socket dump never exists
as one table) and `result()` returns an immutable summary the collectors and the CLI read.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Iterable, Mapping

import numpy as np

from ..sources.table import FAMILY_NAMES, NETSTAT_STATES, SocketTable, TcpState, format_address
from .programs import ProgramAccumulator, ProgramSummary
from .ranking import HYSTERESIS_MIN, HYSTERESIS_RATIO
from .remotes import RemoteAccumulator, RemoteOptions, RemoteSummary
from .states import (FAMILIES, QUEUES, STATE_SLOTS, Listener, count_state_family, state_totals,
                     sum_by)


@dataclass(frozen=True)
class TcpSummary:
    connections: Mapping[tuple[str, str], int]  # (state, family) -> count, every pair present
    queue_bytes: Mapping[tuple[str, str], int]  # (state, queue) -> bytes, LISTEN excluded
    listeners: tuple[Listener, ...]  # at most the listener limit, fullest queues first
    listeners_total: int  # distinct address:port pairs before the cap
    scanned: int  # sockets decoded
    remote: "RemoteSummary | None" = None  # per remote address and local port, when asked
    programs: "ProgramSummary | None" = None  # per owning program, when asked
    listener_keys: frozenset = frozenset()  # the listeners shown (next sample's incumbents)

    def state_totals(self) -> dict[str, int]:
        return state_totals(self.connections)


class TcpAccumulator:
    """Per state and family counts, queue sums and listeners over any number of batches."""

    def __init__(self, listen_limit: int = 100, backlog_known: bool = True,
                 remote: "RemoteOptions | None" = None, previous: "TcpSummary | None" = None,
                 owners=None, program_top: int = 20):
        self.listen_limit = listen_limit
        self.backlog_known = backlog_known
        self._previous = previous.remote if previous is not None else None
        self._remote = RemoteAccumulator(remote, self._previous) \
            if remote is not None else None
        self._programs = ProgramAccumulator(owners, program_top) if owners is not None else None
        self._previous_programs = previous.programs if previous is not None else None
        self._incumbents = previous.listener_keys if previous is not None else frozenset()
        self._counts = np.zeros((STATE_SLOTS, 2), dtype=np.int64)
        self._queues = np.zeros((STATE_SLOTS, 2), dtype=np.int64)
        self._listeners: dict[tuple[int, bytes, int], list[int]] = {}
        self._sockets = 0

    def add(self, table: SocketTable) -> None:
        if not len(table):
            return
        self._sockets += len(table)
        key, counts = count_state_family(table, "TCP")
        self._counts += counts
        for col, queue in enumerate((table.recv_q, table.send_q)):
            self._queues[:, col] += sum_by(key, queue, STATE_SLOTS * 2).reshape(-1, 2).sum(1)
        if counts[TcpState.LISTEN].any():
            self._add_listeners(table, np.flatnonzero(table.state == TcpState.LISTEN))
        if self._remote is not None:
            self._remote.add(table, counts, key)
        if self._programs is not None:
            self._programs.add(table)

    def _add_listeners(self, table: SocketTable, rows: np.ndarray) -> None:
        # Listeners are few: a Python loop over them is cheap and keeps exact integers.
        for i in rows:
            # the interface is part of the key: fe80::1%a1 and fe80::1%a2 on one port are two
            # listeners with two queues, not one
            key = (int(table.family[i]), table.local_addr[i].tobytes(), int(table.local_port[i]),
                   int(table.ifindex[i]))
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
        # The fullest queues matter most, with the remote top-N's hysteresis: a listener shown
        # last time keeps its place until a newcomer's queue clearly beats it, so one queued
        # connection does not swap series in and out. Ties fall back to port and address.
        def rank(kv):
            key, (queued, _backlog, _count) = kv
            score = queued * HYSTERESIS_RATIO + HYSTERESIS_MIN if key in self._incumbents \
                else queued
            return (-score, key not in self._incumbents, key[2], key[0], key[1], key[3])
        ordered = sorted(self._listeners.items(), key=rank)
        remote = None
        shown = min(self.listen_limit, len(ordered))
        if self._remote is not None:
            remote = self._remote.result(state_totals(connections),
                                         {key[2] for key in self._listeners},
                                         self._previous, shown, self.backlog_known)
            shown -= remote.truncated["listen_queue_length"]
        listeners = tuple(
            Listener(family=FAMILY_NAMES[fam],
                     address=format_address(fam, np.frombuffer(raw, dtype=np.uint32)),
                     port=port, queue_length=queued,
                     backlog=backlog if self.backlog_known else None, sockets=count,
                     ifindex=ifindex)
            for (fam, raw, port, ifindex), (queued, backlog, count)
            in sorted(ordered[:shown], key=lambda kv: (-kv[1][0], kv[0][2], kv[0][0], kv[0][1],
                                                       kv[0][3])))
        return TcpSummary(connections=MappingProxyType(connections),
                          queue_bytes=MappingProxyType(queue_bytes), listeners=listeners,
                          listeners_total=len(self._listeners), scanned=self._sockets,
                          remote=remote,
                          programs=self._programs.result(self._previous_programs)
                          if self._programs is not None else None,
                          listener_keys=frozenset(key for key, _value in ordered[:shown]))


def summarize_tcp(tables: Iterable[SocketTable], **options) -> TcpSummary:
    acc = TcpAccumulator(**options)
    for table in tables:
        acc.add(table)
    return acc.result()
