"""Per remote address and per local port (the seed's recipes), with hard cardinality bounds:
prefixes, include/exclude lists and masking decide what a label is; ranking and the series
limit decide which labels are shown.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
from dataclasses import dataclass
from types import MappingProxyType
from typing import Iterable, Mapping

import numpy as np

from ..sources.table import NETSTAT_STATES, SocketTable, TcpState
from .ranking import OTHER, top_n
from .series import apply_series_limit
from .states import PORT_STATES, REMOTE_STATES, STATE_SLOTS

EXCLUDED = "excluded"  # addresses left out by --remote.include / --remote.exclude
# Bytes 00 00 ff ff, the third word of an IPv4-mapped IPv6 address, as a native uint32.
_MAPPED_WORD = int(np.frombuffer(b"\0\0\xff\xff", dtype=np.uint32)[0])
_LITTLE = np.little_endian


def _be(words: np.ndarray) -> np.ndarray:
    """Native words holding network-order bytes -> their big-endian integer values."""
    return words.byteswap() if _LITTLE else words


def _mask32(prefix: int) -> int:
    return (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF if prefix else 0


def _mask128_words(prefix: int) -> np.ndarray:
    return np.array([_mask32(min(32, max(0, prefix - 32 * i))) for i in range(4)], dtype=np.uint32)


@dataclass(frozen=True)
class RemoteOptions:
    top: int = 20  # remote addresses per state
    prefix_v4: int = 32
    prefix_v6: int = 128
    include: tuple = ()  # ipaddress networks; empty means every address
    exclude: tuple = ()
    mask_key: bytes | None = None  # when set, addresses become keyed hashes
    local_port_top: int = 50
    series_limit: int = 2000  # across remote, local-port and listener series


@dataclass(frozen=True, order=True)
class RemoteKey:
    """An address or network: version 4 or 6, its integer value (already masked), prefix.
    Ordered by those fields, so ranking ties go to IPv4 first, then the lower address."""
    version: int
    value: int
    prefix: int

    def text(self, mask_key: bytes | None = None) -> str:
        addr = ipaddress.ip_address(self.value) if self.version == 4 else ipaddress.IPv6Address(self.value)
        full = 32 if self.version == 4 else 128
        label = str(addr) if self.prefix == full else f"{addr}/{self.prefix}"
        if mask_key is None:
            return label
        # Stable for a given key, not reversible without it; 48 bits keep collisions rare.
        return "hash:" + hmac.new(mask_key, label.encode(), hashlib.sha256).hexdigest()[:12]


@dataclass(frozen=True, eq=False)
class RemoteCounts:
    """Connections per distinct (state, remote), as sorted arrays: only the few addresses
    that make a top-N ever become Python objects."""

    v4_state: np.ndarray  # uint64 state slot
    v4_addr: np.ndarray  # uint64 address (masked), ascending within a state
    v4_count: np.ndarray  # int64
    v6_state: np.ndarray  # uint32
    v6_addr: np.ndarray  # (m, 4) uint32 big-endian words (masked)
    v6_count: np.ndarray  # int64
    prefix_v4: int
    prefix_v6: int

    def top(self, states: Iterable[int], n: int,
            incumbents: frozenset = frozenset()) -> list[tuple[RemoteKey, int]]:
        """The n remotes with most connections over `states` (summed), largest first; ties go
        to the lower address; `incumbents` (the previous top) get the hysteresis advantage."""
        states = np.fromiter(states, dtype=np.int64)
        addr4, count4 = _sum_over_states(self.v4_addr, self.v4_count,
                                         np.isin(self.v4_state, states))
        rows6 = np.isin(self.v6_state, states)
        addr6, count6 = self.v6_addr[rows6], self.v6_count[rows6]
        if len(addr6) and len(states) > 1:
            addr6, inverse = np.unique(addr6, axis=0, return_inverse=True)
            count6 = np.bincount(inverse.ravel(), weights=count6).astype(np.int64)
        pool: dict[RemoteKey, int] = {}
        for i in _largest(count4, n):
            pool[RemoteKey(4, int(addr4[i]), self.prefix_v4)] = int(count4[i])
        for i in _largest(count6, n):
            pool[_key6(addr6[i], self.prefix_v6)] = int(count6[i])
        held = {}
        for key in incumbents:
            if key.version == 4:
                j = int(np.searchsorted(addr4, key.value))
                found = j < len(addr4) and int(addr4[j]) == key.value
                count = int(count4[j]) if found else 0
            else:
                hit = np.flatnonzero((addr6 == _words6(key.value)).all(axis=1)) if len(addr6) else []
                count = int(count6[hit[0]]) if len(hit) else 0
            if count:
                held[key] = count
        return top_n({**pool, **held}, n, frozenset(held))


def _sum_over_states(addr: np.ndarray, count: np.ndarray, rows: np.ndarray):
    addr, count = addr[rows], count[rows]
    if len(addr) and np.any(addr[1:] <= addr[:-1]):  # several states: merge equal addresses
        addr, inverse = np.unique(addr, return_inverse=True)
        count = np.bincount(inverse, weights=count).astype(np.int64)
    return addr, count


def _largest(counts: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n largest counts in O(len); ties resolved toward lower indices (the
    arrays are sorted by address, so toward lower addresses)."""
    if n <= 0 or not len(counts):
        return np.zeros(0, dtype=np.intp)
    if len(counts) <= n:
        return np.arange(len(counts))
    threshold = np.partition(counts, len(counts) - n)[len(counts) - n]
    above = np.flatnonzero(counts > threshold)
    ties = np.flatnonzero(counts == threshold)[: n - len(above)]
    return np.concatenate([above, ties])


