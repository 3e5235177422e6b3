"""The conntrack table counted (netstat -M): entries per protocol and TCP state, NAT'd entries
by kind, assured and unreplied ones, and the top original sources of NAT'd entries with an
OTHER remainder, batch by batch (a table may hold millions of entries).
"""
from __future__ import annotations

import ipaddress
import socket
import sys
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import numpy as np

from ..sources.ctnetlink import (IPS_ASSURED, IPS_DST_NAT, IPS_SEEN_REPLY, IPS_SRC_NAT,
                                 NO_STATE, TCP_STATES, FlowTable)
from .ranking import OTHER, top_n
from .remotes import RemoteKey, RemoteOptions

PROTOCOLS = {1: "icmp", 2: "igmp", 6: "tcp", 17: "udp", 33: "dccp", 47: "gre", 58: "icmpv6",
             132: "sctp", 136: "udplite"}
NAT_KINDS = {"source": IPS_SRC_NAT, "destination": IPS_DST_NAT}
_SLOTS = 256  # states: TCP_STATES indexes, NO_STATE


def protocol_name(number: int) -> str:
    """6 -> "tcp"; an unnamed protocol keeps its number (at most 256 values)."""
    return PROTOCOLS.get(number, str(number))


@dataclass(frozen=True)
class FlowSummary:
    flows: Mapping[tuple[str, str], int]  # (protocol, TCP state or "") -> entries
    nat: Mapping[tuple[str, str], int]  # (protocol, "source" | "destination") -> entries
    assured: Mapping[str, int]  # protocol -> entries
    unreplied: Mapping[str, int]  # protocol -> entries
    nat_sources: tuple[tuple[str, int], ...]  # (address or OTHER, entries), top first
    members: frozenset  # RemoteKeys shown (the next sample's incumbents)
    total: int  # entries read


class FlowAccumulator:
    def __init__(self, options: RemoteOptions | None = None):
        self.options = options or RemoteOptions()
        self._counts = np.zeros((256, _SLOTS), dtype=np.int64)  # protocol x state
        self._nat = {kind: np.zeros(256, dtype=np.int64) for kind in NAT_KINDS}
        self._assured = np.zeros(256, dtype=np.int64)
        self._unreplied = np.zeros(256, dtype=np.int64)
        self._sources: dict[RemoteKey, int] = {}
        self._total = 0

    def add(self, table: FlowTable) -> None:
        if not len(table):
            return
        self._total += len(table)
        protocol = table.protocol.astype(np.intp)
        self._counts += np.bincount(protocol * _SLOTS + table.state, minlength=256 * _SLOTS
                                    ).reshape(256, _SLOTS)
        for kind, bit in NAT_KINDS.items():
            self._nat[kind] += np.bincount(protocol[(table.status & bit) != 0], minlength=256)
        self._assured += np.bincount(protocol[(table.status & IPS_ASSURED) != 0], minlength=256)
        self._unreplied += np.bincount(protocol[(table.status & IPS_SEEN_REPLY) == 0],
                                       minlength=256)
        natted = (table.status & (IPS_SRC_NAT | IPS_DST_NAT)) != 0
        if natted.any():
            self._add_sources(table.family[natted], table.source[natted])

    def _add_sources(self, family: np.ndarray, source: np.ndarray) -> None:
        # IPv4 sources (nearly every NAT) as one integer each: a 1-D unique is a plain sort,
        # where unique over rows (axis=0) sorts records and was 8x slower at 100k entries.
        v4 = family == socket.AF_INET
        words, counts = np.unique(source[v4, 0], return_counts=True)
        for word, count in zip(words.tolist(), counts.tolist()):
            self._count_source(socket.AF_INET, int(word).to_bytes(4, sys.byteorder), count)
        if not v4.all():
            rows, counts = np.unique(source[~v4], axis=0, return_counts=True)
            for row, count in zip(rows, counts.tolist()):
                self._count_source(socket.AF_INET6, row.astype(np.uint32).tobytes(), count)

    def _count_source(self, family: int, packed: bytes, count: int) -> None:
        key = _key(family, packed, self.options)
        self._sources[key] = self._sources.get(key, 0) + count

    def result(self, previous: FlowSummary | None = None) -> FlowSummary:
        flows: dict[tuple[str, str], int] = {}
        for protocol, state in zip(*np.nonzero(self._counts)):
            name = TCP_STATES[state] if state != NO_STATE and state < len(TCP_STATES) else ""
            key = (protocol_name(int(protocol)), name)
            flows[key] = flows.get(key, 0) + int(self._counts[protocol, state])
        for state in TCP_STATES:  # every TCP state, so alerts on one never go absent
            flows.setdefault(("tcp", state), 0)
        flows.setdefault(("udp", ""), 0)
        nat = {(protocol_name(int(p)), kind): int(counts[p])
               for kind, counts in self._nat.items() for p in np.flatnonzero(counts)}
        for protocol in ("tcp", "udp"):  # present when zero, like the states
            for kind in NAT_KINDS:
                nat.setdefault((protocol, kind), 0)
        incumbents = previous.members if previous is not None else frozenset()
        shown = top_n(self._sources, self.options.top, incumbents)
        rest = sum(self._sources.values()) - sum(count for _key, count in shown)
        return FlowSummary(
            flows=MappingProxyType(flows),
            nat=MappingProxyType(nat),
            assured=_by_protocol(self._assured), unreplied=_by_protocol(self._unreplied),
            nat_sources=tuple((key.text(self.options.mask_key), count) for key, count in shown)
            + ((OTHER, rest),),
            members=frozenset(key for key, _count in shown), total=self._total)


def _by_protocol(counts: np.ndarray) -> Mapping[str, int]:
    return MappingProxyType({protocol_name(int(p)): int(counts[p]) for p in np.flatnonzero(counts)})


def _key(family: int, packed: bytes, options: RemoteOptions) -> RemoteKey:
    """An original source, masked to --remote.prefix-v4/-v6 like the remote top-N."""
    if family == socket.AF_INET:
        network = ipaddress.ip_network((packed[:4], options.prefix_v4), strict=False)
        return RemoteKey(4, int(network.network_address), options.prefix_v4)
    network = ipaddress.ip_network((packed[:16], options.prefix_v6), strict=False)
    return RemoteKey(6, int(network.network_address), options.prefix_v6)