def _words6(value: int) -> np.ndarray:
    return np.array([(value >> (96 - 32 * i)) & 0xFFFFFFFF for i in range(4)], dtype=np.uint32)


def _key6(words: np.ndarray, prefix: int) -> RemoteKey:
    value = 0
    for word in words.tolist():
        value = (value << 32) | word
    return RemoteKey(6, value, prefix)


def _in_networks(v4: np.ndarray, v6: np.ndarray, networks) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks: which IPv4 (big-endian ints) and IPv6 (big-endian word rows) addresses
    fall in any of the networks."""
    hit4 = np.zeros(len(v4), dtype=bool)
    hit6 = np.zeros(len(v6), dtype=bool)
    for net in networks:
        if net.version == 4:
            hit4 |= (v4 & _mask32(net.prefixlen)) == int(net.network_address)
        elif len(v6):
            mask = _mask128_words(net.prefixlen)
            hit6 |= ((v6 & mask) == _words6(int(net.network_address))).all(axis=1)
    return hit4, hit6


def _count_remotes(v4_batches, v6_batches, options: RemoteOptions) -> RemoteCounts:
    keys = np.concatenate(v4_batches) if v4_batches else np.zeros(0, dtype=np.uint64)
    keys, counts4 = np.unique(keys, return_counts=True)
    if v6_batches:
        rows, counts6 = np.unique(np.concatenate(v6_batches), axis=0, return_counts=True)
    else:
        rows, counts6 = np.zeros((0, 5), dtype=np.uint32), np.zeros(0, dtype=np.int64)
    return RemoteCounts(
        v4_state=keys >> np.uint64(32), v4_addr=keys & np.uint64(0xFFFFFFFF),
        v4_count=counts4.astype(np.int64), v6_state=rows[:, 0], v6_addr=rows[:, 1:],
        v6_count=counts6.astype(np.int64), prefix_v4=options.prefix_v4,
        prefix_v6=options.prefix_v6)


@dataclass(frozen=True)
class RemoteSummary:
    # (state, remote label) -> count. Per state: the top-N labels, OTHER and (with filters)
    # EXCLUDED, summing exactly to that state's connection count.
    remote: Mapping[tuple[str, str], int]
    # (state, port label) -> server-side sockets (local port is a listening port): the top
    # ports and OTHER, summing to all server-side sockets in that state.
    local_port: Mapping[tuple[str, str], int]
    members: Mapping[str, frozenset]  # state -> RemoteKeys shown (input to the next sample)
    port_members: frozenset  # ports shown
    truncated: Mapping[str, int]  # metric -> label sets folded into OTHER by the series limit
    counts: RemoteCounts  # everything, for the CLI's ad-hoc top lists


class RemoteAccumulator:
    """Collects (state, remote) and (state, local port) keys batch by batch; counting is one
    sort of all keys in result()."""

    def __init__(self, options: RemoteOptions = RemoteOptions()):
        self.options = options
        self._mask4 = np.uint64(_mask32(options.prefix_v4))
        self._mask6 = _mask128_words(options.prefix_v6)
        self._v4: list[np.ndarray] = []  # uint64: state << 32 | address
        self._v6: list[np.ndarray] = []  # (n, 5) uint32: state, four big-endian words
        self._ports: list[np.ndarray] = []  # uint32: state << 16 | local port
        self._excluded = np.zeros(STATE_SLOTS, dtype=np.int64)

    def add(self, table: SocketTable) -> None:
        state = table.state
        if not len(state):
            return
        connected = state != TcpState.LISTEN
        self._ports.append((state[connected].astype(np.uint32) << 16) | table.local_port[connected])
        sel = connected & (state != TcpState.CLOSE)
        state, family, words = state[sel], table.family[sel], table.remote_addr[sel]
        mapped = ((family == socket.AF_INET6) & (words[:, 0] == 0) & (words[:, 1] == 0)
                  & (words[:, 2] == _MAPPED_WORD))
        is_v4 = (family == socket.AF_INET) | mapped
        v4 = _be(np.where(mapped[is_v4], words[is_v4, 3], words[is_v4, 0]))
        state4, state6 = state[is_v4], state[~is_v4]
        v6 = _be(words[~is_v4])
        if self.options.include or self.options.exclude:
            keep4, keep6 = self._filter(v4, v6)
            self._excluded += np.bincount(state4[~keep4], minlength=STATE_SLOTS)
            self._excluded += np.bincount(state6[~keep6], minlength=STATE_SLOTS)
            v4, state4, v6, state6 = v4[keep4], state4[keep4], v6[keep6], state6[keep6]
        self._v4.append((state4.astype(np.uint64) << np.uint64(32))
                        | (v4.astype(np.uint64) & self._mask4))
        if len(v6):
            rows = np.empty((len(v6), 5), dtype=np.uint32)
            rows[:, 0] = state6
            rows[:, 1:] = v6 & self._mask6
            self._v6.append(rows)

    def _filter(self, v4: np.ndarray, v6: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows kept by --remote.include / --remote.exclude, tested on the full address."""
        opts = self.options
        keep4, keep6 = np.ones(len(v4), dtype=bool), np.ones(len(v6), dtype=bool)
        if opts.include:
            keep4, keep6 = _in_networks(v4, v6, opts.include)
        if opts.exclude:
            out4, out6 = _in_networks(v4, v6, opts.exclude)
            keep4, keep6 = keep4 & ~out4, keep6 & ~out6
        return keep4, keep6

    def result(self, state_totals: Mapping[str, int], listening_ports: Iterable[int],
               previous: "RemoteSummary | None" = None, listeners: int = 0,
               backlog_known: bool = True) -> RemoteSummary:
        opts = self.options
        counts = _count_remotes(self._v4, self._v6, opts)
        chosen = {}
        for state in REMOTE_STATES:
            name = NETSTAT_STATES[state]
            before = previous.members.get(name, frozenset()) if previous else frozenset()
            chosen[name] = counts.top((state,), opts.top, before)
        ports = sorted(set(listening_ports))
        keys = np.concatenate(self._ports) if self._ports else np.zeros(0, dtype=np.uint32)
        by_port = np.bincount(keys, minlength=STATE_SLOTS << 16).reshape(STATE_SLOTS, 1 << 16)
        port_totals = {port: int(by_port[:, port].sum()) for port in ports}
        shown_ports = [p for p, _ in top_n(port_totals, opts.local_port_top,
                                           previous.port_members if previous else frozenset())]
        truncated = apply_series_limit(chosen, shown_ports, listeners, opts.series_limit,
                                       backlog_known=backlog_known)
        remote = {}
        for state in REMOTE_STATES:
            name = NETSTAT_STATES[state]
            for key, count in chosen[name]:
                remote[(name, key.text(opts.mask_key))] = count
            excluded = int(self._excluded[state])
            remote[(name, OTHER)] = (state_totals[name] - excluded
                                     - sum(count for _key, count in chosen[name]))
            if opts.include or opts.exclude:
                remote[(name, EXCLUDED)] = excluded
        local_port = {}
        for state in PORT_STATES:
            name = NETSTAT_STATES[state]
            row = by_port[state]
            for port in shown_ports:
                local_port[(name, str(port))] = int(row[port])
            local_port[(name, OTHER)] = (int(row[ports].sum())
                                         - sum(int(row[p]) for p in shown_ports))
        return RemoteSummary(
            remote=MappingProxyType(remote), local_port=MappingProxyType(local_port),
            members=MappingProxyType({n: frozenset(k for k, _ in c) for n, c in chosen.items()}),
            port_members=frozenset(shown_ports), truncated=MappingProxyType(truncated),
            counts=counts)
